"""A load service: ``python -m lab.measure.service`` runs one load per request, for as long as
its input lasts, with its loader processes kept between runs.

``lab compare`` runs many short cells; starting ``lab load`` for each (an exec into every client
container, a Python start, the CLI's imports, the loader processes) cost seconds per cell. The
service is started once per client container and told what to run, one JSON object per line:

* in: ``{"config": LoadConfig.to_dict()}`` (the container's share, with its shared start time);
* out: ``{"result": LoadResult.to_dict()}``, or ``{"error": "one line"}``.

The target is resolved once per (host, port) for the service's life — the lab's server keeps
its name and address across a sweep.
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
                if key not in targets:
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


if __name__ == "__main__":
    raise SystemExit(main())
