from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from harness import ServerFactory
from hypothesis import settings

# Property tests: no deadline (a shared, noisy machine), derandomized in CI so a run repeats.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=30)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """``start_server(design, *args)`` → a RunningServer; its process group dies at teardown."""
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.cleanup()
