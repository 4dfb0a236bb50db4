"""Turning a LabError into the one line a user sees, and a non-zero exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer

T = TypeVar("T")


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """``with user_errors("lab up"): …`` — a LabError prints one line and exits 1."""
    from lab.orchestration.engine import LabError

    try:
        yield
    except LabError as exc:
        typer.echo(f"{command}: error: {exc}", err=True)
        raise typer.Exit(1) from None


def guarded(command: str, action: Callable[[], T]) -> T:
    with user_errors(command):
        return action()
