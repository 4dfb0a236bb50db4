#!/usr/bin/env bash
# Build the lab's base image (Debian bookworm minbase + a few network tools) with no registry:
# debootstrap a root filesystem from the Debian mirror the host's apt uses, then `docker import` it.
#
#   images/base/build.sh [--force]      (env: FORCE=1, DEBIAN_MIRROR=http://...)
#
# The tag is lab-base:<12 hex of sha256(this script + package list + suite)>, also tagged
# lab-base:latest. If that tag exists already, the script prints it and exits at once.
# The image reference is always the LAST line of stdout; progress and errors go to stderr.
set -euo pipefail

readonly SUITE=bookworm
readonly VARIANT=minbase
readonly PACKAGES="python3,iproute2,iptables,procps,socat,tcpdump,netcat-openbsd,ca-certificates"
readonly REPO=lab-base
readonly FALLBACK_MIRROR=http://deb.debian.org/debian
readonly MIN_FREE_KB=$((1024 * 1024)) # 1 GiB free under /var/tmp (the rootfs is ~300 MB)

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
readonly SCRIPT_PATH

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'build.sh: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
usage: images/base/build.sh [--force]

Builds the Docker image ${REPO}:<hash> (also ${REPO}:latest) from a debootstrapped Debian
${SUITE} (${VARIANT}) with: ${PACKAGES//,/, }.
Prints the image reference as the last line of stdout. A no-op if the image exists already.

  --force, FORCE=1         rebuild even if the image exists
  DEBIAN_MIRROR=URL        Debian mirror to use (default: the one the host's apt uses,
                           else ${FALLBACK_MIRROR})
EOF
}

force=${FORCE:-0}
[[ $force == 1 || $force == true || $force == yes ]] && force=1 || force=0
for arg in "$@"; do
  case $arg in
  --force) force=1 ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) die "unknown argument '$arg': the only option is --force (see --help)" ;;
  esac
done

# --- the tag: a hash of the build inputs ------------------------------------------------------
input_hash=$(
  {
    cat -- "$SCRIPT_PATH"
    printf '\npackages=%s\nsuite=%s\nvariant=%s\n' "$PACKAGES" "$SUITE" "$VARIANT"
  } | sha256sum | cut -c1-12
)
readonly IMAGE="${REPO}:${input_hash}"
readonly LATEST="${REPO}:latest"

# --- the Docker engine ------------------------------------------------------------------------
command -v docker >/dev/null ||
  die "docker not found: install the Docker engine (Debian: apt-get install docker.io)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
  die "cannot reach the Docker engine: is it running (systemctl start docker) and may you use it?"

image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

if [[ $force == 0 && -n $(image_id "$IMAGE") ]]; then
  # Keep :latest pointing at the current inputs (cheap; no rebuild).
  [[ $(image_id "$LATEST") == "$(image_id "$IMAGE")" ]] || docker tag "$IMAGE" "$LATEST"
  say "${IMAGE} exists already (FORCE=1 or --force rebuilds it)"
  printf '%s\n' "$IMAGE"
  exit 0
fi

# --- host prerequisites -----------------------------------------------------------------------
[[ $(id -u) == 0 ]] ||
  die "building ${IMAGE} needs root (debootstrap, chroot): run 'sudo $0'"

if ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null ||
    die "debootstrap is missing and there is no apt-get: install debootstrap with your package manager"
  say "installing debootstrap on the host (apt-get)"
  if ! apt_out=$({ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } 2>&1); then
    printf '%s\n' "$apt_out" | tail -n 10 >&2
    die "could not install debootstrap: run 'apt-get update && apt-get install debootstrap' and fix its errors"
  fi
fi

free_kb=$(df -Pk /var/tmp | awk 'NR == 2 { print $4 }')
((free_kb >= MIN_FREE_KB)) ||
  die "only $((free_kb / 1024)) MB free under /var/tmp: free at least $((MIN_FREE_KB / 1024)) MB"

# --- the mirror: DEBIAN_MIRROR, else the host apt's mirror for $SUITE, else deb.debian.org ------
host_mirror() {
  local f
  # One-line format: deb [options] URI SUITE COMPONENTS...
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    awk -v suite="$SUITE" '
      $1 == "deb" {
        sub(/\[[^]]*\]/, "")
        if ($3 == suite && $2 ~ /^https?:\/\//) { print $2; exit }
      }' "$f"
  done
  # deb822 format: stanzas with Types:, URIs:, Suites:, Enabled:
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    awk -v suite="$SUITE" '
      function has(list, word,   n, i, a) {
        n = split(list, a, /[ \t]+/)
        for (i = 1; i <= n; i++) if (a[i] == word) return 1
        return 0
      }
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/ || index(line, ":") == 0) continue
          key = tolower(substr(line, 1, index(line, ":") - 1))
          val = substr(line, index(line, ":") + 1)
          gsub(/^[ \t]+|[ \t]+$/, "", val)
          if (key == "types") types = val
          else if (key == "uris") uris = val
          else if (key == "suites") suites = val
          else if (key == "enabled") enabled = tolower(val)
        }
        if (enabled != "no" && has(types, "deb") && has(suites, suite)) {
          n = split(uris, u, /[ \t]+/)
          for (j = 1; j <= n; j++) if (u[j] ~ /^https?:\/\//) { print u[j]; exit }
        }
      }' "$f"
  done
}

