"""Server-side measurement: CPU of a process tree (reaped children included), cgroup readings
in both layouts, listen-queue overflows, statistics deltas."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from harness import wait_until

from lab.measure import probe

# A parent that forks a child burning a fixed amount of CPU *time*, reaps it, then idles: the
# child's CPU must still be counted (it lives on in the parent's cutime/cstime).
BURNER = textwrap.dedent(
    """
    import os, sys, time
    def burn(seconds):
        start = sum(os.times()[:2])
        while sum(os.times()[:2]) - start < seconds:
            pass
    pid = os.fork()
    if pid == 0:
        burn(0.3)
        os._exit(0)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
    time.sleep(60)
    """
)


def test_tree_cpu_counts_children_that_were_already_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "reaped"
        assert probe.process_tree(proc.pid) == [proc.pid]  # the child is gone …
        assert probe.tree_cpu_seconds(proc.pid) >= 0.3  # … and its CPU is still counted
    finally:
        proc.kill()
        proc.wait()


def test_tree_cpu_and_rss_count_live_children() -> None:
    script = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        assert wait_until(lambda: len(probe.process_tree(proc.pid)) == 2)
        alone = probe.tree_rss_bytes(probe.process_tree(proc.pid)[1])
        assert probe.tree_rss_bytes(proc.pid) > alone > 0
    finally:
        for pid in reversed(probe.process_tree(proc.pid)):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        proc.wait()


def test_cgroup_v2_reading() -> None:
    files = {
        "/sys/fs/cgroup/cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        "/sys/fs/cgroup/memory.current": "10485760\n",
    }
    reading = probe.read_cgroup(files.get)
    assert reading == probe.CgroupReading(2.5, 10485760, None)  # no memory.peak: sample


def test_cgroup_v1_reading_has_a_peak() -> None:
    files = {
        "/sys/fs/cgroup/cpuacct/cpuacct.usage": "1500000000\n",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes": "4096\n",
        "/sys/fs/cgroup/memory/memory.max_usage_in_bytes": "8192\n",
    }
    assert probe.read_cgroup(files.get) == probe.CgroupReading(1.5, 4096, 8192)


def test_this_machines_own_cgroup_is_readable() -> None:
    reading = probe.read_cgroup(probe.local_file)
    assert reading.cpu_seconds > 0


def test_listen_overflows_is_read_from_tcpext() -> None:
    netstat = (
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n"
        "TcpExt: 3 17 20\n"
        "IpExt: InNoRoutes\n"
        "IpExt: 0\n"
    )
    assert probe.listen_overflows(netstat) == 17
    with open("/proc/net/netstat") as real:
        assert probe.listen_overflows(real.read()) >= 0


def test_stats_delta_subtracts_counters_reasons_and_workers() -> None:
    before = {
        "design": "sendmsg",
        "accepted": 10,
        "completed": 9,
        "failed": {"reset": 1},
        "per_worker": {"11": 5, "12": 5},
        "shed": 0,
        "bytes_in": 100,
        "bytes_out": 100,
        "health_probes": 3,
    }
    after = {
        "design": "sendmsg",
        "accepted": 25,
        "completed": 22,
        "failed": {"reset": 2, "idle_timeout": 1},
        "per_worker": {"11": 12, "12": 5, "13": 6},
        "shed": 1,
        "bytes_in": 250,
        "bytes_out": 240,
        "health_probes": 4,
        "workers_alive": 3,
    }
    delta = probe.stats_delta(before, after)
    assert delta["accepted"] == 15 and delta["completed"] == 13 and delta["shed"] == 1
    assert delta["failed"] == {"idle_timeout": 1, "reset": 1}
    assert delta["per_worker"] == {"11": 7, "13": 6}
    assert delta["bytes_in"] == 150 and delta["health_probes"] == 1


def test_sampler_keeps_the_peak() -> None:
    values = iter([5, 9, 3])
    with probe.Sampler(lambda: next(values, 1), interval=0.001) as sampler:
        assert wait_until(lambda: len(sampler.samples) >= 4)
    assert sampler.peak == 9


CONNTRACK_STAT = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop "
    "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
    "0002efff  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "000000c2 00000000 00000000  00000000 00000000 00000000 00000000\n"
    "0002efff  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "000000cc 00000000 00000000  00000000 00000000 00000000 00000000\n"
)


def test_conntrack_is_read_as_hex_with_drops_summed_over_cpus() -> None:
    table = probe.conntrack(CONNTRACK_STAT, "262144\n")
    assert table == probe.Conntrack(entries=0x2EFFF, limit=262144, drops=0xC2 + 0xCC)
    assert table.room == 262144 - 192511


@pytest.mark.parametrize(("stat", "limit"), [(None, "262144"), (CONNTRACK_STAT, None), ("", "1")])
def test_no_conntrack_table_reads_as_none(stat: str | None, limit: str | None) -> None:
    assert probe.conntrack(stat, limit) is None


def test_this_namespaces_conntrack_entries_match_the_kernels_own_count() -> None:
    """Where the table is loaded, its entries agree with nf_conntrack_count (read another way;
    connections closing meanwhile move it a little)."""
    count = probe.local_file("/proc/sys/net/netfilter/nf_conntrack_count")
    table = probe.local_conntrack()
    if count is None:
        assert table is None  # no conntrack module: no table either
        return
    assert table is not None
    assert abs(table.entries - int(count)) <= 2000
    assert table.limit == int(probe.local_file(probe.CONNTRACK_MAX) or 0)
