"""A load service: ``python -m lab.measure.service`` runs one load per request, for as long as
its input lasts, with its loader processes kept between runs.

``lab compare`` runs many short cells; starting ``lab load`` for each (an exec into every client
container, a Python start, the CLI's imports, the loader processes) cost seconds per cell. The
service is started once per client container and told what to run, one JSON object per line:

* in: ``{"config": LoadConfig.to_dict()}`` (the container's share, with its shared start time);
* out: ``{"result": LoadResult.to_dict()}``, or ``{"error": "one line"}``.

The target is resolved once per (host, port) and kept while the name still resolves to its
address: a run looks the name up again (no connection, before its start time), and only a new
address is resolved and checked anew. Compose's server keeps its address across a sweep; on
Swarm, each switch (a rolling update) gives the server task a new one, and a kept address would
send every SYN of the next cell to a container that is gone.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from lab.measure.config import LoadConfig
from lab.measure.errors import LoadError
from lab.measure.load import LoaderPool, run_load
from lab.measure.target import Target, resolve_target
from lab.sockets.client import resolve


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    pool = LoaderPool()
    targets: dict[tuple[str, int], Target] = {}

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        for line in sys.stdin:
            try:
                config = LoadConfig.from_dict(json.loads(line)["config"])
                key = (config.host, config.port)
                known = targets.get(key)
                if known is None or not _still(known, config.timeout):
                    targets[key] = resolve_target(config.host, config.port, config.timeout)
                result = run_load(config, target=targets[key], pool=pool)
            except LoadError as exc:
                say({"error": str(exc).splitlines()[0]})
                continue
            except (ValueError, KeyError, TypeError) as exc:
                say({"error": f"bad request: {exc}"})
                continue
            say({"result": result.to_dict()})
    except BrokenPipeError:
        return 1
    finally:
        pool.close()
    return 0


def _still(target: Target, timeout: float) -> bool:
    """Whether the target's name still resolves to the address kept for it."""
    try:
        infos = resolve(target.host, target.port, timeout)
    except (OSError, UnicodeError, ValueError):
        return False  # resolve_target says why, in one line
    return any(info[4][0] == target.address for info in infos)


if __name__ == "__main__":
    raise SystemExit(main())
