"""Measurement: load generation against the lab's servers, latency histograms, what a server
costs, and benchmarks.

Above :mod:`lab.sockets` (never below it), below the CLI: nothing here imports ``lab.cli`` or
``lab.orchestration``.

* :mod:`lab.measure.config` — a run's settings, checked (``make_config`` → ``LoadConfig``);
* :mod:`lab.measure.target` — the target rule (loopback or a directly connected subnet) and
  the single name resolution per run;
* :mod:`lab.measure.loader` — one loader process's non-blocking ``selectors`` loop;
* :mod:`lab.measure.process` — loader processes and how the parent talks to them;
* :mod:`lab.measure.load` — a whole run (``run_load``);
* :mod:`lab.measure.result` — ``LoadResult``, its JSON, and ``merge``;
* :mod:`lab.measure.histogram` — ``LatencyHistogram``, HdrHistogram behind a typed wrapper;
* :mod:`lab.measure.summary` — the human summary;
* :mod:`lab.measure.errors` — what stops a run before it starts, with exit codes;
* :mod:`lab.measure.probe` — a server's CPU, memory, listen overflows and statistics deltas;
* :mod:`lab.measure.peers` — servers from outside the lab, measured beside its designs;
* :mod:`lab.measure.bench` — one benchmark on a backend (local here; containers in
  ``lab.orchestration.bench``).
"""
