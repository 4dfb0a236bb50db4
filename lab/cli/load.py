"""``lab load HOST``: drive an echo (or kv) server with many connections and measure it.

The work lives in :mod:`lab.measure`; this module turns options into a
:class:`~lab.measure.config.LoadConfig`, runs it, and prints the summary (or ``--json``). Any
user error — a bad option, a target that is not allowed or not there — is one line on stderr
and a non-zero exit code:

* 0 the run completed (its errors, if any, are in the report);
* 9 kv: the run completed, but the server's counters disagree with the INCRs it acknowledged;
* 1 a loader process failed; 2 bad option or target not allowed; 3 refused at start;
  4 no answer at start; 6 host not found; 8 other network error; 130 interrupted.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lab.cli.kvoptions import Distribution, Keys, Mix
from lab.measure import config as cfg
from lab.measure.errors import LoadError

_PROG = "lab load"


def load(
    host: Annotated[
        str,
        typer.Argument(
            help="The server: loopback, or a host on a subnet this machine is directly "
            "connected to (e.g. 127.0.0.1, or bakawali from a lab container)."
        ),
    ],
    port: Annotated[
        int, typer.Option("--port", "-p", help="Server TCP port.", envvar="LAB_PORT")
    ] = cfg.DEFAULT_PORT,
    workload: Annotated[
        str,
        typer.Option(
            "--workload",
            "-w",
            help="connect-per-request (connect, one message, close), persistent "
            "(K messages per connection, then reconnect), or kv (K commands of --mix per "
            "connection, to a server run with --service kv).",
            envvar="LAB_LOAD_WORKLOAD",
        ),
    ] = cfg.CONNECT_PER_REQUEST,
    per_connection: Annotated[
        int | None,
        typer.Option(
            "--per-connection",
            "-k",
            help=f"persistent, kv: messages per connection (default {cfg.DEFAULT_PER_CONNECTION}).",
            envvar="LAB_LOAD_PER_CONNECTION",
            show_default=False,
        ),
    ] = None,
    size: Annotated[
        str,
        typer.Option(
            "--size",
            "-s",
            help="Message size: bytes, or with a unit (1KiB, 64KiB). Random bytes, every echo "
            "verified. kv: a SET's value size.",
            envvar="LAB_LOAD_SIZE",
        ),
    ] = str(cfg.DEFAULT_SIZE),
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            help="Connections. Closed loop: each sends its next request when the last is back. "
            f"With --rate: the most in flight at once (default {cfg.DEFAULT_CONCURRENCY}).",
            envvar="LAB_LOAD_CONCURRENCY",
            show_default=False,
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            "-r",
            help="Open loop: requests per second in total, on a fixed schedule; latency counts "
            "from each request's intended send time.",
            envvar="LAB_LOAD_RATE",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "-P",
            help="Loader processes (default: the CPUs usable here, at most --concurrency).",
            envvar="LAB_LOAD_PROCESSES",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            "-d",
            help=f"Seconds measured, after the warm-up (at most {cfg.MAX_DURATION:g}).",
            envvar="LAB_LOAD_DURATION",
        ),
    ] = cfg.DEFAULT_DURATION,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests",
            "-n",
            help="Stop after this many measured requests (or --duration, whichever is first).",
            envvar="LAB_LOAD_REQUESTS",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        float,
        typer.Option(
            "--warmup", help="Seconds of load before measuring starts.", envvar="LAB_LOAD_WARMUP"
        ),
    ] = cfg.DEFAULT_WARMUP,
    start_at: Annotated[
        float | None,
        typer.Option(
            "--start-at",
            help="Absolute UNIX time at which every loader starts (give loaders in several "
            "containers the same one); default: as soon as all are ready.",
            envvar="LAB_LOAD_START_AT",
            show_default=False,
        ),
    ] = None,
    starve_after: Annotated[
        float,
        typer.Option(
            "--starve-after",
            help="A connection whose first echo takes longer than this many seconds is "
            "reported as starved.",
            envvar="LAB_LOAD_STARVE_AFTER",
        ),
    ] = cfg.DEFAULT_STARVE_AFTER,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds allowed for a connect, and for an echo under way to make progress.",
            envvar="LAB_TIMEOUT",
        ),
    ] = cfg.DEFAULT_TIMEOUT,
    mix: Mix = None,
    keys: Keys = None,
    distribution: Distribution = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object (histograms encoded) instead."),
    ] = False,
) -> None:
    """Load an echo server (or a kv server: --workload kv) with many connections and measure
    latency, throughput, errors and starved connections (exit 0 once the run completed; 2 bad
    option or target; 9 kv counters that disagree with the acknowledged INCRs)."""
    code = _load(
        host,
        port=port,
        workload=workload,
        per_connection=per_connection,
        size=size,
        concurrency=concurrency,
        rate=rate,
        processes=processes,
        duration=duration,
        requests=requests,
        warmup=warmup,
        start_at=start_at,
        starve_after=starve_after,
        timeout=timeout,
        kv=(mix, keys, distribution),
        as_json=as_json,
    )
    if code:
        raise typer.Exit(code)


def _load(
    host: str,
    *,
    port: int,
    workload: str,
    per_connection: int | None,
    size: str,
    concurrency: int | None,
    rate: float | None,
    processes: int | None,
    duration: float,
    requests: int | None,
    warmup: float,
    start_at: float | None,
    starve_after: float,
    timeout: float,
    kv: tuple[str | None, int | None, str | None],
    as_json: bool,
) -> int:
    """Check the options, run, print; return the exit code."""
    # Imported here: `lab --help` and the other commands need none of this.
    from lab.measure.load import run_load
    from lab.measure.summary import summary_lines

    try:
        config = cfg.make_config(
            host,
            port=port,
            workload=workload,
            per_connection=per_connection,
            size=size,
            concurrency=concurrency,
            rate=rate,
            processes=processes,
            duration=duration,
            requests=requests,
            warmup=warmup,
            start_at=start_at,
            starve_after=starve_after,
            timeout=timeout,
            mix=kv[0],
            keys=kv[1],
            distribution=kv[2],
        )
        result = run_load(config)
    except LoadError as exc:
        typer.echo(f"{_PROG}: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo(f"{_PROG}: interrupted — nothing reported", err=True)
        return 130
    verdict = None
    if result.kv_incr is not None:  # the no-lost-update check, through the server
        from lab.measure import kvcheck

        indices = sorted(int(i) for i in result.kv_incr["counters"])
        reading = kvcheck.read_through_server(config.host, config.port, config.tag, indices)
        verdict = kvcheck.check(result.kv_incr, [reading])
    if as_json:
        data = result.to_dict()
        if verdict is not None:
            data["kv_check"] = verdict.to_dict()
        typer.echo(json.dumps(data))
    else:
        for line in summary_lines(result):
            typer.echo(line)
        if verdict is not None:
            typer.echo(verdict.line)
    return 9 if verdict is not None and not verdict.ok else 0
