"""The network-fault agent: what a helper container runs inside a client's network namespace.

``lab fault delay|stall|loss|rate|partition`` start a short-lived helper container (the lab's
image, root, every capability dropped but ``NET_ADMIN``, joined to the client's namespace with
``--network container:CLIENT``); the client itself stays unprivileged. This program, the
helper's command, puts the fault in place, says how (one ``fault ready mechanism=…`` line),
waits for SIGTERM or its ``--for`` to run out, undoes it and exits 0. So the fault ends with
the helper, even when the ``lab`` command that started it died. It imports only the standard
library and the proxy (:mod:`lab.sockets.proxy`).

Mechanisms, by what this kernel has (it has no ``netem`` qdisc; ``tbf`` and iptables'
``statistic`` match are built in):

=========  ===========================================  =====================================
fault      with netem                                   without
=========  ===========================================  =====================================
delay      ``netem delay 2·MS 2·JITTER`` on eth0        the impairment proxy (MS each way)
loss       ``netem loss PCT%`` on eth0                  iptables ``statistic`` DROP, each way
stall      —                                            the impairment proxy, stalled
rate       ``tbf`` on eth0 (the client's sending side)
partition  iptables DROP of everything on eth0, both ways (sends hang, as across a real cut)
=========  ===========================================  =====================================

netem sits on the client's egress only, so it takes the whole added round trip there. The
proxy gets connections through an ``iptables -t nat`` REDIRECT of new connections to the
server's port, so it delays the connections made after the fault began; connections already
open keep their direct path (NAT is decided per connection, at its first packet).

Every rule lives in chains of the lab's own (``LAB_FAULT…``), so undoing is flushing them, and
:func:`clear` (``netagent clear``) is idempotent: it is also what ``lab fault clear`` runs in a
client whose helper was killed before it could undo.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from lab.sockets.proxy import Impairment, Proxy

PROXY_PORT = 15999  # in the client's namespace, on loopback: where the REDIRECT sends
DEVICE = "eth0"  # the container's interface on labnet
NAT_CHAIN = "LAB_FAULT"
OUT_CHAIN = "LAB_FAULT_OUT"
IN_CHAIN = "LAB_FAULT_IN"
KINDS = ("delay", "stall", "loss", "rate", "partition")


class AgentError(Exception):
    """A fault that could not be put in place (the message says why)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AgentError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()}")
    return done


def netem_available() -> bool:
    """Whether this kernel has netem: add it to loopback and take it away again."""
    if _run(
        "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms", check=False
    ).returncode:
        return False
    _run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return True


def clear() -> None:
    """Undo every fault of the lab's in this namespace (idempotent)."""
    for table, hook, chain in (
        ("nat", "OUTPUT", NAT_CHAIN),
        ("filter", "OUTPUT", OUT_CHAIN),
        ("filter", "INPUT", IN_CHAIN),
    ):
        while _run("iptables", "-t", table, "-D", hook, "-j", chain, check=False).returncode == 0:
            pass
        _run("iptables", "-t", table, "-F", chain, check=False)
        _run("iptables", "-t", table, "-X", chain, check=False)
    _run("tc", "qdisc", "del", "dev", DEVICE, "root", check=False)


def _chains(*pairs: tuple[str, str, str]) -> None:
    for table, hook, chain in pairs:
        _run("iptables", "-t", table, "-N", chain)
        _run("iptables", "-t", table, "-A", hook, "-j", chain)


def _redirect(port: int) -> None:
    """New connections to the server's port go to the proxy, except the proxy's own (root's:
    the client's programs run as the lab user)."""
    _chains(("nat", "OUTPUT", NAT_CHAIN))
    _run(
        "iptables", "-t", "nat", "-A", NAT_CHAIN, "-m", "owner", "--uid-owner", "0", "-j", "RETURN"
    )
    _run(
        "iptables", "-t", "nat", "-A", NAT_CHAIN, "-p", "tcp", "--dport", str(port),
        "-j", "REDIRECT", "--to-ports", str(PROXY_PORT),
    )  # fmt: skip


