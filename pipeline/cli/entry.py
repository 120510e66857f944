"""What every console script shares: `--config`/`--set`, and the wrapper that turns a user
error into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from guided_diffusion.errors import DiffusionSettingError
from pipeline.common.config import Config, load_config
from pipeline.common.errors import UserError
from pipeline.common.interrupts import TrainingInterrupted

F = TypeVar("F", bound=Callable[..., int | None])


def add_config_args(parser: argparse.ArgumentParser, *, example: str, default_config: str | None = None) -> None:
    """Add `--config FILE` and repeatable `--set key=value` to a parser; `example` ('section.key=value',
    a key of the script's own section) is the one its `--set` help shows."""
    parser.add_argument(
        "--config", default=default_config, metavar="FILE",
        help="YAML config file" + (f" (default: {default_config})" if default_config else ""),
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable; keys: pipeline/common/config.py)",
    )


def add_metrics_args(parser: argparse.ArgumentParser, what: str) -> None:
    """`--metrics proxy|inception` and `--inception-weights FILE` (real FID/KID through clean-fid);
    `what` says what the metrics are computed for."""
    parser.add_argument("--metrics", choices=("proxy", "inception"), default="proxy",
                        help=f"{what}: proxy features (default; offline) or Inception-v3 (real FID/KID via "
                             "clean-fid; pip install -e '.[metrics]')")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="clean-fid's inception-2015-12-05.pt for --metrics inception "
                             "(default: clean-fid's cache, if the file is there)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by `--config` with the `--set` overrides applied."""
    return load_config(args.config, args.overrides)


def cli_entry(func: F) -> F:
    """Wrap a console-script `main`: a user error (ours or the diffusion core's) → `error: …` on
    stderr, exit 2, no traceback; a run stopped by a signal (`TrainingInterrupted`) → its message
    on stderr, exit 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            code = func(*args, **kwargs)
        except (UserError, DiffusionSettingError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except TrainingInterrupted as exc:  # stopped cleanly by SIGINT/SIGTERM: say what was saved
            print(exc, file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper  # type: ignore[return-value]


def exit_without_teardown(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], NoReturn]:
    """A console script's entry point for a quick command. Called with no arguments (the console
    script, `python -m`), it runs `main` (a `cli_entry`) on the command line, then its exit handlers
    (logging's flush, multiprocessing's clean-up of its pool and temp folder), flushes the output and
    leaves with `main`'s exit code, skipping the interpreter's teardown of every module and object,
    which with NumPy and OpenCV loaded costs ~0.1 s. Called with `argv` (tests, other code), it is
    `main` itself. A bug's traceback exits as usual."""

    def run(argv: list[str] | None = None) -> NoReturn:
        if argv is not None:
            sys.exit(main(argv))  # (a cli_entry exits by itself)
        try:
            main(None)
            code: object = 0
        except SystemExit as exc:
            code = exc.code
        if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python prints it
            print(code, file=sys.stderr)
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)

    return run
