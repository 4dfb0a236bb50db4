"""The registry of server designs: adding a design is one module and one line here.

Each design is named with the module and class that implement it, and imported when first
looked up: a server process imports only the design it runs. That is a measured choice — a
forked child starts as a copy of its parent, and a parent with less memory forks and exits
faster (the ``fork`` design pays that per connection). Iterating over the registry, as the CLI
and the measurements do, imports every design.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

TYPE_CHECKING = False  # typing is not imported at run time (see lab.sockets.base)
if TYPE_CHECKING:
    from lab.sockets.base import Server

# name → "module:Class", in the order `lab designs` lists them
_REGISTRY = {
    "iterative": "lab.sockets.designs.iterative:IterativeServer",
    "spawn": "lab.sockets.designs.spawn:SpawnServer",
    "fork": "lab.sockets.designs.fork:ForkServer",
    "sendmsg": "lab.sockets.designs.sendmsg:SendmsgServer",
    "multi-accept": "lab.sockets.designs.multi_accept:MultiAcceptServer",
    "thread": "lab.sockets.designs.thread:ThreadPerConnectionServer",
    "prethread-accept": "lab.sockets.designs.prethread_accept:PrethreadAcceptServer",
    "thread-pool": "lab.sockets.designs.thread_pool:ThreadPoolServer",
    "select": "lab.sockets.designs.select_loop:SelectServer",
    "asyncio": "lab.sockets.designs.asyncio_loop:AsyncioServer",
    "reuseport": "lab.sockets.designs.reuseport:ReuseportServer",
    "prefork-epoll": "lab.sockets.designs.prefork_epoll:PreforkEpollServer",
}


class _Designs(Mapping[str, "type[Server]"]):
    def __init__(self, registry: dict[str, str]) -> None:
        self._registry = registry
        self._loaded: dict[str, type[Server]] = {}

    def __getitem__(self, name: str) -> type[Server]:
        if name not in self._loaded:
            module, _, cls = self._registry[name].partition(":")
            design: type[Server] = getattr(importlib.import_module(module), cls)
            assert design.name == name, (design.name, name)
            self._loaded[name] = design
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


DESIGNS: Mapping[str, type[Server]] = _Designs(_REGISTRY)
