# The lab's two contracts: `make lab` (the main job) and `make test` (every test).
# Each target sets up what it needs on a fresh machine: the venv, host tools, (later) images.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Host tools the tests use as real peers (socat and nc as clients, gcc for the original C programs).
HOST_TOOLS := socat nc gcc strace

.PHONY: all venv host-tools cpeer test lint lab images transcript-local down clean rehearsal
DESIGN ?= iterative

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# Idempotent: installs only what is missing, and only where apt-get can (root on Debian).
host-tools:
	@missing=""; for t in $(HOST_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  pkgs=$$(echo "$$missing" | sed -e 's/\bnc\b/netcat-openbsd/' -e 's/\bgcc\b/gcc libc6-dev/'); \
	  echo "installing host tools:$$missing"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	  else echo "make: missing$$missing: install them (Debian: apt-get install $$pkgs)" >&2; exit 1; fi; \
	fi

# The C reference peers (peer-c-prefork, peer-c-fork, peer-c-epoll): one static binary, so the
# host's build runs unchanged in the lab image (images.py compiles its own copy the same way).
# Rebuilt only when peer.c changes; static linking needs libc.a (Debian: libc6-dev).
CPEER_SRC := lab/measure/cpeer/peer.c
CPEER := build/bin/lab-cpeer
CPEER_CFLAGS := -O2 -Wall -Wextra -static

cpeer: $(CPEER)

$(CPEER): $(CPEER_SRC) | host-tools
	@[ "$$(gcc -print-file-name=libc.a)" != libc.a ] || { \
	  echo "make: gcc has no libc.a to link $@ statically: install it (Debian: apt-get install libc6-dev)" >&2; exit 1; }
	@mkdir -p $(@D)
	gcc $(CPEER_CFLAGS) -o $@.tmp $< && mv -f $@.tmp $@

# First the files that measure local servers under load (marked `measuring` in
# tests/conftest.py), on their own and before the rest: after the other tests' hundreds of
# thousands of connections (or beside them) their servers' first connects sometimes waited
# more than 5 s — not understood yet. Then the images, where an engine answers: otherwise the
# first Docker test of each worker would wait for the build (minutes on a fresh machine) inside
# its own 120 s timeout (without an engine the Docker tests say so themselves, and fail under
# CI=true). Then two pytest workers (pytest-xdist), each given whole files (--dist loadfile: a
# module's fixtures, such as a bench's lab, are set up once), Docker and loopback files alike:
# two Docker tests may run at once, each in a compose project and on ports of its own.
# (--dist loadgroup kept the Docker tests on one worker, but pytest 9 ignores the group names
# pytest-xdist 3.8 writes into node ids: it had long been spreading tests one by one.)
# TEST_WORKERS=0 runs everything in one process, in order (after the images).
TEST_WORKERS ?= 2
PREBUILD = if $(PY) -c 'import docker; docker.from_env().ping()' >/dev/null 2>&1; then \
	  $(PY) -m lab.orchestration.images || status=$$?; \
	fi

test: venv host-tools cpeer
ifeq ($(TEST_WORKERS),0)
	status=0; $(PREBUILD); \
	$(PY) -m pytest -m "not rehearsal" || status=$$?; \
	exit $$status
else
	status=0; \
	$(PY) -m pytest -m measuring || status=$$?; \
	$(PREBUILD); \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not measuring and not rehearsal" || status=$$?; \
	exit $$status
endif

# The multi-node Swarm rehearsal (scripts/swarm_rehearsal.py): Docker-in-Docker nodes on this
# machine, the lab across them, then nothing left. A few minutes; root (privileged containers).
rehearsal: venv cpeer
	$(PY) -m pytest -m rehearsal tests/integration/test_swarm_rehearsal.py

lint: venv
	$(VENV)/bin/ruff check lab tests scripts
	$(VENV)/bin/ruff format --check lab tests scripts
	$(VENV)/bin/mypy

# The containerised lab: images built from nothing if missing (offline: debootstrap base, host
# wheelhouse), the server and three clients up, their first session's transcript and a table.
# Then every design and peer compared on it (lab compare --quick, a few minutes): the report's
# folder and its summary table close the output.
# On a fresh machine the base image (debootstrap, about a minute) is built while pip installs
# the venv: both mostly wait on the network. build.sh is a no-op when the image exists.
lab: cpeer
	@mkdir -p build; images/base/build.sh >build/base-image.log 2>&1 & base=$$!; \
	$(MAKE) --no-print-directory venv || { kill $$base; exit 1; }; \
	wait $$base || { tail -n 5 build/base-image.log >&2; exit 1; }
	$(VENV)/bin/lab down >/dev/null
	$(VENV)/bin/lab up --design $(DESIGN) --transcript
	$(VENV)/bin/lab compare --quick

images: venv cpeer
	$(PY) -c 'from lab.orchestration.images import ensure_images; print(ensure_images(print))'

down: venv
	$(VENV)/bin/lab down

# The original session on loopback for every design, no Docker needed.
transcript-local: venv
	scripts/transcript.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
