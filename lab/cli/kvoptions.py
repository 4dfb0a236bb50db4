"""The kv workload's options, declared once for every command that runs it (``lab load``,
``lab bench``)."""

from __future__ import annotations

from typing import Annotated

import typer

from lab.measure import config as cfg

Mix = Annotated[
    str | None,
    typer.Option(
        "--mix",
        help=f"kv: the commands' shares, e.g. {cfg.DEFAULT_MIX} (of {', '.join(cfg.KV_OPS)}).",
        envvar="LAB_LOAD_MIX",
        show_default=False,
    ),
]
Keys = Annotated[
    int | None,
    typer.Option(
        "--keys",
        help=f"kv: how many keys the commands spread over (default {cfg.DEFAULT_KEYS}).",
        envvar="LAB_LOAD_KEYS",
        show_default=False,
    ),
]
Distribution = Annotated[
    str | None,
    typer.Option(
        "--distribution",
        help="kv: how a key is picked: uniform (default), zipf (the k-th key 1/k as likely as "
        "the first), or zipf:S (1/k^S).",
        envvar="LAB_LOAD_DISTRIBUTION",
        show_default=False,
    ),
]
