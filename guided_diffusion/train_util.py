"""`train-diffusion`: Train the stage-2 diffusion U-Net. (not built yet)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_config_args
from pipeline.errors import UserError, cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `train-diffusion`."""
    parser = argparse.ArgumentParser(prog="train-diffusion", description="Train the stage-2 diffusion U-Net.")
    add_config_args(parser)
    parser.parse_args(argv)
    raise UserError("train-diffusion is not built yet")
