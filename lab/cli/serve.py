"""``lab serve``: validate the server options, then exec the stdlib-only server.

The options are defined once, in :mod:`lab.sockets.config` (each also reads ``LAB_<NAME>``), so
Typer passes the arguments through untouched and ``lab serve --help`` is that parser's help.
Exec'ing (not importing and calling) keeps Typer and rich out of every server process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from lab.sockets.config import ConfigError
from lab.sockets.serve import configure

COMMAND_SETTINGS: dict[str, Any] = {
    "help": "Run one server design (the echo or kv service). `lab serve --help` lists its options.",
    "add_help_option": False,
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
}


def serve(ctx: typer.Context) -> None:
    _serve(list(ctx.args))


def _serve(args: list[str]) -> None:
    if not {"-h", "--help"} & set(args):
        try:
            configure(args, os.environ)
        except ConfigError as exc:
            typer.echo(f"lab serve: error: {exc}", err=True)
            raise typer.Exit(2) from None
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "lab.sockets", *args])
