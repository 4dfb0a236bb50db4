#!/usr/bin/env bash
# The rehearsal node's entrypoint: what moby's hack/dind does, then dockerd.
#
# - securityfs and a writable cgroup hierarchy for the inner containers. On cgroup v1 Docker
#   mounts each hierarchy read-only, and a remount is refused; the node runs in a cgroup
#   namespace of its own (--cgroupns private), so a fresh mount of each hierarchy shows the
#   node's own cgroup as its root: the inner engine's cgroups nest under the node's;
# - on cgroup v2, move this container's processes into a child cgroup first: a cgroup with
#   processes cannot hand its controllers to children ("no internal processes" rule);
# - dockerd on its socket and on TCP 2375 without TLS: reachable only on the rehearsal's own
#   bridge network, by the host that runs the rehearsal (a rehearsal, not a production node).
set -euo pipefail

if [[ -d /sys/kernel/security ]] && ! mountpoint -q /sys/kernel/security; then
  mount -t securityfs none /sys/kernel/security || echo "lab-dind: could not mount securityfs" >&2
fi
if [[ ! -f /sys/fs/cgroup/cgroup.controllers ]]; then # v1: one mount per hierarchy
  while read -r _ dir type opts _; do
    [[ $type == cgroup ]] || continue
    keep=$(tr , '\n' <<<"$opts" | grep -vxE 'ro|rw|nosuid|nodev|noexec|relatime' | paste -sd,)
    umount "$dir" && mount -t cgroup -o "$keep" cgroup "$dir" ||
      echo "lab-dind: could not mount the cgroup hierarchy $dir read-write" >&2
  done < <(grep ' cgroup ' /proc/mounts)
else
  mkdir -p /sys/fs/cgroup/init
  xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
  sed -e 's/ / +/g' -e 's/^/+/' </sys/fs/cgroup/cgroup.controllers \
    >/sys/fs/cgroup/cgroup.subtree_control || :
fi
exec dockerd --host=unix:///var/run/docker.sock --host=tcp://0.0.0.0:2375 --tls=false "$@"
