"""Orchestration: the containerised lab (images, compose, containers), through the docker SDK
and whichever compose tool is installed. Above the socket layer; the CLI sits above this."""
