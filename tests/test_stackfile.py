"""One topology, two targets: the Swarm stack file generated from compose.yaml describes the same
services with the same images, commands, environment, labels, health check and hardening, and
differs only where lab.orchestration.stackfile.DIFFERENCES says (each with its reason)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab.orchestration import stackfile, swarm
from lab.orchestration.engine import LabError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return stackfile.load_compose(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def stack(compose: dict[str, Any]) -> dict[str, Any]:
    return stackfile.stack_file(compose)


LISTED = {d.key for d in stackfile.DIFFERENCES}


def test_the_stack_file_has_the_same_services_and_volumes(
    compose: dict[str, Any], stack: dict[str, Any]
) -> None:
    assert list(stack["services"]) == list(compose["services"]) == ["server", "client"]
    assert stack["volumes"] == compose["volumes"]
    assert list(stack["networks"]) == list(compose["networks"])


@pytest.mark.parametrize("service", ["server", "client"])
def test_every_key_is_the_same_or_listed_as_a_difference(
    compose: dict[str, Any], stack: dict[str, Any], service: str
) -> None:
    ours, theirs = compose["services"][service], stack["services"][service]
    changed = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
    # What the generator added in place of a listed key (tmpfs → volumes, mem_limit → deploy,
    # a client's hostname from its slot under the "deploy" entry's placement) is the listed one's.
    replaced_by = {"volumes": "tmpfs", "hostname": "deploy"}
    unlisted = {replaced_by.get(key, key) for key in changed} - LISTED
    assert not unlisted, f"{service}: {sorted(unlisted)} differ but DIFFERENCES does not say why"
    for key in ("image", "environment", "env_file", "command", "cap_drop", "read_only", "init"):
        assert theirs.get(key) == ours.get(key), key
    assert theirs.get("healthcheck") == ours.get("healthcheck")
    assert theirs.get("sysctls") == ours.get("sysctls")  # Swarm takes them (engine ≥ 19.03)


def test_each_difference_says_what_replaces_it_and_why() -> None:
    for difference in stackfile.DIFFERENCES:
        assert difference.swarm and len(difference.why) > 20, difference.key
    assert len(LISTED) == len(stackfile.DIFFERENCES)  # each key in one place


def test_the_hardening_and_limits_are_carried_over_under_deploy(
    compose: dict[str, Any], stack: dict[str, Any]
) -> None:
    for name in ("server", "client"):
        ours, theirs = compose["services"][name], stack["services"][name]
        limits = theirs["deploy"]["resources"]["limits"]
        assert limits == {"memory": ours["mem_limit"], "pids": ours["pids_limit"]}
        assert {"type": "tmpfs", "target": "/tmp"} in theirs["volumes"]
        assert theirs["deploy"]["labels"] == ours["labels"]
        assert theirs["deploy"]["endpoint_mode"] == "dnsrr"  # no IPVS: no virtual IP
        assert "ports" not in theirs and "security_opt" not in theirs
    assert stack["services"]["client"]["deploy"]["replicas"] == "${LAB_CLIENTS:-3}"


def test_the_server_keeps_its_name_and_the_network_spans_the_nodes(stack: dict[str, Any]) -> None:
    server = stack["services"]["server"]
    assert server["hostname"] == "bakawali"
    assert server["networks"]["labnet"]["aliases"] == ["bakawali"]
    assert stack["networks"]["labnet"]["driver"] == "overlay"
    assert stack["networks"]["labnet"]["attachable"] is True
    assert stack["services"]["client"]["hostname"] == "client-{{.Task.Slot}}"
    assert stack["services"]["client"]["deploy"]["placement"] == {
        "preferences": [{"spread": "node.id"}]
    }


def test_a_server_node_becomes_a_placement_constraint(compose: dict[str, Any]) -> None:
    placed = stackfile.stack_file(compose, server_node="node-2")
    assert placed["services"]["server"]["deploy"]["placement"]["constraints"] == [
        "node.hostname == node-2"
    ]
    assert (
        "constraints"
        not in stackfile.stack_file(compose)["services"]["server"]["deploy"]["placement"]
    )


def test_publish_puts_the_servers_port_on_its_node_in_host_mode_and_nothing_else(
    compose: dict[str, Any],
) -> None:
    published = stackfile.stack_file(compose, publish=23456)
    target = int(compose["services"]["server"]["ports"][0].rsplit(":", 1)[1])
    assert published["services"]["server"]["ports"] == [
        {"target": target, "published": 23456, "protocol": "tcp", "mode": "host"}  # no mesh
    ]
    assert "ports" not in published["services"]["client"]


def test_the_migrate_req_override_adds_its_sysctl(compose: dict[str, Any]) -> None:
    override = stackfile.load_compose(ROOT / "images/compose.migrate-req.yaml")
    stack = stackfile.stack_file(compose, overrides=(override,))
    assert stack["services"]["server"]["sysctls"] == {
        "net.ipv4.tcp_syncookies": 0,
        "net.ipv4.tcp_migrate_req": 1,
    }


def test_the_written_file_says_it_is_generated_and_reads_back(tmp_path: Path) -> None:
    import yaml

    labels = {swarm.ENGINES_LABEL: "[]"}
    path = stackfile.write_stack_file(ROOT, tmp_path / "stack.yaml", server_labels=labels)
    text = path.read_text()
    assert text.startswith("# Generated by lab")
    content = yaml.safe_load(text)
    assert content["version"] == stackfile.STACK_VERSION
    assert content["services"]["server"]["deploy"]["labels"][swarm.ENGINES_LABEL] == "[]"
    # the recorded labels go on the service only: the server's containers keep compose's
    assert swarm.ENGINES_LABEL not in content["services"]["server"]["labels"]


class FakeEngine:
    def __init__(self, swarm_info: dict[str, Any]) -> None:
        self._info = {"Swarm": swarm_info}

    def info(self) -> dict[str, Any]:
        return self._info


@pytest.mark.parametrize(
    "info",
    [
        {"LocalNodeState": "inactive", "ControlAvailable": False},
        {"LocalNodeState": "active", "ControlAvailable": False},  # a worker node
    ],
)
def test_up_on_swarm_refuses_an_engine_that_is_no_manager_naming_swarm_init(
    info: dict[str, Any],
) -> None:
    engine: Any = FakeEngine(info)
    with pytest.raises(LabError, match="not a swarm manager: run `docker swarm init`"):
        swarm.require_manager(engine)
    assert swarm.services(engine, "lab") == []  # and nothing is deployed there


class FakeNode:
    def __init__(self, node_id: str, hostname: str, availability: str = "active") -> None:
        self.id = node_id
        self.attrs = {
            "Description": {"Hostname": hostname},
            "Spec": {"Role": "worker", "Availability": availability},
            "Status": {"State": "ready"},
        }


class FakeImages:
    """An engine's images: which it has, and what was loaded into it."""

    def __init__(self, have: set[str]) -> None:
        self.have = have
        self.loaded: list[bytes] = []

    def get(self, name: str) -> Any:
        from docker.errors import ImageNotFound

        if name not in self.have:
            raise ImageNotFound(name)
        image: Any = type(
            "Image", (), {"save": lambda _self, named: iter([b"tar:" + name.encode()])}
        )
        return image()

    def load(self, chunks: Any) -> None:
        self.loaded.append(b"".join(chunks))


