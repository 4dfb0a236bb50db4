"""Server options: one definition serves the command line, the environment and validation.

Every option is a field of :class:`ServerConfig`; its metadata gives the flag's help text. Each
option also reads an environment variable named ``LAB_<FIELD>`` (``LAB_DESIGN``, ``LAB_PORT``,
``LAB_BACKLOG``, ``LAB_WORKERS`` …): containers configure the server that way. A flag given on
the command line wins over the environment.

Parsing errors are :class:`ConfigError` with one line that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

DEFAULT_PORT = 12345  # the original chapter's SERVER_PORT
MAX_POOL = 1024  # upper bound on --workers/--max-workers/--max-children (and the pids limit)


class ConfigError(Exception):
    """A bad option value: the message is one line naming the problem and the fix."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerConfig:
    design: str = _opt("iterative", "server design (see `lab designs`)")
    host: str = _opt("0.0.0.0", "address to listen on (:: for IPv6)")
    port: int = _opt(DEFAULT_PORT, "TCP port (0 = any free port, printed in the ready line)")
    backlog: int | None = _opt(None, "listen backlog (default: 5 for iterative, 128 otherwise)")
    workers: int | None = _opt(None, "pool size for pool designs (default: number of CPUs)")
    max_workers: int | None = _opt(None, "sendmsg: largest pool under load (default: 4 × workers)")
    worker_idle: float = _opt(10.0, "sendmsg: seconds an extra worker idles before it exits")
    max_children: int = _opt(256, "fork/spawn: most children at once; at the cap, stop accepting")
    worker_cmd: str | None = _opt(None, "spawn: inetd-style program to run per connection")
    connections: int = _opt(0, "serve this many connections, then exit 0 (0 = until stopped)")
    idle_timeout: float = _opt(60.0, "close a connection with no progress for this many seconds")
    grace: float = _opt(10.0, "on SIGTERM/SIGINT, seconds in-flight connections may finish")
    trace: bool = _opt(False, "log every socket call, as the original programs do")
    health_port: int = _opt(0, "answer health probes on this port, counted apart (0 = off)")

    def resolved_backlog(self, design_default: int) -> int:
        return self.backlog if self.backlog is not None else design_default

    @property
    def pool_size(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)

    @property
    def pool_max(self) -> int:
        if self.max_workers is not None:
            return self.max_workers
        return min(MAX_POOL, 4 * self.pool_size)

    def worker_argv(self) -> list[str] | None:
        """``--worker-cmd`` as argv, its program resolved on PATH once (not per spawn)."""
        if not self.worker_cmd:
            return None
        argv = shlex.split(self.worker_cmd)
        program = shutil.which(argv[0])
        if program is None:
            raise ConfigError(f"--worker-cmd: program {argv[0]!r} not found on PATH")
        return [program, *argv[1:]]

    def validate(self, designs: Sequence[str]) -> None:
        if self.design not in designs:
            raise ConfigError(
                f"unknown design {self.design!r}: choose one of {', '.join(designs)} "
                "(`lab designs` explains each)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: choose a port from 0 to 65535")
        if not 0 <= self.health_port <= 65535 or (
            self.health_port and self.health_port == self.port
        ):
            raise ConfigError(
                f"--health-port {self.health_port}: choose a port from 1 to 65535 other than "
                "--port, or 0 for none"
            )
        if self.backlog is not None and self.backlog < 1:
            raise ConfigError(f"--backlog {self.backlog}: the listen backlog must be at least 1")
        for name in ("workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_POOL:
                raise ConfigError(f"--{_flag(name)} {value}: choose from 1 to {MAX_POOL}")
        if not 1 <= self.max_children <= MAX_POOL:
            raise ConfigError(f"--max-children {self.max_children}: choose from 1 to {MAX_POOL}")
        for name in ("worker_idle", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)}: give a number of seconds above 0")
        if self.grace < 0:
            raise ConfigError("--grace: give a number of seconds, 0 or more")
        if self.connections < 0:
            raise ConfigError("--connections: give 0 (serve until stopped) or a positive count")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return "LAB_" + name.upper()


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; we want one line that names the fix."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _converter(kind: str, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            if kind == "bool":
                lowered = text.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(text)
            return {"int": int, "float": float, "str": str}[kind](text)
        except ValueError:
            raise ConfigError(
                f"--{_flag(name)} / {env_name(name)}: {text!r} is not a valid {kind}"
            ) from None

    return convert


def _kind(f: dataclasses.Field[Any]) -> str:
    text = str(f.type)
    for kind in ("bool", "int", "float", "str"):
        if text.startswith(kind):
            return kind
    raise TypeError(f"unsupported option type {f.type!r}")


def build_parser(prog: str = "lab serve") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="Run one server design (echo service). Every option also reads LAB_<NAME>.",
    )
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + _flag(f.name)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]"
        if _kind(f) == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, type=_converter(_kind(f), f.name), default=None, help=help_text
            )
    return parser


def parse(argv: Sequence[str], environ: Mapping[str, str], designs: Sequence[str]) -> ServerConfig:
    """Command line over environment over defaults; validated. Raises ConfigError."""
    args = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if args[f.name] is not None:
            values[f.name] = args[f.name]
        elif environ.get(env_name(f.name), "") != "":
            values[f.name] = _converter(_kind(f), f.name)(environ[env_name(f.name)])
    config = ServerConfig(**values)
    config.validate(designs)
    return config


def to_argv(config: ServerConfig) -> list[str]:
    """The command line that reproduces ``config`` (the CLI execs the server with it)."""
    argv: list[str] = []
    for f in dataclasses.fields(ServerConfig):
        value = getattr(config, f.name)
        if value is None or value == f.default:
            continue
        if value is True:
            argv.append("--" + _flag(f.name))
        else:
            argv += ["--" + _flag(f.name), str(value)]
    return argv
