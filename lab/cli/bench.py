"""``lab bench``: one design (or peer) under load, and what it cost the server.

Runs on the containerised lab by default (server container + every client container as a
loader), or with ``--local`` as local processes on loopback (no Docker). The work is
:func:`lab.measure.bench.bench`; this module picks the backend, shows progress, prints a table
(or ``--json``). ``--server-cmd`` measures a user's own server instead (lab.measure.usercmd).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lab.cli.errors import user_errors
from lab.cli.kvoptions import Distribution, Keys, Mix

if TYPE_CHECKING:
    from lab.measure.bench import ServerSpec
    from lab.measure.faultbench import FaultRun, FaultSpec

console = Console(width=None if sys.stdout.isatty() else 160, stderr=False)


def bench(
    ctx: typer.Context,
    design: Annotated[
        str,
        typer.Option(help="a design, or a peer (peer-threading …)", envvar="LAB_DESIGN"),
    ] = "iterative",
    workload: Annotated[
        str,
        typer.Option(
            help="connect-per-request, persistent, or kv (the design serves --service kv: "
            "commands of --mix on a database, every acknowledged INCR checked at the end)"
        ),
    ] = "connect-per-request",
    concurrency: Annotated[int, typer.Option(min=1, help="connections in flight, in all")] = 8,
    duration: Annotated[float, typer.Option(min=0.1, help="measured seconds")] = 5.0,
    warmup: Annotated[float, typer.Option(min=0.0, help="seconds before measuring")] = 1.0,
    size: Annotated[str, typer.Option(help="message size: 49, 1k, 64k …")] = "49",
    per_connection: Annotated[
        int | None, typer.Option(help="persistent, kv: messages per connection")
    ] = None,
    mix: Mix = None,
    keys: Keys = None,
    distribution: Distribution = None,
    db: Annotated[
        Path | None,
        typer.Option(
            help="kv with --local: the SQLite file the design serves (default: a new one, "
            "removed afterwards); the containers keep theirs on the lab's data volume"
        ),
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="open loop: requests per second, in all")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="pool size (equal for fair comparisons)", envvar="LAB_WORKERS"),
    ] = None,
    processes: Annotated[
        int | None, typer.Option(min=1, help="loader processes per loader host")
    ] = None,
    local: Annotated[bool, typer.Option(help="local processes on loopback, no Docker")] = False,
    pin: Annotated[
        bool, typer.Option(help="the server on core 0, the loaders on core 1 (two cores or more)")
    ] = False,
    server_cmd: Annotated[
        str | None,
        typer.Option(
            help="measure your own echo server instead: its command line, with {port} where it "
            "takes the port the lab chooses (and {host}, the address, if it takes one)",
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="--server-cmd: its name in the results")] = "user",
    mount: Annotated[
        list[Path] | None,
        typer.Option(
            help="--server-cmd in the containers: a host file or folder it needs, mounted "
            "read-only at the same path (repeatable; the container starts in the current "
            "folder when it is mounted, e.g. --mount .)",
        ),
    ] = None,
    fault: Annotated[
        str | None,
        typer.Option(
            help="inject a fault mid-run: kill-worker[:TERM|SEGV], pause, delay:MS[:JITTER], "
            "stall, loss:PCT, rate:KBIT, partition, switch:DESIGN; @N after a network fault "
            "picks client N (e.g. delay:200@1)",
        ),
    ] = None,
    at: Annotated[
        float, typer.Option(min=0.0, help="--fault: seconds into the measured window")
    ] = 1.0,
    fault_for: Annotated[
        float, typer.Option(min=0.1, help="--fault: how long it lasts (a kill is an instant)")
    ] = 1.0,
    on_swarm: Annotated[
        bool,
        typer.Option(
            "--swarm",
            help="the lab deployed on Docker Swarm (`lab up --swarm`): load from every client task",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """Load one design (or peer, or your own server) and measure it: throughput, latency,
    server CPU and memory (with --fault: what a fault did to it)."""
    if on_swarm:
        if local:
            raise typer.BadParameter("--swarm and --local: choose one")
        _require_swarm()
    spec = _server_spec(ctx, design, workers, server_cmd, name, mount or [])
    if db is not None:
        spec = _with_database(spec, db, local)
    injected = _fault_spec(fault, fault_for, at, duration, spec.design, local) if fault else None
    result = _bench(
        spec,
        workload,
        concurrency,
        duration,
        warmup,
        size,
        per_connection,
        rate,
        processes,
        local,
        pin,
        (mix, keys, distribution),
        (injected, at),
    )
    if on_swarm:
        result["swarm"] = _placement()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(result_table([result]))
        if on_swarm:
            typer.echo(f"tasks: {result['swarm']['tasks']}")
        if "fault" in result:
            from lab.measure.faultbench import FaultRun

            for line in fault_lines(FaultRun(**result["fault"])):
                typer.echo(line)
    dropped = result["server"].get("conntrack_drops", 0)
    if dropped:
        typer.echo(
            f"lab: the kernel dropped {dropped:,} packets of this run because its "
            "connection-tracking table was full: the figures measure that table, not the server "
            "— rerun after 2 minutes, or raise net.netfilter.nf_conntrack_max",
            err=True,
        )
    verdict = result.get("kv_check")
    if verdict is not None:
        from lab.measure.kvcheck import KvCheck

        check = KvCheck(**verdict)
        typer.echo(check.line, err=not check.ok)
        if not check.ok:
            raise typer.Exit(1)


def _fault_spec(
    text: str, seconds: float, at: float, duration: float, design: str, local: bool
) -> FaultSpec:
    """``--fault`` parsed and checked against ``--at``, the design and the backend (one line,
    exit 2)."""
    from lab.measure.faultbench import FaultError, check_applies, check_at, parse_fault

    try:
        fault = parse_fault(text, seconds)
        check_at(at, duration)
        check_applies(fault, design, containers=not local)
    except FaultError as exc:
        typer.echo(f"lab bench: error: {exc}", err=True)
        raise typer.Exit(2) from None
    return fault


def fault_lines(run: FaultRun) -> list[str]:
    """What a fault did, for people: a line each."""
    if run.error:
        return [f"fault {run.fault}: not in place — {run.error}"]
    errors = ", ".join(f"{kind} {count:,}" for kind, count in sorted(run.errors.items()))
    back = (
        f"back after {run.recovery_s:.1f} s"
        if run.recovery_s is not None
        else "not back by the end of the run"
    )
    return [
        f"fault {run.fault} at {run.at_s:.1f} s: {run.said}",
        f"  throughput {run.before_rps:,.0f}/s before, {run.during_rps:,.0f}/s during; {back}",
        f"  lost {run.lost:,} of {run.in_flight:,} in flight ({errors or 'no error'}); "
        + ("every echo verified" if run.verified else "CORRUPTED ECHOES"),
    ]


def _with_database(spec: ServerSpec, db: Path, local: bool) -> ServerSpec:
    """The design with ``--db``: only a local design takes one (one line, exit 2 otherwise)."""
    from dataclasses import replace

    if not local:
        problem = "the containers keep the database on the lab's data volume: drop --db"
    elif spec.command or spec.peer:
        problem = f"{spec.design} is not one of the lab's designs: --db is for those"
    elif not db.parent.is_dir():
        problem = f"--db {db}: no folder {db.parent} — create it, or choose another path"
    else:
        return replace(spec, options=(*spec.options, "--db", str(db)))
    typer.echo(f"lab bench: error: {problem}", err=True)
    raise typer.Exit(2)


def _server_spec(
    ctx: typer.Context,
    design: str,
    workers: int | None,
    server_cmd: str | None,
    name: str,
    mounts: list[Path],
) -> ServerSpec:
    """What to measure: a design, a peer, or the user's command (checked: one line, exit 2)."""
    from lab.measure.bench import ServerSpec
    from lab.measure.compare import all_servers
    from lab.measure.peers import PEERS
    from lab.measure.usercmd import UserServerError, check_name, parse_command, resolve_mounts
    from lab.sockets.designs import DESIGNS

    def given(option: str) -> bool:
        source = ctx.get_parameter_source(option)  # given, not a default nor LAB_DESIGN
        return getattr(source, "name", None) == "COMMANDLINE"

    try:
        if server_cmd is None:
            for option in ("name", "mount"):
                if given(option):
                    raise UserServerError(f"--{option} is for --server-cmd: give one, or drop it")
            spec = ServerSpec(design, ("--workers", str(workers)) if workers else ())
            if design not in DESIGNS and spec.peer is None:
                names = [*DESIGNS, *(f"peer-{peer}" for peer in PEERS)]
                raise UserServerError(
                    f"unknown design {design!r}: choose one of {', '.join(names)}"
                )
            return spec
        if given("design"):
            raise UserServerError(
                "--design and --server-cmd each name the server to measure: give one "
                "(--name names yours)"
            )
        parse_command(server_cmd)
        taken = [*all_servers(), *PEERS]
        return ServerSpec(
            check_name(name, taken, "--name"), command=server_cmd, mounts=resolve_mounts(mounts)
        )
    except UserServerError as exc:
        typer.echo(f"lab bench: error: {exc}", err=True)
        raise typer.Exit(2) from None


