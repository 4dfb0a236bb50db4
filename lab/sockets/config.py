"""Server options: one definition serves the command line, the environment and validation.

Every option is one entry of :data:`OPTIONS` (name, kind, default, help) and an attribute of
:class:`ServerConfig`. Each option also reads an environment variable named ``LAB_<NAME>``
(``LAB_DESIGN``, ``LAB_PORT``, ``LAB_BACKLOG``, ``LAB_WORKERS`` …): containers configure the
server that way. A flag given on the command line wins over the environment.

Parsing errors are :class:`ConfigError` with one line that names the problem and the fix.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence
    from typing import Any, NoReturn

DEFAULT_PORT = 12345  # the original chapter's SERVER_PORT
MAX_POOL = 1024  # upper bound on --workers/--max-workers/--max-children (and the pids limit)
SERVICES = ("echo", "kv")  # --service: lab.sockets.services serves them
DEFAULT_DB = "lab-kv.sqlite3"  # --service kv without --db: this file in the current directory


class ConfigError(Exception):
    """A bad option value: the message is one line naming the problem and the fix."""


class Option:
    """One option: its name (the field, ``--flag`` and ``LAB_NAME``), kind, default and help."""

    __slots__ = ("default", "help", "kind", "name")

    def __init__(self, name: str, kind: str, default: Any, help: str) -> None:
        self.name, self.kind, self.default, self.help = name, kind, default, help


# The one table every option comes from. (No dataclasses here: the server process imports as
# little as it can — see lab.sockets.designs — and dataclasses brings inspect, ast, re …)
OPTIONS = (
    Option("design", "str", "iterative", "server design (see `lab designs`)"),
    Option("host", "str", "0.0.0.0", "address to listen on (:: for IPv6)"),
    Option("port", "int", DEFAULT_PORT, "TCP port (0 = any free port, printed in the ready line)"),
    Option("backlog", "int?", None, "listen backlog (default: 5 for iterative, 128 otherwise)"),
    Option("workers", "int?", None, "pool size for pool designs (default: number of CPUs)"),
    Option("max_workers", "int?", None, "sendmsg: largest pool under load (default: 4 × workers)"),
    Option("worker_idle", "float", 10.0, "sendmsg: seconds an extra worker idles before it exits"),
    Option(
        "max_children", "int", 256, "fork/spawn: most children at once; at the cap, stop accepting"
    ),
    Option("worker_cmd", "str?", None, "spawn: inetd-style program to run per connection"),
    Option(
        "max_threads",
        "int",
        256,
        "thread: most connection threads at once; at the cap, stop accepting",
    ),
    Option(
        "accept_lock",
        "str",
        "none",
        "multi-accept/prethread-accept: a lock around accept() (none, flock, sem; mutex)",
    ),
    Option("loop", "str", "asyncio", "asyncio: the event loop (asyncio, or uvloop when installed)"),
    Option("connections", "int", 0, "serve this many connections, then exit 0 (0 = until stopped)"),
    Option(
        "idle_timeout", "float", 60.0, "close a connection with no progress for this many seconds"
    ),
    Option("grace", "float", 10.0, "on SIGTERM/SIGINT, seconds in-flight connections may finish"),
    Option("trace", "bool", False, "log every socket call, as the original programs do"),
    Option("health_port", "int", 0, "answer health probes on this port, counted apart (0 = off)"),
    Option("service", "str", "echo", "what a connection gets: echo, or kv (docs/kv.md)"),
    Option("db", "str?", None, f"kv: the SQLite file (default ./{DEFAULT_DB}, created if missing)"),
)


class ServerConfig:
    """The server's options, immutable; ``ServerConfig(port=0, …)``, defaults from OPTIONS."""

    __slots__ = tuple(o.name for o in OPTIONS)
    design: str
    host: str
    port: int
    backlog: int | None
    workers: int | None
    max_workers: int | None
    worker_idle: float
    max_children: int
    worker_cmd: str | None
    max_threads: int
    accept_lock: str
    loop: str
    connections: int
    idle_timeout: float
    grace: float
    trace: bool
    health_port: int
    service: str
    db: str | None

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        for option in OPTIONS:
            object.__setattr__(self, option.name, values.get(option.name, option.default))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ServerConfig is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerConfig) and all(
            getattr(self, o.name) == getattr(other, o.name) for o in OPTIONS
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, o.name) for o in OPTIONS))

    def __repr__(self) -> str:
        shown = ", ".join(f"{o.name}={getattr(self, o.name)!r}" for o in OPTIONS)
        return f"ServerConfig({shown})"

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

    @property
    def db_path(self) -> str:
        """--db (or the default) as an absolute path: a worker program started elsewhere, or a
        process that changes directory, still opens the same file."""
        return os.path.abspath(self.db if self.db is not None else DEFAULT_DB)

    def worker_argv(self) -> list[str] | None:
        """``--worker-cmd`` as argv, its program resolved on PATH once (not per spawn)."""
        if not self.worker_cmd:
            return None
        import shlex  # only for spawn's --worker-cmd (shlex brings re)

        argv = shlex.split(self.worker_cmd)
        program = _which(argv[0])
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
        if not 1 <= self.max_threads <= MAX_POOL:
            raise ConfigError(f"--max-threads {self.max_threads}: choose from 1 to {MAX_POOL}")
        for name in ("worker_idle", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)}: give a number of seconds above 0")
        if self.grace < 0:
            raise ConfigError("--grace: give a number of seconds, 0 or more")
        if self.connections < 0:
            raise ConfigError("--connections: give 0 (serve until stopped) or a positive count")
        if self.service not in SERVICES:
            raise ConfigError(f"--service {self.service!r}: choose {' or '.join(SERVICES)}")
        if self.db is not None and self.service != "kv":
            raise ConfigError(
                "--db applies only to --service kv: add --service kv, or drop --db / LAB_DB"
            )
        if self.db == "":
            raise ConfigError("--db: give the path of the SQLite file")


