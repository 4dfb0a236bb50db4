"""Bring your own server: ``lab bench --server-cmd`` and ``lab compare --peer NAME=CMD`` on
loopback — the user's server measured like a peer, its figures held against what it counted
itself, stopped leaving nothing behind, and every mistake a user can make one line naming the
fix."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from harness import wait_until
from typer.testing import CliRunner

from lab.cli.app import app
from lab.measure import compare as sweep
from lab.measure import usercmd
from lab.measure.bench import LocalBackend, ServerSpec, bench
from lab.measure.config import make_config

runner = CliRunner()
USER_ECHO = Path(__file__).with_name("user_echo.py")
SIZE = 49


def echo_cmd(*extra: str) -> str:
    return shlex.join([sys.executable, str(USER_ECHO), "{port}", "--host", "{host}", *extra])


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # a zombie is dead (its parent, not ours, reaps it)


def one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output and "error:" in lines[0], output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- measured like a peer ------------------------------------------------------------------------


def test_bench_counts_exactly_the_messages_the_users_server_echoed(tmp_path: Path) -> None:
    """No warm-up and a fixed number of requests: every message is in the measured window, so
    the bench's count must be what the server itself echoed (its bytes over the message size).
    Its connections are the loaders', the loader's check of the target, and the bench's one
    readiness probe."""
    count = tmp_path / "count.json"
    requests = 3000
    spec = ServerSpec("mine", command=echo_cmd("--count", str(count)))
    config = make_config(
        "127.0.0.1",
        port=1,
        workload="persistent",
        per_connection=50,
        requests=requests,
        size=SIZE,
        concurrency=4,
        duration=30.0,
        warmup=0.0,
        processes=1,
    )
    result = bench(LocalBackend(), spec, config).to_dict()
    own = json.loads(count.read_text())  # written by the server when the bench stopped it
    load, cost = result["load"], result["server"]
    assert result["design"] == "mine" and result["server_command"] == spec.command
    assert load["errors_total"] == 0 and load["unfinished"] == 0
    echoed, remainder = divmod(own["bytes"], SIZE)
    assert remainder == 0
    assert echoed == requests == load["requests"] == cost["requests"]
    assert own["connections"] == load["connections"] + 2
    assert cost["cpu_s"] > 0 and cost["memory_peak_bytes"] > 0
    assert cost["cpu_s_per_1000"] == pytest.approx(cost["cpu_s"] / echoed * 1000)
    assert cost["stats"] == {}  # it keeps no statistics of ours
    assert gone(own["pid"])


def test_bench_command_measures_a_users_server_and_records_its_command(tmp_path: Path) -> None:
    count = tmp_path / "count.json"
    command = echo_cmd("--count", str(count))
    args = ["bench", "--local", "--server-cmd", command, "--name", "mine", "--json"]
    result = runner.invoke(
        app, [*args, "--duration", "0.4", "--warmup", "0.1", "--concurrency", "2"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["design"] == "mine" and data["server_command"] == command
    own = json.loads(count.read_text())
    # connect-per-request: every measured message came over a connection the server counted
    assert 0 < data["load"]["requests"] <= own["bytes"] // SIZE
    assert data["server"]["cpu_s_per_1000"] > 0
    assert gone(own["pid"])


def test_stop_kills_a_server_that_ignores_sigterm_and_what_it_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usercmd, "STOP_TIMEOUT", 0.5)
    server = usercmd.LocalCommand(echo_cmd("--ignore-term"))
    server.start()
    pid = server.pid
    server.stop(timeout=0.5)
    assert wait_until(lambda: gone(pid))  # SIGKILLed: dead a moment after kill() returns

    count = tmp_path / "count.json"
    server = usercmd.LocalCommand(echo_cmd("--child", "--count", str(count)))
    server.start()
    server.stop()
    child = json.loads(count.read_text())["child"]  # it ignored SIGTERM: killed after
    assert wait_until(lambda: gone(child))


# -- lab compare --peer ----------------------------------------------------------------------------


def test_compare_runs_a_users_server_beside_a_peer_and_records_its_command(tmp_path: Path) -> None:
    count = tmp_path / "count.json"
    command = echo_cmd("--count", str(count))
    matrix = sweep.Matrix(
        ["peer-asyncio", "mine"],
        workloads=["persistent"],
        concurrency=[2],
        repeats=1,
        duration=0.3,
        warmup=0.1,
        user_servers={"mine": command},
    )
    assert "peer-asyncio" in sweep.PEER_NAMES  # from the peers' registry
    results = sweep.compare(lambda: LocalBackend(keep=True), matrix)
    assert results["matrix"]["user_servers"] == {"mine": command}
    runs = {run["design"]: run for run in results["runs"]}
    assert set(runs) == {"peer-asyncio", "mine"}
    assert all("error" not in run for run in runs.values()), runs
    assert runs["mine"]["server_command"] == command
    assert "server_command" not in runs["peer-asyncio"]
    assert 0 < runs["mine"]["load"]["requests"] <= json.loads(count.read_text())["bytes"] // SIZE
    assert gone(json.loads(count.read_text())["pid"])


def test_compare_command_adds_the_users_servers_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's wiring, without running a sweep: the names join the designs, the commands
    reach the matrix, and the recorded command line gives them back."""
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_compare(make_backend: object, matrix: sweep.Matrix, **kwargs: object) -> None:
        seen.update(matrix=matrix, **kwargs)
        raise Stop

    monkeypatch.setattr(sweep, "compare", fake_compare)
    command = echo_cmd()
    args = ["compare", "--local", "--designs", "fork", "--peer", f"mine={command}"]
    with pytest.raises(Stop):
        runner.invoke(
            app, [*args, "--mount", str(tmp_path), "--out", str(tmp_path)], catch_exceptions=False
        )
    matrix = seen["matrix"]
    assert isinstance(matrix, sweep.Matrix)
    assert matrix.designs == ["fork", "mine"]
    assert matrix.user_servers == {"mine": command} and matrix.mounts == [str(tmp_path)]
    recorded = shlex.split(str(seen["command"]))
    assert recorded[recorded.index("--peer") + 1] == f"mine={command}"
    assert recorded[recorded.index("--mount") + 1] == str(tmp_path)
    assert recorded[recorded.index("--designs") + 1] == "fork,mine"


