"""The full compare's experiments, for real on loopback: Cloudflare's sequential connections
across three workers, idle connections held open, and pool sizes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.measure import compare as sweep
from lab.measure import distribution, experiments
from lab.measure.bench import LocalBackend
from lab.measure.claims import evaluate
from lab.sockets.designs import DESIGNS


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    backend = LocalBackend(keep=True)
    yield backend
    backend.close()


def test_blocking_accept_serves_sequential_connections_round_robin(backend: LocalBackend) -> None:
    """multi-accept, --workers 3, six connections one after another: every worker serves two,
    in turn (0,1,2,0,1,2), in every round."""
    record = distribution.experiment(backend, "multi-accept")
    assert "error" not in record, record
    assert record["server_options"] == ["--workers", "3"]
    assert len(record["rounds"]) == distribution.ROUNDS
    for round_ in record["rounds"]:
        assert round_["counts"] == [2, 2, 2], round_
        assert round_["served_by"] == [0, 1, 2, 0, 1, 2], round_
    assert record["pattern"] == distribution.ROUND_ROBIN
    assert len(record["worker_ids"]) == 3


@pytest.mark.parametrize("name", sorted(distribution.EXPECTED))
def test_each_mechanism_gives_its_expected_pattern(backend: LocalBackend, name: str) -> None:
    assert name in DESIGNS, f"{name}: claim 9 expects a design that is not registered"
    record = distribution.experiment(backend, name)
    assert record.get("pattern") == distribution.EXPECTED[name], record


def test_every_registered_pool_design_is_in_the_experiment() -> None:
    assert distribution.designs_for(sweep.all_servers()) == list(sweep.POOL_DESIGNS)
    assert "multi-accept" in distribution.designs_for(sweep.all_servers())


def test_a_compare_with_the_experiments_records_them_and_the_claim_is_judged() -> None:
    """A tiny full compare: the sequential-connections record of the pool, the idle runs (the
    pool held by as many idle connections as it has workers serves nothing; fork serves on),
    the pool at each size (every run with that many workers), and claim 9 judged from them."""
    matrix = sweep.Matrix(
        ["multi-accept", "fork"],
        workloads=["connect-per-request"],
        concurrency=[2],
        repeats=1,
        duration=0.3,
        warmup=0.1,
        experiments=True,
    )
    steps: list[sweep.Step] = []
    results = sweep.compare(lambda: LocalBackend(keep=True), matrix, progress=steps.append)
    assert [s.done for s in steps] == list(range(len(steps)))
    assert all(s.total == len(steps) for s in steps)

    record = results["distribution"]["designs"]["multi-accept"]
    assert record["pattern"] == distribution.ROUND_ROBIN, record
    assert list(results["distribution"]["designs"]) == ["multi-accept"]

    idle = {(r["design"], r["idle"]): r for r in results["idle"]["runs"]}
    assert set(idle) == {(d, n) for d in ("multi-accept", "fork") for n in (0, matrix.workers)}
    for run in idle.values():
        assert "error" not in run, run
    assert idle["multi-accept", 0]["load"]["requests"] > 0
    assert idle["multi-accept", matrix.workers]["load"]["requests"] == 0
    assert idle["fork", matrix.workers]["load"]["requests"] > 0

    sized = results["pool_sizes"]["runs"]
    assert [r["workers"] for r in sized] == list(experiments.POOL_SIZES)
    for run in sized:
        assert "error" not in run, run
        assert run["server_options"][:2] == ["--workers", str(run["workers"])]
        assert run["server"]["stats"]["workers_alive"] == run["workers"]

    claim = next(c for c in evaluate(results) if "sequential connections" in c.statement)
    assert "multi-accept: served by 0,1,2,0,1,2" in claim.evidence
    assert "→ round-robin (expected round-robin) → holds" in claim.evidence


def test_the_quick_compare_runs_no_experiment() -> None:
    assert not sweep.quick_matrix(sweep.quick_servers(), workers=2).experiments
    assert not sweep.Matrix(["fork"]).experiments
