"""``python -m lab.sockets [options]``: run a server (see :mod:`lab.sockets.serve`)."""

from lab.sockets.serve import main

raise SystemExit(main())
