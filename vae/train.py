"""`train-vae`: Train the stage-1 Keras VAE on iris images. (not built yet)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_config_args
from pipeline.errors import UserError, cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `train-vae`."""
    parser = argparse.ArgumentParser(prog="train-vae", description="Train the stage-1 Keras VAE on iris images.")
    add_config_args(parser)
    parser.parse_args(argv)
    raise UserError("train-vae is not built yet")