if [[ -n ${DEBIAN_MIRROR:-} ]]; then
  mirror=$DEBIAN_MIRROR
else
  mirror=$(host_mirror | head -n1)
  mirror=${mirror:-$FALLBACK_MIRROR}
fi
mirror=${mirror%/}

# --- work dir, removed on exit (after unmounting anything debootstrap left mounted) ------------
work=$(mktemp -d /var/tmp/lab-base.XXXXXX)
readonly work
tmp_tag="${REPO}:building-${input_hash}"

cleanup() {
  local rc=$? mnt
  # A debootstrap killed midway can leave proc/sys (or a bind-mounted /dev) mounted in the
  # target: unmount them, deepest first, so rm cannot reach into the host's filesystems.
  if [[ -r /proc/self/mountinfo ]]; then
    while read -r mnt; do
      umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  fi
  rm -rf --one-file-system -- "$work"
  docker rmi "$tmp_tag" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rootfs="$work/rootfs"
log="$work/debootstrap.log"
start=$SECONDS

# --- debootstrap --------------------------------------------------------------------------------
say "debootstrap ${SUITE} (${VARIANT}) from ${mirror} into ${work} (about a minute)…"
if ! debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
  >"$log" 2>&1; then
  tail -n 15 "$log" >&2 || true
  die "debootstrap failed (log above): check the mirror ${mirror} is reachable, or set DEBIAN_MIRROR=URL"
fi

# --- slim the root filesystem -------------------------------------------------------------------
say "slimming the root filesystem (apt caches, docs, man pages, translations)"
# /usr/share/locale holds only message translations; C.UTF-8 is built into glibc.
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/archives/partial/* \
  "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/var/cache/debconf/*-old
mkdir -p "$rootfs"/var/lib/apt/lists/partial
# Packages installed later (in a derived image) leave docs and caches out too.
cat >"$rootfs"/etc/dpkg/dpkg.cfg.d/90-lab-nodoc <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$rootfs"/etc/apt/apt.conf.d/90-lab-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Install-Recommends "false";
EOF
# Host identity that debootstrap copies in; Docker supplies its own at run time.
: >"$rootfs"/etc/hostname
: >"$rootfs"/etc/resolv.conf
if [[ -e $rootfs/etc/machine-id ]]; then : >"$rootfs"/etc/machine-id; fi
size_mb=$(du -sm --one-file-system "$rootfs" | cut -f1)

# --- docker import ------------------------------------------------------------------------------
say "docker import (${size_mb} MB) as ${IMAGE}"
tar --numeric-owner -C "$rootfs" -c . |
  docker import \
    --change "LABEL org.lab.managed=true org.lab.role=base org.lab.inputs=${input_hash} org.lab.suite=${SUITE}" \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "lab base: debootstrap ${SUITE} ${VARIANT} + ${PACKAGES}" \
    - "$tmp_tag" >/dev/null ||
  die "docker import failed: check the engine has disk space (docker system df) and try again"

# --- check the image works before giving it its real tag ----------------------------------------
check() {
  local what=$1 out
  shift
  if ! out=$(docker run --rm --label org.lab.managed=true --network none "$tmp_tag" "$@" 2>&1); then
    die "the new image fails '${what}': ${out//$'\n'/ } (rerun with --force after fixing)"
  fi
}
say "checking the image (python3, tc)"
check "python3" python3 -c 'import sys; print(sys.version)'
check "tc -V" tc -V

old_id=$(image_id "$IMAGE") # set when rebuilding with --force
docker tag "$tmp_tag" "$IMAGE"
docker tag "$tmp_tag" "$LATEST"
docker rmi "$tmp_tag" >/dev/null # only drops the temporary name
if [[ -n $old_id && $old_id != "$(image_id "$IMAGE")" ]]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true # the replaced build, unless something still uses it
fi

say "built ${IMAGE} (also ${LATEST}) in $((SECONDS - start)) s"
printf '%s\n' "$IMAGE"
