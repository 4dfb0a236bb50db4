"""Statistics in shared memory: what a process counted survives it, and the line is JSON."""

from __future__ import annotations

import json
import os

from lab.sockets.stats import COMPLETED, RESET, WORKER_DIED, Counters, Stats


def test_a_slot_written_by_a_forked_child_is_read_by_the_parent() -> None:
    counters = Counters(4)
    slot = counters.assign()
    pid = os.fork()
    if pid == 0:  # the child counts two connections and dies holding a third
        for _ in range(3):
            slot.accepted()
        slot.ended(COMPLETED, 10, 10)
        slot.ended(RESET, 5, 3)
        os._exit(0)
    os.waitpid(pid, 0)
    counters.bind(slot, pid)
    stats = Stats("multi-accept")
    live = counters.snapshot(stats)
    assert (live.accepted, live.completed, dict(live.failed)) == (3, 1, {RESET: 1})
    assert stats.accepted == 0  # a snapshot folds nothing
    lost = counters.retire(pid, stats, WORKER_DIED)
    assert lost == 1
    assert (stats.accepted, stats.completed, stats.in_flight) == (3, 1, 0)
    assert dict(stats.failed) == {RESET: 1, WORKER_DIED: 1}
    assert (stats.bytes_in, stats.bytes_out, dict(stats.per_worker)) == (15, 13, {str(pid): 2})
    assert counters.assign().get(0) == 0  # the slot is free again, and zeroed


def test_the_statistics_line_is_json_with_every_count() -> None:
    stats = Stats('odd "name" \\')
    stats.accepted, stats.completed, stats.bytes_in = 3, 2, 98
    stats.failed[RESET] += 1
    stats.per_worker["4711"] += 2
    data = json.loads(stats.to_json())
    assert data["design"] == 'odd "name" \\' and data["event"] == "stats"
    assert (data["accepted"], data["completed"], data["in_flight"]) == (3, 2, 0)
    assert data["failed"] == {RESET: 1} and data["per_worker"] == {"4711": 2}
    assert isinstance(data["uptime_s"], float) and data["bytes_in"] == 98
