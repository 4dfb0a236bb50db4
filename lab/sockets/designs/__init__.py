"""The registry of server designs: adding a design is one module and one line here."""

from __future__ import annotations

from lab.sockets.base import Server
from lab.sockets.designs.fork import ForkServer
from lab.sockets.designs.iterative import IterativeServer
from lab.sockets.designs.multi_accept import MultiAcceptServer
from lab.sockets.designs.sendmsg import SendmsgServer
from lab.sockets.designs.spawn import SpawnServer

DESIGNS: dict[str, type[Server]] = {
    design.name: design
    for design in (IterativeServer, SpawnServer, ForkServer, SendmsgServer, MultiAcceptServer)
}