# -- every mistake: one line naming the fix, a non-zero exit ------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["--server-cmd", ""], 2, ["is empty", "{port}"]),
        (["--server-cmd", "   "], 2, ["is empty"]),
        (["--server-cmd", "python3 server.py 12345"], 2, ["has no {port}", "put {port}"]),
        (["--server-cmd", "python3 'x {port}"], 2, ["No closing quotation"]),
        (["--server-cmd", "no-such-program-here {port}"], 1, ["'no-such-program-here'", "install"]),
        (["--server-cmd", "./not-here.py {port}"], 1, ["not an executable file", "its path"]),
        (["--server-cmd", "x {port}", "--name", "fork"], 2, ["'fork'", "taken", "another"]),
        (["--server-cmd", "x {port}", "--name", "peer-asyncio"], 2, ["'peer-asyncio'", "taken"]),
        (["--server-cmd", "x {port}", "--name", "a b"], 2, ["'a b'", "letters, digits"]),
        (["--server-cmd", "x {port}", "--design", "fork"], 2, ["give one"]),
        (["--server-cmd", "x {port}", "--mount", "/no/such/path"], 2, ["/no/such/path", "exists"]),
        (["--name", "mine"], 2, ["--name is for --server-cmd"]),
        (["--design", "nope"], 2, ["unknown design 'nope'"]),
    ],
)
def test_bench_user_server_mistakes_are_one_line(
    args: list[str], code: int, fragments: list[str]
) -> None:
    result = runner.invoke(app, ["bench", "--local", *args])
    assert result.exit_code == code, result.output
    one_line_error(result.output, *fragments)


def test_a_server_that_exits_at_once_shows_its_last_stderr_line() -> None:
    crash = shlex.join(
        [
            sys.executable,
            "-c",
            "import sys; print('starting'); sys.exit('bad flag: --prot')",
            "{port}",
        ]
    )
    result = runner.invoke(app, ["bench", "--local", "--server-cmd", crash])
    assert result.exit_code == 1, result.output
    one_line_error(result.output, "exited at once (code 1)", "bad flag: --prot")


