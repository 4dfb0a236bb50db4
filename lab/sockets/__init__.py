"""The socket layer: server designs, their workers, the echo service and the common client.

Standard library only, and nothing here imports from the rest of ``lab``: every server,
parent and worker process carries just what this package needs.
"""
