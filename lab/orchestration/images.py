"""The lab's two images, built with no registry: ``lab-base:<hash>`` and ``lab:<hash>``.

* ``lab-base`` is Debian bookworm from debootstrap (``images/base/build.sh``; see its README).
* ``lab`` is built ``FROM`` it (``images/lab/Dockerfile``): a venv at ``/opt/lab`` installed
  offline from a wheelhouse that this module fills on the host (``build/wheels/``, git-ignored),
  a non-root user, ``lab serve`` as the command, and the C peers' static binary ``lab-cpeer``
  at ``/usr/local/bin/lab-cpeer`` (compiled on the host with gcc: the base has no compiler).

Each tag is a hash of its build inputs: ``lab:<hash>`` covers the package sources, pyproject.toml,
the C peers' source (``lab/measure/cpeer/peer.c``) and compiler flags, everything in
``images/lab/`` and the base image's ID. Changed code therefore means a new tag,
and a container never runs a stale image. ``lab:latest`` follows the newest build (compose.yaml
uses it unless ``LAB_IMAGE`` names a tag).

Every failure a user can meet is a :class:`LabError` whose one line names the fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.orchestration.engine import LABELS, MANAGED_LABEL, LabError, client, repo_root

if TYPE_CHECKING:
    import docker

Progress = Callable[[str], None]

LAB_REPO = "lab"
BASE_REPO = "lab-base"
LATEST = "latest"
ROLE_LABEL = "org.lab.role"
INPUTS_LABEL = "org.lab.inputs"  # the tag's hash, on the image too (docker image inspect)

BASE_SCRIPT = "images/base/build.sh"
LAB_IMAGE_DIR = "images/lab"
WHEELHOUSE = "build/wheels"
_STAMP = ".lab-wheelhouse.json"
_TAG_HEX = 12
# The C peers: one static program, so the host's gcc builds what runs in the image (a Debian
# minbase). The same flags as the Makefile's `cpeer` target.
CPEER_SOURCE = "lab/measure/cpeer/peer.c"
CPEER_BINARY = "lab-cpeer"  # its name in the build context; the image has /usr/local/bin/lab-cpeer
CPEER_CFLAGS = ("-O2", "-Wall", "-Wextra", "-static")


@dataclass(frozen=True)
class Images:
    """References of the images the lab runs: ``lab-base:<hash>`` and ``lab:<hash>``."""

    base: str
    lab: str


# --- build inputs and tags ---------------------------------------------------------------------


def _package_files(root: Path) -> list[Path]:
    """The files of the ``lab`` package that a wheel ships: every ``*.py`` and ``py.typed``."""
    files = [
        path
        for path in (root / "lab").rglob("*")
        if (path.suffix == ".py" or path.name == "py.typed")
        and path.is_file()
        and "__pycache__" not in path.parts
        and not path.name.startswith(".")
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _source_inputs(root: Path) -> list[Path]:
    """What the project's wheel is built from: the package files and pyproject.toml."""
    return [*_package_files(root), root / "pyproject.toml"]


def _cpeer_inputs(root: Path) -> list[Path]:
    """The C peers' source: compiled into the image, so part of its tag."""
    source = root / CPEER_SOURCE
    if not source.is_file():
        raise LabError(f"{CPEER_SOURCE} is missing: restore it from git (git checkout -- lab)")
    return [source]


def _image_dir_files(root: Path) -> list[Path]:
    files = [path for path in (root / LAB_IMAGE_DIR).rglob("*") if path.is_file()]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _digest(root: Path, files: Iterable[Path], extra: Iterable[tuple[str, str]] = ()) -> str:
    """sha256 over (relative path, content) pairs and extra (name, value) pairs, unambiguously."""
    sha = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        sha.update(b"file\0%d\0%s\0%d\0" % (len(name), name, len(data)))
        sha.update(data)
    for key, value in extra:
        raw_key, raw_value = key.encode(), value.encode()
        sha.update(b"value\0%d\0%s\0%d\0" % (len(raw_key), raw_key, len(raw_value)))
        sha.update(raw_value)
    return sha.hexdigest()


