"""The floor every other layer stands on: errors, files, images, typed config, devices, batch order.

Imports nothing of the project outside `pipeline.common`."""
