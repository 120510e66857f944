"""Training images: folders of real frames and the built-in synthetic eyes with ground truth.

Imports only `pipeline.common`."""
