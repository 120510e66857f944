"""`iris-demo`: Run the end-to-end demo on built-in synthetic irises. (not built yet)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_config_args
from pipeline.errors import UserError, cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point of `iris-demo`."""
    parser = argparse.ArgumentParser(prog="iris-demo", description="Run the end-to-end demo on built-in synthetic irises.")
    add_config_args(parser)
    parser.parse_args(argv)
    raise UserError("iris-demo is not built yet")
