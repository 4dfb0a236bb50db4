"""Every ``lab serve`` option reaches the server container, with no line for it in compose.yaml:
lab writes the LAB_<NAME> variables it has into a file that compose.yaml's ``env_file`` names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from harness import require

from lab.orchestration import compose, engine
from lab.orchestration.engine import LabError
from lab.sockets.config import OPTIONS, env_name

ROOT = Path(__file__).resolve().parent.parent


def compose_yaml_names() -> set[str]:
    text = (ROOT / "compose.yaml").read_text()
    return {name for name in compose.SERVER_OPTION_VARS if name in text}


def test_the_env_file_has_every_server_option_set_and_nothing_else() -> None:
    env = {"LAB_ACCEPT_LOCK": "flock", "LAB_WORKER_CMD": "cat -u", "LAB_IMAGE": "x", "PATH": "/"}
    with compose.server_env_file(env) as path:
        lines = Path(path).read_text().splitlines()
    assert lines == ["LAB_ACCEPT_LOCK=flock", "LAB_WORKER_CMD=cat -u"]
    assert not Path(path).exists()  # gone once compose has run


def test_a_users_own_env_file_comes_first_and_a_missing_one_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    own = tmp_path / "my.env"
    own.write_text("LAB_MAX_THREADS=8\n")
    with compose.server_env_file({compose.SERVER_ENV: str(own), "LAB_LOOP": "uvloop"}) as path:
        assert Path(path).read_text().splitlines() == ["LAB_MAX_THREADS=8", "LAB_LOOP=uvloop"]
    missing = {compose.SERVER_ENV: str(tmp_path / "nope.env")}
    with (
        pytest.raises(LabError, match=r"cannot read it.*fix the path"),
        compose.server_env_file(missing),
    ):
        pass
    with (
        pytest.raises(LabError, match="one line"),
        compose.server_env_file({"LAB_WORKER_CMD": "cat\nrm"}),
    ):
        pass


def test_an_option_compose_yaml_does_not_list_reaches_the_server_container() -> None:
    """What compose itself resolves for the server (``compose config``): an option that
    compose.yaml does not name comes through the env file."""
    require(
        shutil.which("docker-compose") is not None or shutil.which("docker") is not None,
        "no compose tool (make test installs docker-compose)",
    )
    unlisted = sorted(set(map(env_name, (o.name for o in OPTIONS))) - compose_yaml_names())
    assert "LAB_ACCEPT_LOCK" in unlisted  # the case this test is about exists
    env = {name: "7" for name in unlisted}
    text = compose.run(["config"], env={**env, "LAB_IMAGE": "lab:x"}).stdout
    # The server's block of the resolved YAML, up to the next service; its environment entries
    # are "      LAB_NAME: value" (quoted or not).
    server = text[text.index("  server:") :]
    server = server[: server.find("\n  client") if "\n  client" in server else len(server)]
    found = dict(re.findall(r"^\s+(LAB_\w+): '?([^'\n]*)'?$", server, re.MULTILINE))
    assert {name: found.get(name) for name in unlisted} == env


@pytest.mark.parametrize(
    ("kernel", "has_it"),
    [
        ("6.18.44-fc-v669", True),
        ("5.14.0", True),
        ("5.15.0-91-generic", True),
        ("5.13.19", False),
        ("4.19.0-26-amd64", False),
        ("", False),
        ("weird", False),
    ],
)
def test_tcp_migrate_req_is_set_only_on_a_kernel_that_has_it(kernel: str, has_it: bool) -> None:
    assert engine.has_migrate_req(kernel) is has_it


def _server_sysctls(monkeypatch: pytest.MonkeyPatch, kernel_has_it: bool) -> str:
    monkeypatch.setattr(compose, "engine_has_migrate_req", lambda: kernel_has_it)
    text = compose.run(["config"], env={"LAB_IMAGE": "lab:x"}).stdout
    server = text[text.index("  server:") :]
    return server[: server.find("\n  client") if "\n  client" in server else len(server)]


def test_the_server_gets_tcp_migrate_req_from_its_own_file_only_where_the_kernel_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Docker refuses a container with a sysctl its kernel lacks (Linux < 5.14 has no
    tcp_migrate_req): compose.yaml alone never names it, the override file adds it."""
    require(
        shutil.which("docker-compose") is not None or shutil.which("docker") is not None,
        "no compose tool (make test installs docker-compose)",
    )
    assert "tcp_migrate_req" not in _server_sysctls(monkeypatch, kernel_has_it=False)
    new = _server_sysctls(monkeypatch, kernel_has_it=True)
    assert re.search(r"net\.ipv4\.tcp_migrate_req: '?1'?", new)
    assert re.search(r"net\.ipv4\.tcp_syncookies: '?0'?", new)  # merged, not replaced