def test_a_server_that_never_accepts_names_the_port_and_the_placeholder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(usercmd, "READY_TIMEOUT", 0.5)
    # It runs, but listens on no port at all (it ignores the one it was given).
    idle = shlex.join([sys.executable, "-c", "import time; time.sleep(60)", "{port}"])
    result = runner.invoke(app, ["bench", "--local", "--server-cmd", idle])
    assert result.exit_code == 1, result.output
    one_line_error(
        result.output, "did not accept on port", "within 0.5 s", "does it listen on {port}?"
    )


@pytest.mark.parametrize(
    ("peer", "fragments"),
    [
        ("mine", ["give NAME=CMD"]),
        ("=python3 x.py {port}", ["give NAME=CMD"]),
        ("mine=", ["is empty"]),
        ("mine=python3 x.py", ["has no {port}"]),
        ("iterative=python3 x.py {port}", ["'iterative'", "taken"]),
        ("peer-c-epoll=python3 x.py {port}", ["'peer-c-epoll'", "taken"]),
        ("spawn+cat=python3 x.py {port}", ["'spawn+cat'"]),
    ],
)
def test_compare_peer_mistakes_are_one_line(
    tmp_path: Path, peer: str, fragments: list[str]
) -> None:
    result = runner.invoke(app, ["compare", "--local", "--peer", peer, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    one_line_error(result.output, *fragments)
    assert not list(tmp_path.iterdir())  # nothing ran


def test_compare_refuses_two_servers_of_one_name(tmp_path: Path) -> None:
    args = ["--peer", "a=x {port}", "--peer", "a=y {port}"]
    result = runner.invoke(app, ["compare", "--local", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    one_line_error(result.output, "'a'", "taken")


def test_compare_stops_before_the_sweep_when_a_users_server_cannot_start(tmp_path: Path) -> None:
    crash = shlex.join([sys.executable, "-c", "import sys; sys.exit('no config file')", "{port}"])
    args = ["compare", "--local", "--designs", "fork", "--peer", f"mine={crash}"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    one_line_error(result.output, "exited at once", "no config file")
    assert not list(tmp_path.iterdir())  # no cell ran, nothing was saved


# -- the pieces --------------------------------------------------------------------------------


def test_placeholders_are_replaced_in_each_word_after_the_split() -> None:
    words = usercmd.parse_command("""awk '{print}' --listen {host}:{port} "a b" """)
    assert usercmd.substitute(words, 8080, "0.0.0.0") == [
        "awk",
        "{print}",  # other braces are the user's
        "--listen",
        "0.0.0.0:8080",
        "a b",
    ]


def test_listening_tells_every_address_from_loopback_only() -> None:
    header = "  sl  local_address rem_address   st\n"
    any4 = header + "   0: 00000000:3039 00000000:0000 0A\n"
    loop4 = header + "   0: 0100007F:3039 00000000:0000 0A\n"
    other = header + "   0: 00000000:3039 0100007F:9999 01\n"  # established, not listening
    any6 = header + "   0: 00000000000000000000000000000000:3039 0000:0000 0A\n"
    assert usercmd.listening([any4], 12345) == "any"
    assert usercmd.listening([loop4, ""], 12345) == "loopback"
    assert usercmd.listening([other, header], 12345) is None
    assert usercmd.listening([loop4, any6], 12345) == "any"
    assert usercmd.listening([any4], 80) is None


def test_the_container_starts_in_the_current_folder_only_when_a_mount_holds_it(
    tmp_path: Path,
) -> None:
    inner = tmp_path / "src"
    inner.mkdir()
    assert usercmd.working_dir([str(tmp_path)], inner) == str(inner)
    assert usercmd.working_dir([str(inner)], inner) == str(inner)
    assert usercmd.working_dir([str(inner)], tmp_path) is None
    assert usercmd.resolve_mounts([inner, inner]) == (str(inner),)
