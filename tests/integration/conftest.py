"""Fixtures for the integration tests: the lab's images, topologies of containers, compose projects.

These tests need a Docker engine (Linux). Without one they are skipped on a workstation, but in
CI (``CI`` set) they FAIL: a CI job that silently skipped them would prove nothing.

Cleanup is layered: every fixture removes what it made (forcefully, even when the test failed),
and a session finalizer sweeps whatever is left with THIS run's label (``org.lab.test-run=<uuid>``)
or belongs to a compose project this run started (``labtest-<run>-<n>``). Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

# Ryuk (testcontainers' reaper) is an image from Docker Hub; there is no registry here. Set
# before testcontainers is imported (containers.py imports it); our own sweep does its job.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from containers import PROJECT_PREFIX, RUN_ID, Topologies, remove_project, sweep

from lab.orchestration.engine import LabError

if TYPE_CHECKING:
    import docker

HERE = Path(__file__).resolve().parent
# The first test to need the images may build them: the base image (debootstrap, about a
# minute) and the lab image (about 40 s). pytest-timeout counts fixture setup, so that test gets
# this much instead of the project's 120 s default.
IMAGE_BUILD_TIMEOUT = 900
PIN_REPO = "lab-test"  # this session's tag on the image it tests (see lab_image)
RUN_HINT = (
    "with Docker running, run `.venv/bin/pytest tests/integration`; "
    "under CI=true these tests fail instead of skipping"
)

_projects: list[str] = []
_project_numbers = itertools.count(1)


def unavailable(reason: str) -> NoReturn:
    """Docker (or compose) is missing: skip on a workstation (naming how to run them), but FAIL
    in CI."""
    if not os.environ.get("CI"):
        pytest.skip(f"{reason} — {RUN_HINT}")  # only outside CI: under CI=true it fails below
    pytest.fail(f"CI is set, so the integration tests fail, not skip: {reason}", pytrace=False)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection and pytest's reordering by fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark our tests ``docker``; give the first one that needs the images time to build them."""
    ours = [item for item in items if HERE in Path(item.path).resolve().parents]
    for item in ours:
        item.add_marker(pytest.mark.docker)
    needing = [item for item in ours if "lab_image" in getattr(item, "fixturenames", ())]
    if needing:
        needing[0].add_marker(pytest.mark.timeout(IMAGE_BUILD_TIMEOUT))


@pytest.fixture(scope="session")
def docker_engine() -> docker.DockerClient:
    """The docker SDK client; skips (fails under CI) when the engine cannot be reached."""
    from lab.orchestration.engine import client

    try:
        return client()
    except LabError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def lab_image(docker_engine: docker.DockerClient) -> Iterator[str]:
    """The current ``lab:<hash>`` image, built once per session if missing (a no-op otherwise).

    What the tests get is a tag of this session's own on that image, ``lab-test:<run>``: when the
    sources change meanwhile, the next ``ensure_images()`` (a `lab up`, another session) untags
    the outdated ``lab:<hash>`` — and deletes the image if nothing else holds it — while this
    session still starts containers from it. The pin is removed at the end (only the tag).
    """
    from docker.errors import APIError, NotFound

    from lab.orchestration.images import ensure_images

    try:
        ref = ensure_images().lab
    except LabError as exc:
        pytest.fail(f"cannot build the lab's images: {exc}", pytrace=False)
    repo, tag = PIN_REPO, RUN_ID[:12]
    docker_engine.images.get(ref).tag(repo, tag)
    try:
        yield f"{repo}:{tag}"
    finally:
        with contextlib.suppress(NotFound, APIError):
            docker_engine.images.remove(f"{repo}:{tag}", noprune=True)


@pytest.fixture(scope="session", autouse=True)
def _sweep_this_run() -> Iterator[None]:
    """At the end of the session, force-remove whatever this run left (only this run's)."""
    yield
    from lab.orchestration.engine import client

    try:
        engine = client()
    except LabError:
        return  # no engine: nothing of ours can exist
    with contextlib.closing(engine):
        left = sweep(engine, _projects)
    if left:
        # Not a failure of any test, but a fixture did not clean up after itself: say so.
        print(f"\nintegration sweep (run {RUN_ID}) removed: {', '.join(left)}")


@pytest.fixture
def topologies(lab_image: str) -> Iterator[Topologies]:
    """``topologies(design, clients=3)`` → a Topology; all of it is removed at teardown."""
    with Topologies(lab_image) as factory:
        yield factory


def _new_project() -> str:
    """A fresh compose project name of this run (labtest-<run>-<n>), known to the sweep."""
    from lab.orchestration import compose

    try:
        compose.tool()
    except LabError as exc:
        unavailable(str(exc))
    project = f"{PROJECT_PREFIX}-{next(_project_numbers)}"
    _projects.append(project)
    return project


@contextlib.contextmanager
def _brought_down(engine: docker.DockerClient, project: str) -> Iterator[str]:
    """Whatever the test did, the project is brought down (at once) and removed."""
    from lab.orchestration import compose

    try:
        yield project
    finally:
        with contextlib.suppress(LabError):
            compose.run(
                ["down", "--remove-orphans", "--volumes", "--timeout", "0"], project=project
            )
        remove_project(engine, project)


@pytest.fixture
def compose_project(docker_engine: docker.DockerClient) -> str:
    """A fresh compose project name of this run (labtest-<run>-<n>), known to the sweep."""
    return _new_project()


@pytest.fixture
def project(compose_project: str, docker_engine: docker.DockerClient) -> Iterator[str]:
    """A compose project of this run; whatever the test did, it is brought down and removed."""
    with _brought_down(docker_engine, compose_project) as name:
        yield name


@pytest.fixture(scope="module")
def module_project(docker_engine: docker.DockerClient) -> Iterator[str]:
    """As ``project``, shared by a module's tests (one lab brought up once)."""
    with _brought_down(docker_engine, _new_project()) as name:
        yield name