def _snapshot(root: Path, dest: Path) -> Path:
    """Copy the build inputs (and README.md, part of the wheel's metadata) into ``dest``.

    The tag is hashed from this copy and the wheel and image are built from it, so an edit made
    meanwhile cannot end up in an image tagged with the hash of the previous sources.
    """
    snap = dest / "snapshot"
    readme = root / "README.md"
    extra = [readme] if readme.is_file() else []
    for path in [*_source_inputs(root), *_cpeer_inputs(root), *_image_dir_files(root), *extra]:
        target = snap / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return snap


def _lab_inputs_hash(root: Path, base_id: str) -> str:
    files = [*_source_inputs(root), *_cpeer_inputs(root), *_image_dir_files(root)]
    extra = [("base-image-id", base_id), ("cpeer-cflags", " ".join(CPEER_CFLAGS))]
    return _digest(root, files, extra)[:_TAG_HEX]


def lab_image_tag(base_id: str) -> str:
    """``lab:<12 hex>``: the hash of the lab image's build inputs.

    They are every ``*.py`` and ``py.typed`` under ``lab/`` (sorted paths and contents),
    pyproject.toml, ``lab/measure/cpeer/peer.c`` and its compiler flags, every file in
    ``images/lab/`` and ``base_id`` (the base image's ID).
    """
    return f"{LAB_REPO}:{_lab_inputs_hash(repo_root(), base_id)}"


def base_image_tag() -> str:
    """``lab-base:<12 hex>``, computed as ``images/base/build.sh`` computes it (without running it).

    The script hashes itself followed by its package list, suite and variant.
    """
    script = repo_root() / BASE_SCRIPT
    try:
        text = script.read_bytes()
    except OSError as exc:
        raise LabError(f"cannot read {BASE_SCRIPT} ({exc.strerror}): restore it from git") from None
    values: dict[str, str] = {}
    for name in ("SUITE", "VARIANT", "PACKAGES"):
        match = re.search(rb'^readonly %s="?([^"\n]*)"?$' % name.encode(), text, re.MULTILINE)
        if match is None:
            raise LabError(
                f"{BASE_SCRIPT} has no 'readonly {name}=' line: update base_image_tag() in "
                "lab/orchestration/images.py to match the script"
            )
        values[name] = match.group(1).decode()
    tail = (
        f"\npackages={values['PACKAGES']}\nsuite={values['SUITE']}\nvariant={values['VARIANT']}\n"
    )
    return f"{BASE_REPO}:{hashlib.sha256(text + tail.encode()).hexdigest()[:_TAG_HEX]}"


# --- the engine --------------------------------------------------------------------------------


def _image_id(engine: docker.DockerClient, ref: str) -> str | None:
    from docker.errors import ImageNotFound

    try:
        return str(engine.images.get(ref).id)
    except ImageNotFound:
        return None


@contextlib.contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Turn the docker SDK's (and requests') errors into a LabError that names the fix."""
    import requests.exceptions
    from docker.errors import DockerException

    try:
        yield
    except (DockerException, requests.exceptions.RequestException) as exc:
        raise _engine_error(what, exc) from None


def _engine_error(what: str, exc: Exception) -> LabError:
    text = " ".join(str(exc).split())
    return LabError(
        f"{what} failed ({text}): check the Docker engine is running and has disk space "
        "(docker system df), then retry"
    )


# --- (a) the base image ------------------------------------------------------------------------


def _ensure_base(root: Path, progress: Progress) -> str:
    """Run images/base/build.sh (a no-op when the image exists); return the ref it prints."""
    script = root / BASE_SCRIPT
    if not script.is_file():
        raise LabError(f"{BASE_SCRIPT} is missing: restore it from git (git checkout -- images)")
    tail: list[str] = []
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as out:
        try:
            proc = subprocess.Popen(
                ["bash", str(script)],
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise LabError(
                f"cannot run {BASE_SCRIPT} ({exc.strerror}): is bash installed?"
            ) from None
        assert proc.stderr is not None
        with proc:
            for line in proc.stderr:
                line = line.rstrip()
                if line:
                    progress(line)
                    tail = [*tail[-9:], line]
        out.seek(0)
        lines = [line.strip() for line in out.read().splitlines() if line.strip()]
    if proc.returncode != 0:
        # build.sh's last stderr line is "build.sh: <what went wrong>: <the fix>".
        last = tail[-1] if tail else f"exit status {proc.returncode}"
        raise LabError(f"building the base image failed: {last}")
    if not lines or not lines[-1].startswith(f"{BASE_REPO}:"):
        raise LabError(
            f"{BASE_SCRIPT} printed no image reference: run it by hand to see what it says"
        )
    return lines[-1]


# --- (b) the wheelhouse ------------------------------------------------------------------------


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def _pip(args: list[str], fix: str) -> None:
    """Run the venv's pip quietly; a failure is a LabError with pip's error line and ``fix``."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", env=env, check=False
        )
    except OSError as exc:
        raise LabError(
            f"cannot run {sys.executable} -m pip ({exc.strerror}): run make venv"
        ) from None
    if result.returncode != 0:
        line = _last_error_line(result.stderr + "\n" + result.stdout)
        raise LabError(f"pip {args[0]} failed ({line}): {fix}")


