"""`circularity-check`: Check whether pupils and irises in a folder of images are round. (not built yet)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_config_args
from pipeline.errors import UserError, cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `circularity-check`."""
    parser = argparse.ArgumentParser(prog="circularity-check", description="Check whether pupils and irises in a folder of images are round.")
    add_config_args(parser)
    parser.parse_args(argv)
    raise UserError("circularity-check is not built yet")
