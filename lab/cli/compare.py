"""``lab compare`` (the sweep, the report) and ``lab report`` (render again, or compare runs)."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lab.cli.errors import user_errors
from lab.cli.kvoptions import Distribution, Keys, Mix

if TYPE_CHECKING:
    from lab.measure.compare import Step

console = Console(width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def progress_display(out: Console) -> Iterator[Callable[[Step], None]]:
    """How a sweep shows where it is. On a terminal: one live bar — cells done of all, cells
    left, the time left, and what runs now. Anywhere else (piped, CI): one plain line per cell,
    as it starts."""
    if not out.is_terminal:
        yield lambda step: out.print(step.line, markup=False, highlight=False, soft_wrap=True)
        return
    columns = (
        SpinnerColumn(),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[left]} left"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=out) as bar:
        task = bar.add_task("starting…", total=None, left="?")

        def show(step: Step) -> None:
            left = step.total - step.done
            bar.update(
                task, total=step.total, completed=step.done, description=step.what, left=left
            )

        yield show
        total = bar.tasks[0].total
        bar.update(task, completed=total, left=0, description="done")


def _csv(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _kv_settings(matrix: Any, mix: str | None, keys: int | None, distribution: str | None) -> None:
    """The kv workload's settings into ``matrix``, checked as a load run checks them (a
    ConfigError: one line); refused when kv is not among the workloads."""
    from lab.measure.bench import BenchError
    from lab.measure.config import make_config
    from lab.measure.errors import ConfigError

    if all(v is None for v in (mix, keys, distribution)):
        return
    if "kv" not in matrix.workloads:
        raise BenchError(
            "--mix, --keys and --distribution are for the kv workload: add --workload kv"
        )
    try:
        config = make_config(
            "127.0.0.1", workload="kv", mix=mix, keys=keys, distribution=distribution
        )
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    matrix.mix, matrix.keys, matrix.distribution = config.mix, config.keys, config.distribution


def _kv_arguments(matrix: Any) -> list[str]:
    return ["--mix", matrix.mix, "--keys", str(matrix.keys), "--distribution", matrix.distribution]


def compare(
    designs: Annotated[
        str | None, typer.Option(help="comma-separated (default: every design, variant, peer)")
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            help="a few minutes: the chapter's designs, fork, spawn+cat, C peers; 3 repeats"
        ),
    ] = False,
    local: Annotated[bool, typer.Option(help="local processes on loopback, no Docker")] = False,
    workload: Annotated[
        str | None,
        typer.Option(
            help="comma-separated: connect-per-request, persistent, kv (default: the first two; "
            "kv alone adds the database-backed worker to them, for the designs only: peers echo)"
        ),
    ] = None,
    mix: Mix = None,
    keys: Keys = None,
    distribution: Distribution = None,
    concurrency: Annotated[str | None, typer.Option(help="sweep, e.g. 1,8,64,256")] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="runs per cell")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="measured seconds")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="workers of every pool design", envvar="LAB_WORKERS")
    ] = 2,
    latency_curve: Annotated[
        str | None,
        typer.Option(
            help="comma-separated: also run these open loop at 25, 50, 75 and 90 % of each "
            "one's closed-loop maximum, and plot p50/p99 against the offered load"
        ),
    ] = None,
    experiments: Annotated[
        bool | None,
        typer.Option(
            "--experiments/--no-experiments",
            help="also: sequential connections across 3 workers, idle connections held, pool "
            "sizes 1, 2, 4 (default: on, off with --quick)",
        ),
    ] = None,
    robustness: Annotated[
        bool,
        typer.Option(
            help="also: the robustness battery (`lab soak`'s, local) and fault benches (a "
            "worker killed; in the containers one slow client) for the lab's designs"
        ),
    ] = False,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME='CMD … {port}': your own echo server too, run and measured as a peer is "
            "(repeatable; {port} is the port the lab chooses, {host} the address)",
        ),
    ] = None,
    mount: Annotated[
        list[Path] | None,
        typer.Option(
            help="--peer in the containers: a host file or folder it needs, mounted read-only "
            "at the same path (repeatable; e.g. --mount .)",
        ),
    ] = None,
    on_swarm: Annotated[
        bool,
        typer.Option(
            "--swarm",
            help="the lab deployed on Docker Swarm (`lab up --swarm`): the lab's designs only "
            "(peers run in the compose lab), loaded from every client task",
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="results folder", envvar="LAB_RESULTS")] = Path(
        "results"
    ),
) -> None:
    """Every design × both workloads × a concurrency sweep, repeated; then the report."""
    from lab.measure import compare as sweep
    from lab.measure.bench import BenchError, LocalBackend
    from lab.measure.usercmd import UserServerError
    from lab.sockets.designs import DESIGNS

    user, mounts = _user_servers(peer or [], mount or [])
    with user_errors("lab compare"):
        if on_swarm:
            from lab.orchestration import stack

            if local:
                raise typer.BadParameter("--swarm and --local: choose one")
            stack.require_swarm()
            if experiments is None:
                experiments = False  # they need peers and local servers
        try:
            names = _csv(designs) or (sweep.quick_servers() if quick else sweep.all_servers())
            if on_swarm and not designs:
                names = [name for name in names if name in DESIGNS]
            names += [name for name in user if name not in names]
            sweep.check_servers(names, user)
            curve = _csv(latency_curve) or []
            sweep.check_servers(curve, user)
            matrix = (
                sweep.quick_matrix(names, workers)
                if quick
                else sweep.Matrix(names, workers=workers)
            )
            if workload:
                matrix.workloads = sweep.workloads(_csv(workload) or [])
            _kv_settings(matrix, mix, keys, distribution)
            if concurrency:
                matrix.concurrency = [int(c) for c in concurrency.split(",")]
            if repeats:
                matrix.repeats = repeats
            if duration:
                matrix.duration = duration
            matrix.latency_curve = curve
            matrix.user_servers, matrix.mounts = user, mounts
            # the full compare's experiments beside the sweep (not the quick one)
            matrix.experiments = (not quick) if experiments is None else experiments
            matrix.robustness = robustness
        except ValueError:
            raise typer.BadParameter("--concurrency: give numbers, e.g. 1,8,64") from None
        except BenchError as exc:
            raise typer.BadParameter(str(exc)) from None
        extra: dict[str, Any] = {"docker": None, "compose": None, "image": None}
        if local:

            def make_backend() -> Any:
                return LocalBackend(keep=True)
        else:
            from lab.orchestration.bench import DockerBackend, describe

            extra = describe()

            def make_backend() -> Any:
                return DockerBackend()

        command = shlex.join(
            [
                "lab",
                "compare",
                "--designs",
                ",".join(matrix.designs),
                "--concurrency",
                ",".join(map(str, matrix.concurrency)),
                "--repeats",
                str(matrix.repeats),
                "--duration",
                str(matrix.duration),
                "--workers",
                str(matrix.workers),
                *(["--workload", ",".join(matrix.workloads)] if workload else []),
                *(_kv_arguments(matrix) if "kv" in matrix.workloads else []),
                *(["--latency-curve", ",".join(curve)] if curve else []),
                *(arg for name, cmd in user.items() for arg in ("--peer", f"{name}={cmd}")),
                *(arg for path in mounts for arg in ("--mount", path)),
                *(["--quick"] if quick else []),
                *(["--no-experiments"] if not quick and not matrix.experiments else []),
                *(["--experiments"] if quick and matrix.experiments else []),
                *(["--robustness"] if robustness else []),
                *(["--local"] if local else []),
                *(["--swarm"] if on_swarm else []),
            ]
        )
        with progress_display(console) as progress:
            try:
                results = sweep.compare(
                    make_backend,
                    matrix,
                    progress=progress,
                    environment=sweep.environment(Path.cwd(), extra),
                    command=command,
                    quick=quick,
                )
            except UserServerError as exc:  # a --peer that cannot start: before the sweep
                typer.echo(f"lab compare: error: {exc}", err=True)
                raise typer.Exit(1) from None
            path = sweep.save(results, out)
        _render(path.parent)


def _user_servers(peers: list[str], mounts: list[Path]) -> tuple[dict[str, str], list[str]]:
    """``--peer NAME=CMD`` options → {NAME: CMD}, and the ``--mount`` paths (checked: one line
    naming the fix, exit 2)."""
    from lab.measure.compare import all_servers
    from lab.measure.peers import PEERS
    from lab.measure.usercmd import UserServerError, parse_peer, resolve_mounts

    try:
        user: dict[str, str] = {}
        for text in peers:
            name, command = parse_peer(text, [*all_servers(), *PEERS, *user])
            user[name] = command
        if mounts and not user:
            raise UserServerError("--mount is for --peer NAME=CMD: give one, or drop it")
        return user, list(resolve_mounts(mounts))
    except UserServerError as exc:
        typer.echo(f"lab compare: error: {exc}", err=True)
        raise typer.Exit(2) from None


def report(
    folder: Annotated[Path | None, typer.Argument(help="a folder `lab compare` wrote")] = None,
    compare_runs: Annotated[
        tuple[str, str] | None, typer.Option("--compare", help="RUN_A RUN_B: what changed")
    ] = None,
    out: Annotated[Path, typer.Option(help="results folder", envvar="LAB_RESULTS")] = Path(
        "results"
    ),
) -> None:
    """Render a report again from saved results, or show what changed between two runs."""
    with user_errors("lab report"):
        if compare_runs is not None:
            _changes(out / "lab.sqlite", *compare_runs)
            return
        if folder is None:
            raise typer.BadParameter("give a results folder, or --compare RUN_A RUN_B")
        _render(folder)


def _render(folder: Path) -> None:
    from lab.measure import compare as sweep
    from lab.measure.bench import BenchError
    from lab.measure.report import render, summary_table

    try:
        results = sweep.load(folder)
    except BenchError as exc:
        typer.echo(f"lab report: error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        path = render(results, folder if folder.is_dir() else folder.parent)
    except ValueError as exc:  # a histogram that is not ours: the file was edited or damaged
        typer.echo(f"lab report: error: {folder}: {exc} — rerun `lab compare`", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary_table(results))
    typer.echo(f"\nthe report: {os.path.relpath(path)}")


def _changes(db: Path, run_a: str, run_b: str) -> None:
    from lab.measure import compare as sweep
    from lab.measure.bench import BenchError

    try:
        rows = sweep.changes(db, run_a, run_b)
    except BenchError as exc:
        typer.echo(f"lab report: error: {exc}", err=True)
        raise typer.Exit(1) from None
    table = Table(
        "design",
        "workload",
        "conc.",
        f"req/s {run_a}",
        f"req/s {run_b}",
        "×",
        "CPU ms/req A",
        "CPU ms/req B",
        "×",
    )
    for row in rows:
        rps, cpu = row["throughput_rps"], row["cpu_ms_per_request"]
        table.add_row(
            row["design"],
            row["workload"],
            str(row["concurrency"]),
            _num(rps["a"]),
            _num(rps["b"]),
            _ratio(rps["ratio"]),
            _num(cpu["a"], 3),
            _num(cpu["b"], 3),
            _ratio(cpu["ratio"]),
        )
    console.print(table)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