def _build_requires(root: Path) -> list[str]:
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabError(f"cannot read pyproject.toml ({exc}): fix it") from None
    requires = meta.get("build-system", {}).get("requires", ["setuptools"])
    return [str(req) for req in requires]


def _read_stamp(wheels: Path) -> dict[str, str]:
    try:
        data = json.loads((wheels / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_stamp(wheels: Path, stamp: dict[str, str]) -> None:
    tmp = wheels / (_STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(wheels / _STAMP)


def _lab_wheels(wheels: Path) -> Iterator[Path]:
    return wheels.glob("lab-*.whl")


def _ensure_wheelhouse(root: Path, snap: Path, progress: Progress) -> Path:
    """Fill build/wheels/: pip's wheel, the build backend, the project's wheel and its deps.

    The dependencies are fetched from the package index only when pyproject.toml changes; the
    project's own wheel is rebuilt offline whenever its sources change. A stamp file records the
    hashes that the contents match. The wheel is built from the snapshot ``snap``.
    """
    if importlib.util.find_spec("pip") is None:
        raise LabError(f"pip is not installed for {sys.executable}: run make venv")
    wheels = root / WHEELHOUSE
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    deps_key = _digest(snap, [snap / "pyproject.toml"], [("python", py)])
    source_key = _digest(snap, _source_inputs(snap))
    stamp = _read_stamp(wheels)
    have_pip = any(wheels.glob("pip-*.whl"))
    if stamp.get("deps") == deps_key and stamp.get("source") == source_key and have_pip:
        progress(f"wheels: {WHEELHOUSE} is up to date")
        return wheels

    offline_fix = "check that the package index is reachable (pip config list), then retry"
    fresh = stamp.get("deps") != deps_key or not have_pip
    if fresh:
        progress(f"wheels: fetching pip and the build backend into {WHEELHOUSE}")
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        fetch = ["download", "--dest", str(wheels), "--only-binary=:all:", "pip"]
        _pip([*fetch, *_build_requires(snap)], offline_fix)
    progress("wheels: building the lab wheel (offline)")
    (wheels / _STAMP).unlink(missing_ok=True)
    for old in _lab_wheels(wheels):
        old.unlink()
    offline = ["--no-deps", "--no-index", "--find-links", str(wheels)]
    _pip(
        ["wheel", *offline, "--wheel-dir", str(wheels), str(snap)],
        "fix the error pip reports in pyproject.toml or the package, then retry",
    )
    if fresh:
        progress("wheels: fetching the dependencies")
        built = sorted(_lab_wheels(wheels))
        if not built:
            raise LabError(f"pip wheel left no lab-*.whl in {WHEELHOUSE}: run it by hand")
        _pip(
            # The image installs lab[uvloop] (images/lab/Dockerfile): the extra's wheels too.
            [
                "wheel",
                "--wheel-dir",
                str(wheels),
                "--find-links",
                str(wheels),
                f"{built[0]}[uvloop]",
            ],
            offline_fix,
        )
    _write_stamp(wheels, {"deps": deps_key, "source": source_key})
    return wheels


# --- (c) the C peers' binary -------------------------------------------------------------------


def _compile_cpeer(snap: Path, output: Path) -> None:
    """Compile the snapshot's peer.c, statically, into ``output`` (what the tag was hashed from:
    never build/bin/lab-cpeer, which may come from another version of the source)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LabError(
            "gcc is not installed: it compiles the C peers for the lab image "
            "(make host-tools, or Debian: apt-get install gcc libc6-dev)"
        )
    try:
        result = subprocess.run(
            [gcc, *CPEER_CFLAGS, "-o", str(output), str(snap / CPEER_SOURCE)],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot run {gcc} ({exc}): check the host's gcc, then retry") from None
    if result.returncode != 0:
        if "cannot find -lc" in result.stderr:
            raise LabError(
                "gcc cannot link the C peers statically (no libc.a): "
                "install it (Debian: apt-get install libc6-dev)"
            )
        raise LabError(
            f"gcc failed on {CPEER_SOURCE} ({_last_error_line(result.stderr)}): fix it "
            "(make cpeer shows every message), then retry"
        )
    output.chmod(0o755)


# --- (d) the lab image -------------------------------------------------------------------------


def _build_context(root: Path, wheels: Path, dest: Path) -> Path:
    """A small build context: images/lab/*, wheels/ and the C peers' binary (nothing else from
    the checkout)."""
    context = dest / "context"
    shutil.copytree(root / LAB_IMAGE_DIR, context)
    (context / "client-intro.sh").chmod(0o755)
    (context / "wheels").mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        shutil.copy2(wheel, context / "wheels" / wheel.name)
    _compile_cpeer(root, context / CPEER_BINARY)
    return context


def _build_lab(
    engine: docker.DockerClient, context: Path, tag: str, base_ref: str, progress: Progress
) -> None:
    import requests.exceptions
    from docker.errors import DockerException

    error: str | None = None
    try:
        chunks: Iterator[dict[str, Any]] = engine.api.build(
            path=str(context),
            dockerfile="Dockerfile",
            tag=tag,
            # LAB_INPUTS becomes the org.lab.inputs label (in the Dockerfile: each label given
            # here costs the legacy builder one more step).
            buildargs={"BASE": base_ref, "LAB_INPUTS": tag.partition(":")[2]},
            labels=LABELS,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            network_mode="none",  # every RUN works offline: prove it
        )
        for chunk in chunks:
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("errorDetail") or {}
                error = str(chunk.get("error") or detail.get("message") or chunk)
            for line in str(chunk.get("stream", "")).splitlines():
                if line.strip():
                    progress(line.rstrip())
    except (DockerException, requests.exceptions.RequestException) as exc:
        raise _engine_error(f"building {tag}", exc) from None
    if error is not None:
        error = " ".join(error.split())
        if any(sign in error for sign in ("pull access denied", "No such image", "registry")):
            # A FROM named an image the engine lacks, and the engine cannot pull it.
            raise LabError(
                f"building {tag} failed: {error}: an image in FROM is missing and there is no "
                f"registry; build the base with {BASE_SCRIPT} (FROM must name {base_ref})"
            )
        raise LabError(
            f"building {tag} failed: {error}: fix images/lab/Dockerfile or the wheels "
            f"(rm -rf {WHEELHOUSE} to refetch them) and retry"
        )
    if _image_id(engine, tag) is None:
        raise LabError(f"the build of {tag} reported no error but left no image: retry")


def _retag_latest(engine: docker.DockerClient, ref: str) -> None:
    repo, _, _ = ref.partition(":")
    latest = f"{repo}:{LATEST}"
    image_id = _image_id(engine, ref)
    if image_id is not None and _image_id(engine, latest) != image_id:
        engine.images.get(ref).tag(repo, LATEST)


# Builds of other source snapshots that are kept: a second checkout or a test session may be
# using one of them right now (between its build and its `compose up`).
KEEP_BUILDS = 3


def _drop_stale(engine: docker.DockerClient, keep: str, progress: Progress) -> None:
    """Untag all but the newest KEEP_BUILDS lab:<hash> images (never ``keep``, never one a
    container uses); removing an image also removes its untagged build layers."""
    from docker.errors import APIError

    # A fresh dict each time: images.list(name=…) adds a "reference" key to the one it gets.
    images = engine.images.list(name=LAB_REPO, filters={"label": f"{MANAGED_LABEL}=true"})
    images.sort(key=lambda image: str(image.attrs.get("Created", "")), reverse=True)
    for image in images[KEEP_BUILDS:]:
        for ref in image.tags:
            if ref.startswith(f"{LAB_REPO}:") and ref not in (keep, f"{LAB_REPO}:{LATEST}"):
                try:
                    engine.images.remove(ref)
                    progress(f"removed the outdated image {ref}")
                except APIError:
                    pass  # a container still uses it; `lab down` + remove_images() drop it


def ensure_images(progress: Progress | None = None, force: bool = False) -> Images:
    """Make sure the current ``lab-base`` and ``lab`` images exist, building what is missing.

    (a) runs images/base/build.sh (a no-op while its image exists; building it needs root and
    about a minute); (b) fills the wheelhouse build/wheels/ (deps from the package index only
    when pyproject.toml changed); (c) compiles the C peers (``lab-cpeer``, with the host's gcc)
    and (d) builds ``lab:<hash>`` unless it exists (``force``: rebuild it anyway), then points
    ``lab:latest`` at it. Progress lines go to ``progress``.
    """
    say: Progress = progress if progress is not None else (lambda _line: None)
    root = repo_root()
    engine = client()
    with _engine_errors("building the lab's images"), _build_lock(root, say):
        return _ensure_images(root, engine, say, force)


@contextlib.contextmanager
def _build_lock(root: Path, say: Progress) -> Iterator[None]:
    """One build at a time per checkout: two (a `lab up` and a test session, say) would share
    the wheelhouse and could tidy away each other's images mid-build."""
    lock_path = root / "build" / ".images.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another build of the lab's images is running here: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure_images(root: Path, engine: docker.DockerClient, say: Progress, force: bool) -> Images:
    base_ref = _ensure_base(root, say)
    base_id = _image_id(engine, base_ref)
    if base_id is None:
        raise LabError(f"{BASE_SCRIPT} reported {base_ref} but the engine lacks it: rerun it")
    with tempfile.TemporaryDirectory(prefix="lab-image-") as tmp:
        snap = _snapshot(root, Path(tmp))
        tag = f"{LAB_REPO}:{_lab_inputs_hash(snap, base_id)}"
        if not force and _image_id(engine, tag) is not None:
            say(f"{tag} exists already (its inputs have not changed)")
        else:
            wheels = _ensure_wheelhouse(root, snap, say)
            say(f"building {tag} from {base_ref}")
            context = _build_context(snap, wheels, Path(tmp))
            _build_lab(engine, context, tag, base_ref, say)
            say(f"built {tag}")
            _drop_stale(engine, tag, say)
    _retag_latest(engine, tag)
    return Images(base=base_ref, lab=tag)


def images_present() -> bool:
    """Whether the current ``lab-base:<hash>`` and ``lab:<hash>`` both exist (builds nothing)."""
    engine = client()
    with _engine_errors("looking up the lab's images"):
        base_id = _image_id(engine, base_image_tag())
        return base_id is not None and _image_id(engine, lab_image_tag(base_id)) is not None


def remove_images(include_base: bool = False) -> list[str]:
    """Remove the lab's images (only those labelled org.lab.managed=true); return what went.

    The base image stays unless ``include_base`` (rebuilding it takes root and a minute).
    Raises LabError when a container still uses one: stop the lab first.
    """
    engine = client()
    with _engine_errors("removing the lab's images"):
        return _remove_images(engine, include_base)


def _remove_images(engine: docker.DockerClient, include_base: bool) -> list[str]:
    from docker.errors import APIError, ImageNotFound

    images = engine.images.list(filters={"label": f"{MANAGED_LABEL}=true"})
    # Derived images before the base they come from.
    images.sort(key=lambda image: (image.labels or {}).get(ROLE_LABEL) == "base")
    removed: list[str] = []
    for image in images:
        if (image.labels or {}).get(ROLE_LABEL) == "base" and not include_base:
            continue
        for ref in image.tags or [str(image.id)]:
            try:
                engine.images.remove(ref)
            except ImageNotFound:
                continue  # gone with an image removed before it
            except APIError as exc:
                if exc.status_code == 409:
                    raise LabError(
                        f"cannot remove {ref}: a container still uses it; stop the lab first "
                        "(lab down), then retry"
                    ) from None
                raise _engine_error(f"removing {ref}", exc) from None
            removed.append(ref)
    return removed


def main() -> int:
    """``python -m lab.orchestration.images``: build what is missing (``make test`` runs it
    before the Docker tests); a failure is one line and exit 1."""
    import sys

    try:
        ensure_images()
    except LabError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
