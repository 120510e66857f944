"""`generate`: Generate iris images from VAE priors, images or noise. (not built yet)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_config_args
from pipeline.errors import UserError, cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `generate`."""
    parser = argparse.ArgumentParser(prog="generate", description="Generate iris images from VAE priors, images or noise.")
    add_config_args(parser)
    parser.parse_args(argv)
    raise UserError("generate is not built yet")
