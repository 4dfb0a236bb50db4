"""Run a load: resolve the target once, start the loader processes, start them together,
collect and merge what they measured.

:func:`run_load` is the whole run behind ``lab load``::

    config = make_config("127.0.0.1", port=12345, concurrency=8, duration=5)
    result = run_load(config)          # a LoadResult: result.to_dict() is the --json output

The parent process does no load itself. It resolves and checks the target
(:mod:`lab.measure.target`), starts ``--processes`` loader processes (:mod:`lab.measure.loader`,
each a fresh Python started by :mod:`lab.measure.process`, inheriting nothing from the caller),
waits until every one is ready, and sends them all one absolute start time: ``--start-at`` if
given — the same time on every container of a multi-host run — or :data:`START_DELAY` after
the last one is ready. Each loader reports a :class:`~lab.measure.result.LoadResult`; the
run's result is their :func:`~lab.measure.result.merge`, carrying the configuration used.

A run always ends by itself: the loaders stop after ``--duration`` (capped at
:data:`~lab.measure.config.MAX_DURATION`) and a short drain, and a loader that has not reported
well after that is killed (:class:`~lab.measure.errors.LoaderFailed`).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

from lab.measure.config import LoadConfig
from lab.measure.errors import ConfigError
from lab.measure.loader import DRAIN, LoaderPlan, raise_descriptor_limit, share
from lab.measure.process import LoaderProcess, gather
from lab.measure.result import LoadResult, merge
from lab.measure.target import Target, resolve_target

__all__ = ["READY_TIMEOUT", "START_DELAY", "LoaderPool", "run_load"]

#: Default start: this long after every loader process is ready.
START_DELAY = 0.2
#: How long loader processes may take to start and get ready.
READY_TIMEOUT = 30.0
#: How long past its planned end a loader may take to report before it is killed.
REPORT_SLACK = 30.0
#: Descriptors a loader process needs beyond one per connection.
SPARE_DESCRIPTORS = 32


class LoaderPool:
    """Loader processes kept between runs (a sweep's many short runs): each run takes as many
    as it needs, started only when the pool has too few. A run that fails ends the processes
    it used (their state is unknown); the others stay. :meth:`close` ends them all."""

    def __init__(self) -> None:
        self.idle: list[LoaderProcess] = []

    def take(self, count: int) -> list[LoaderProcess]:
        self.idle = [loader for loader in self.idle if loader.alive]
        taken, self.idle = self.idle[:count], self.idle[count:]
        return taken + [LoaderProcess() for _ in range(count - len(taken))]

    def give_back(self, loaders: list[LoaderProcess]) -> None:
        self.idle.extend(loaders)

    def close(self) -> None:
        for loader in self.idle:
            loader.close()
        self.idle = []


def run_load(
    config: LoadConfig, *, target: Target | None = None, pool: LoaderPool | None = None
) -> LoadResult:
    """Run the load ``config`` describes and return the merged result.

    ``target`` skips resolving (it must come from :func:`~lab.measure.target.resolve_target`).
    Raises :class:`~lab.measure.errors.LoadError` subclasses (one line each) for a target that
    is not allowed or not there, too few descriptors, or a loader process that failed.
    """
    if target is None:
        target = resolve_target(config.host, config.port, config.timeout)
    per_process = math.ceil(config.concurrency / config.processes)
    if not raise_descriptor_limit(per_process + SPARE_DESCRIPTORS):
        raise ConfigError(
            f"{per_process} connections per loader process need about "
            f"{per_process + SPARE_DESCRIPTORS} descriptors, more than this process may open "
            "— raise `ulimit -n`, add --processes, or lower --concurrency"
        )

    seed = secrets.randbits(32)
    plans = [
        LoaderPlan(
            index=i,
            config=config,
            target=target,
            connections=share(config.concurrency, config.processes, i),
            requests=(
                share(config.requests, config.processes, i) if config.requests is not None else None
            ),
            seed=seed + i,
        )
        for i in range(config.processes)
    ]
    results = _run_processes(config, plans, pool)
    start_at = results[0].start_at
    merged = merge(results)
    merged.config = dataclasses.replace(config, start_at=start_at).to_dict()
    merged.target = target.to_dict()
    return merged


def _run_processes(
    config: LoadConfig, plans: list[LoaderPlan], pool: LoaderPool | None
) -> list[LoadResult]:
    loaders: list[LoaderProcess] = []
    finished = False
    try:
        if pool is None:
            for plan in plans:
                loaders.append(LoaderProcess(plan))
        else:
            loaders = pool.take(len(plans))
            for loader, plan in zip(loaders, plans, strict=True):
                loader.assign(plan)
        gather(loaders, "ready", time.monotonic() + READY_TIMEOUT)
        start_at = config.start_at if config.start_at is not None else time.time() + START_DELAY
        for loader in loaders:
            loader.send({"start_at": start_at})
        planned = max(0.0, start_at - time.time()) + config.warmup + config.duration
        deadline = time.monotonic() + planned + DRAIN + REPORT_SLACK
        reports = gather(loaders, "result", deadline)
        finished = True
        return [LoadResult.from_dict(report) for report in reports]
    finally:
        if pool is not None and finished:
            pool.give_back(loaders)
        else:
            # On any failure (or Ctrl-C) the others are ended at once, not left to run out.
            for loader in loaders:
                loader.close(kill=not finished)
