"""Measurement: the load generator, server-side probes, benchmarks and reports.

Above the socket layer (it may import ``lab.sockets``), below orchestration and the CLI.
"""
