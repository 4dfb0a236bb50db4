"""lab — the server-design lab.

Layers, arrows pointing down: ``lab.cli`` (Typer) → ``lab.sockets`` (standard library only).
"""

__version__ = "0.1.0"