def _require_swarm() -> None:
    from lab.orchestration import stack

    with user_errors("lab bench"):
        stack.require_swarm()


def _placement() -> dict[str, str]:
    from lab.orchestration.bench import placement
    from lab.orchestration.engine import PROJECT, client

    with user_errors("lab bench"):
        return placement(client(), PROJECT)


def _bench(
    spec: ServerSpec,
    workload: str,
    concurrency: int,
    duration: float,
    warmup: float,
    size: str,
    per_connection: int | None,
    rate: float | None,
    processes: int | None,
    local: bool,
    pin: bool,
    kv: tuple[str | None, int | None, str | None],
    fault: tuple[FaultSpec | None, float] = (None, 0.0),
) -> dict[str, Any]:
    from lab.measure.bench import BenchError, LocalBackend, bench
    from lab.measure.config import make_config
    from lab.measure.errors import LoadError

    with user_errors("lab bench"):
        try:
            config = make_config(
                "127.0.0.1",
                port=1,
                workload=workload,
                per_connection=per_connection,
                size=size,
                concurrency=concurrency,
                rate=rate,
                duration=duration,
                warmup=warmup,
                processes=processes or (1 if local else None),
                mix=kv[0],
                keys=kv[1],
                distribution=kv[2],
            )
            with console.status(f"benchmarking {spec.design}…"):
                if local:
                    backend: Any = LocalBackend(pin=pin)
                else:
                    from lab.orchestration.bench import DockerBackend

                    backend = DockerBackend(pin=pin)
                return bench(backend, spec, config, fault[0], fault[1]).to_dict()
        except (BenchError, LoadError) as exc:
            typer.echo(f"lab bench: error: {exc}", err=True)
            raise typer.Exit(1) from None


def result_table(results: list[dict[str, Any]]) -> Table:
    table = Table(
        "design",
        "backend",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "errors",
        "starved",
        "server CPU ms/msg",
        "ms/conn",
        "server MiB",
        "overflows",
        "per-worker",
        "loader-bound",
    )
    for r in results:
        load, server = r["load"], r["server"]
        latency = load["latency_us"]
        per_1000 = server["cpu_s_per_1000"]
        per_conn = server.get("cpu_s_per_1000_connections")
        per_worker = sorted((server["stats"].get("per_worker") or {}).values(), reverse=True)
        table.add_row(
            r["design"],
            r["backend"],
            f"{load['throughput_rps']:,.0f}",
            *(f"{latency.get(k, 0):,}" for k in ("p50", "p99", "p99.9", "max")),
            str(load["errors_total"]),
            str(load["starved"]["connections"]),
            "-" if per_1000 is None else f"{per_1000:.3f}",
            "-" if per_conn is None else f"{per_conn:.3f}",
            f"{server['memory_peak_bytes'] / 2**20:.1f}",
            str(server["listen_overflows"]),
            " ".join(map(str, per_worker)) or "-",
            "LOADER-BOUND" if load["loader_bound"] else "no",
        )
    return table
