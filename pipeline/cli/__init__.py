"""The console scripts, one module each: argument parsing, one-line errors, and the calls into the
layers below. The only layer that may import every other."""
