"""The ``lab`` command: the root Typer app; each command lives in its own module.

Single commands are registered here with one line each; command groups (later issues) are
their own ``typer.Typer()`` added with ``app.add_typer``.
"""

from __future__ import annotations

import typer

from lab.cli import bench, client, compare, designs, fault, load, serve, soak, stack

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
app.command("up")(stack.up)
app.command("down")(stack.down)
app.command("status")(stack.status)
app.command("logs")(stack.logs)
app.command("switch")(stack.switch)
app.command("exec-client")(stack.exec_client)
app.command("load")(load.load)
app.command("bench")(bench.bench)
app.command("compare")(compare.compare)
app.command("report")(compare.report)
app.command("soak")(soak.soak)
app.add_typer(fault.app, name="fault")


def main() -> None:
    """The console script: usage errors become one line naming the fix, never a box or a
    traceback."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # a usage error: bad option, unknown command …
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "lab"
        hint = f" (see `{command} --help`)" if exc.exit_code == 2 else ""
        typer.echo(f"{command}: error: {exc.format_message()}{hint}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # Ctrl-C at a prompt
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
