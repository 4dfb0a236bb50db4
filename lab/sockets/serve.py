"""The server entry point (``python -m lab.sockets``): standard library only.

``lab serve`` validates its options and then *execs* this, so no server, parent or worker
process carries the CLI's imports (Typer, rich) into every fork and every measurement.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from lab.sockets.base import EXIT_BIND, EXIT_FATAL, EXIT_USAGE, BindError
from lab.sockets.config import ConfigError, ServerConfig, parse
from lab.sockets.designs import DESIGNS
from lab.sockets.services import prepare


def configure(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """Options from the command line and LAB_* variables, checked (raises ConfigError)."""
    config = parse(argv, environ, list(DESIGNS))
    DESIGNS[config.design].check_config(config)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        config = configure(args, os.environ)
        prepare(config)  # the kv database, made before any worker exists (lab.sockets.services)
    except ConfigError as exc:
        print(f"lab serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    server = DESIGNS[config.design](config)
    try:
        return server.serve_forever()
    except BindError as exc:
        print(f"lab serve: error: {exc}", file=sys.stderr)
        return EXIT_BIND
    except OSError as exc:
        print(f"lab serve: error: {exc}", file=sys.stderr)
        return EXIT_FATAL
