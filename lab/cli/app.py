"""The ``lab`` command: the root Typer app; each command lives in its own module.

Single commands are registered here with one line each; command groups (later issues) are
their own ``typer.Typer()`` added with ``app.add_typer``.
"""

from __future__ import annotations

import typer

from lab.cli import client, designs, serve

app = typer.Typer(
    name="lab",
    help="The server-design lab: classic TCP server designs, run side by side and measured.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("serve", **serve.COMMAND_SETTINGS)(serve.serve)
app.command("client")(client.client)
app.command("designs")(designs.designs)


def main() -> None:
    app()
