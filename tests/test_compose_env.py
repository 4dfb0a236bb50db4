"""Every ``lab serve`` option reaches the server container, with no line for it in compose.yaml:
lab writes the LAB_<NAME> variables it has into a file that compose.yaml's ``env_file`` names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from harness import require

from lab.orchestration import compose
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