def _drop(port: int, probability: float | None) -> None:
    """DROP the server port's packets both ways: all of them (a partition: every packet on
    eth0), or each with ``probability`` (loss)."""
    _chains(("filter", "OUTPUT", OUT_CHAIN), ("filter", "INPUT", IN_CHAIN))
    if probability is None:
        _run("iptables", "-A", OUT_CHAIN, "-o", DEVICE, "-j", "DROP")
        _run("iptables", "-A", IN_CHAIN, "-i", DEVICE, "-j", "DROP")
        return
    match = ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}"]
    _run("iptables", "-A", OUT_CHAIN, "-p", "tcp", "--dport", str(port), *match, "-j", "DROP")
    _run("iptables", "-A", IN_CHAIN, "-p", "tcp", "--sport", str(port), *match, "-j", "DROP")


def apply(args: argparse.Namespace) -> tuple[str, Proxy | None]:
    """Put the fault in place; returns the mechanism's description and the proxy if one runs."""
    netem = args.kind in ("delay", "loss") and netem_available()
    if args.kind == "delay" and netem:
        _run(
            "tc", "qdisc", "add", "dev", DEVICE, "root", "netem",
            "delay", f"{2 * args.delay:g}ms", f"{2 * args.jitter:g}ms",
        )  # fmt: skip
        return "netem (on the client's egress: the whole added round trip)", None
    if args.kind in ("delay", "stall"):
        proxy = Proxy(PROXY_PORT, Impairment(args.delay, args.jitter, args.kind == "stall"))
        _redirect(args.port)
        why = "" if args.kind == "stall" else ", as this kernel has no netem"
        return f"proxy (the impairment proxy, for new connections{why})", proxy
    if args.kind == "loss" and netem:
        _run("tc", "qdisc", "add", "dev", DEVICE, "root", "netem", "loss", f"{args.loss:g}%")
        return "netem", None
    if args.kind == "loss":
        _drop(args.port, args.loss / 100.0)
        return "iptables statistic (random DROP each way, as this kernel has no netem)", None
    if args.kind == "rate":
        # burst: at least one full-size packet, or the qdisc can never send it; latency bounds
        # the queue (packets that would wait longer are dropped, as on a real slow link).
        burst = max(16 * 1024, args.rate * 1000 // 8 // 10)
        _run(
            "tc", "qdisc", "add", "dev", DEVICE, "root", "tbf",
            "rate", f"{args.rate}kbit", "burst", str(burst), "latency", "400ms",
        )  # fmt: skip
        return "tbf (on the client's sending side)", None
    _drop(args.port, None)
    return "iptables (DROP everything on eth0, both ways)", None


def _wait(seconds: float | None, stop_fd: int, proxy: Proxy | None) -> None:
    until = None if seconds is None else time.monotonic() + seconds
    if proxy is not None:
        proxy.run(until=until, stop_fd=stop_fd)
        return
    timeout = None if until is None else max(0.0, until - time.monotonic())
    select.select([stop_fd], [], [], timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.orchestration.netagent")
    parser.add_argument("kind", choices=(*KINDS, "clear"))
    parser.add_argument("--port", type=int, default=12345, help="the server's port")
    parser.add_argument("--delay", type=float, default=0.0, help="ms, each way")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms, each way")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of packets")
    parser.add_argument("--rate", type=int, default=0, help="kbit/s")
    parser.add_argument("--for", dest="seconds", type=float, default=None)
    args = parser.parse_args(argv)
    clear()  # a helper killed before it undid (`lab fault clear` runs `clear` for those)
    if args.kind == "clear":
        print("fault cleared", flush=True)
        return 0
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.write(stop_w, b"x"))
    signal.signal(signal.SIGINT, lambda signum, frame: os.write(stop_w, b"x"))
    try:
        mechanism, proxy = apply(args)
    except AgentError as exc:
        clear()
        print(f"fault failed: {exc}", flush=True)
        return 2
    print(f"fault ready mechanism={mechanism}", flush=True)
    try:
        _wait(args.seconds, stop_r, proxy)
    finally:
        clear()  # the redirect first: new connections go straight to the server again
        if proxy is not None:
            proxy.drain(5.0)  # then what the proxy carries, undelayed, until it closes
            proxy.close()
    print("fault undone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