class FakeNodeEngine(FakeEngine):
    def __init__(self, node_id: str, have: set[str], nodes: list[FakeNode] | None = None) -> None:
        super().__init__({"LocalNodeState": "active", "NodeID": node_id})
        self.images = FakeImages(have)
        self.nodes = type("Nodes", (), {"list": lambda _self: list(nodes or [])})()


def a_swarm_of_three(have_on_2: set[str]) -> tuple[Any, Any]:
    """A manager (node m, which has the image) and nodes w1, w2 whose engines are listed."""
    every = [FakeNode("m", "manager"), FakeNode("w1", "node-1"), FakeNode("w2", "node-2")]
    manager = FakeNodeEngine("m", {"lab:1"}, every)
    return manager, FakeNodeEngine("w2", have_on_2)


def test_a_node_whose_engine_is_not_listed_stops_the_deploy_naming_it_and_the_fix() -> None:
    manager, node_2 = a_swarm_of_three(set())
    engines: Any = {"m": manager, "w2": node_2}  # node-1's engine was not given
    with pytest.raises(LabError) as refused:
        swarm.ensure_images_on_nodes(manager, "lab:1", engines, None)
    message = str(refused.value)
    assert "node(s) node-1 have lab:1" in message and "--engine URL" in message
    assert "node-2" not in message.split(":")[0]  # only the unlisted one is named
    assert node_2.images.loaded == []  # refused before anything was loaded anywhere


def test_the_image_is_loaded_only_onto_listed_nodes_that_lack_it_and_drained_ones_are_skipped() -> (
    None
):
    every = [
        FakeNode("m", "manager"),
        FakeNode("w1", "node-1"),
        FakeNode("w2", "node-2"),
        FakeNode("w3", "node-3", availability="drain"),  # runs no task: need not be listed
    ]
    manager = FakeNodeEngine("m", {"lab:1"}, every)
    node_1, node_2 = FakeNodeEngine("w1", {"lab:1"}), FakeNodeEngine("w2", set())
    engines: Any = {"m": manager, "w1": node_1, "w2": node_2}
    progress: list[str] = []
    assert swarm.ensure_images_on_nodes(manager, "lab:1", engines, None, progress.append) == ["w2"]
    assert node_2.images.loaded == [b"tar:lab:1"]  # the manager's saved image, streamed
    assert node_1.images.loaded == []  # it had it
    assert progress == ["loading lab:1 onto node node-2"]


def test_an_unknown_server_node_is_refused_naming_the_nodes() -> None:
    manager, node_2 = a_swarm_of_three({"lab:1"})
    with pytest.raises(LabError, match=r"--server-node node-9: no such node \(nodes: manager, "):
        swarm.ensure_images_on_nodes(manager, "lab:1", {"m": manager, "w2": node_2}, "node-9")
