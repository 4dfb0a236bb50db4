"""Every Docker-side mistake a user can make is one line naming the fix, a non-zero exit and no
traceback — checked here without a working engine where the mistake is the missing engine."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from lab.cli.app import app, main
from lab.orchestration import compose, engine

runner = CliRunner()


def one_line_error(result: object, *needles: str) -> None:
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code != 0, output  # type: ignore[attr-defined]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", [["status"], ["down"], ["switch", "fork"], ["up"]])
def test_no_engine_is_one_line_naming_the_fix(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # discard port: nothing listens
    result = runner.invoke(app, command)
    one_line_error(result, "cannot reach the Docker engine", "systemctl start docker")


def test_engine_without_permission_is_one_line_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import docker
    from docker.errors import DockerException

    def refuse(**_: object) -> object:
        raise DockerException(
            "Error while fetching server API version: ('Connection aborted.', "
            "PermissionError(13, 'Permission denied'))"
        )

    monkeypatch.setattr(docker, "from_env", refuse)
    result = runner.invoke(app, ["status"])
    one_line_error(result, "no permission", "docker group")


@pytest.mark.parametrize(
    ("compose_output", "fix"),
    [
        (
            "ERROR: for server  Cannot start service server: driver failed programming external "
            "connectivity: Bind for 127.0.0.1:12345 failed: port is already allocated",
            "LAB_HOST_PORT",
        ),
        ("Error response from daemon: No such image: lab:0123456789ab", "lab up"),
        (
            "Got permission denied while trying to connect to the Docker daemon socket at "
            "unix:///var/run/docker.sock",
            "docker group",
        ),
        ("something else went wrong\nERROR: the real reason", "the real reason"),
    ],
)
def test_compose_failures_become_one_line_naming_the_fix(compose_output: str, fix: str) -> None:
    message = compose.explain_failure(compose_output)
    assert "\n" not in message
    assert fix in message, message


def test_missing_compose_tool_names_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose.shutil, "which", lambda _name: None)
    compose.tool.cache_clear()
    try:
        with pytest.raises(engine.LabError, match="apt-get install docker-compose"):
            compose.tool()
    finally:
        compose.tool.cache_clear()


def test_lab_not_up_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a reachable engine and no lab of this (unused) project: 'start it with lab up'."""
    try:
        engine.client()
    except engine.LabError:
        if os.environ.get("CI"):
            pytest.fail("this test needs the Docker engine")
        pytest.skip("needs a Docker engine (under CI=true this fails instead)")
    from lab.orchestration import stack

    with pytest.raises(engine.LabError, match="lab up"):
        stack.status(project="labtest-never-started")


class _Nothing:
    """A docker client whose engine lists no containers and no networks, in no swarm."""

    @staticmethod
    def info() -> dict[str, object]:
        return {}

    class containers:  # named as the SDK names it
        @staticmethod
        def list(**_: object) -> list[object]:
            return []

    networks = containers


def test_a_server_gone_while_starting_does_not_say_run_lab_up() -> None:
    """`lab up` waits for the server with this: it must never tell the user to run `lab up`."""
    from lab.orchestration import stack

    with pytest.raises(engine.LabError) as caught:
        stack.wait_healthy(_Nothing(), project="labtest-never-started")  # type: ignore[arg-type]
    assert "lab up" not in str(caught.value) and "\n" not in str(caught.value)


def test_lab_down_that_cannot_remove_everything_says_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from lab.orchestration import stack

    class Stuck:
        """An engine whose network stays: still in use by something outside the lab."""

        @staticmethod
        def info() -> dict[str, object]:
            return {}  # in no swarm

        class containers:
            @staticmethod
            def list(**_: object) -> list[object]:
                return []

        class networks:
            @staticmethod
            def list(**_: object) -> list[object]:
                return [SimpleNamespace(name="lab_labnet", remove=lambda: None)]

    def compose_fails(*_args: object, **_kwargs: object) -> None:
        raise engine.LabError("compose failed: error while removing network: has active endpoints")

    monkeypatch.setattr(stack, "client", Stuck)
    monkeypatch.setattr(compose, "run", compose_fails)
    result = runner.invoke(app, ["down"])
    one_line_error(result, "lab down: error: could not remove network lab_labnet", "docker")


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["up", "--publish"], {}, "go with --swarm"),
        (["up", "--server-node", "node-1"], {}, "go with --swarm"),
        (["up", "--swarm", "--publish"], {"LAB_HOST_PORT": "abc"}, "LAB_HOST_PORT='abc'"),
        (["up", "--swarm", "--publish"], {"LAB_HOST_PORT": "70000"}, "give a TCP port"),
    ],
)
def test_swarm_only_options_and_a_bad_host_port_are_one_line_before_any_engine_call(
    args: list[str],
    env: dict[str, str],
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # an engine call would say so instead
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.argv", ["lab", *args])
    with pytest.raises(SystemExit) as exited:
        main()  # the console script: a usage error is one line, not Click's box
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lab up: error: ") and err.count("\n") == 1 and needle in err, err


def test_the_image_build_step_of_make_test_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m lab.orchestration.images`` (make test runs it before the Docker tests)."""
    from lab.orchestration import images

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise engine.LabError("cannot reach the Docker engine: start it")

    monkeypatch.setattr(images, "ensure_images", refuse)
    assert images.main() == 1
    err = capsys.readouterr().err
    assert err == "images: cannot reach the Docker engine: start it\n"