def _which(program: str) -> str | None:
    """``shutil.which`` without importing shutil (and the compressors it brings)."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) and not os.path.isdir(program) else None
    for folder in os.get_exec_path():
        path = os.path.join(folder, program)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return "LAB_" + name.upper()


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


def _base(kind: str) -> str:
    return kind.rstrip("?")


def build_parser(prog: str = "lab serve") -> argparse.ArgumentParser:
    """argparse, for --help and for every command line :func:`_plain_args` does not take."""
    import argparse

    class _OneLineParser(argparse.ArgumentParser):
        """argparse prints usage plus a message; we want one line that names the fix."""

        def error(self, message: str) -> NoReturn:
            raise ConfigError(f"{message} (see `{self.prog} --help`)")

    parser = _OneLineParser(
        prog=prog,
        description=(
            "Run one server design (echo or kv service). Every option also reads LAB_<NAME>."
        ),
    )
    for option in OPTIONS:
        flag = "--" + _flag(option.name)
        help_text = f"{option.help} [env {env_name(option.name)}]"
        if option.kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, type=_converter(_base(option.kind), option.name), default=None, help=help_text
            )
    return parser


_BY_FLAG = {_flag(option.name): option for option in OPTIONS}


def _plain_args(argv: Sequence[str]) -> dict[str, Any] | None:
    """The usual command line — ``--name value``, ``--name=value``, ``--flag`` — read without
    argparse, which a server process would otherwise carry (with re, gettext, shutil and the
    compressors shutil imports) into every fork. None: anything else (help, an unknown or
    abbreviated option, a missing value), for argparse to handle and word the error."""
    values: dict[str, Any] = {option.name: None for option in OPTIONS}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].removeprefix("--").partition("=")
        option = _BY_FLAG.get(name) if argv[i].startswith("--") else None
        if option is None:
            return None
        i += 1
        if option.kind == "bool":
            if eq:
                return None
            values[option.name] = True
            continue
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                return None
            value, i = argv[i], i + 1
        values[option.name] = _converter(_base(option.kind), option.name)(value)
    return values


def parse(argv: Sequence[str], environ: Mapping[str, str], designs: Sequence[str]) -> ServerConfig:
    """Command line over environment over defaults; validated. Raises ConfigError."""
    args = _plain_args(argv)
    if args is None:
        args = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if args[option.name] is not None:
            values[option.name] = args[option.name]
        elif environ.get(env_name(option.name), "") != "":
            convert = _converter(_base(option.kind), option.name)
            values[option.name] = convert(environ[env_name(option.name)])
    config = ServerConfig(**values)
    config.validate(designs)
    return config


def to_argv(config: ServerConfig) -> list[str]:
    """The command line that reproduces ``config`` (the CLI execs the server with it)."""
    argv: list[str] = []
    for option in OPTIONS:
        value = getattr(config, option.name)
        if value is None or value == option.default:
            continue
        if value is True:
            argv.append("--" + _flag(option.name))
        else:
            argv += ["--" + _flag(option.name), str(value)]
    return argv
