#!/usr/bin/env bash
# The client containers' command (installed as /usr/local/bin/lab-client-intro).
#
# 1. Work out this container's name, client-N. On Swarm the stack file sets the hostname to
#    client-<task slot> (lab/orchestration/stackfile.py); otherwise: compose names replicas PROJECT_client_N (v1) or
#    PROJECT-client-N (v2) and Docker's embedded DNS answers a reverse lookup of the container's
#    own address with that name (e.g. lab_client_2.lab_labnet). /etc/hosts maps the address to
#    the hostname (the container ID) and comes first in nsswitch.conf, so ask DNS only
#    (getent -s dns). Without an answer (no user-defined network, plain `docker run`), fall back
#    to the hostname.
# 2. Wait (up to LAB_INTRO_WAIT seconds, default 60) until the server answers on its health
#    port: compose starts the clients only once it does (depends_on: service_healthy), Swarm
#    starts them in no order. The health port is counted apart and never traced.
# 3. Send LAB_INTRO_MESSAGES (default 3) messages to LAB_SERVER (default bakawali) with
#    `lab client`, like the chapter's clients; a failed exchange prints its line and the next goes.
#    A kv server (LAB_SERVICE=kv) answers lines of commands, not echoes — an echo would wait for
#    its timeout and fail — so each message is a GET of the client's own intro key instead: a
#    read, nothing written to the user's database.
# 4. Stay up, idle, so that `lab exec-client` can run more work in this container.
set -uo pipefail

own_name() {
  local ip fqdn short
  if [[ $(hostname) =~ ^client-[0-9]+$ ]]; then
    hostname
    return
  fi
  ip=$(ip -4 -o addr show scope global 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
  if [[ -n $ip ]]; then
    fqdn=$(getent -s dns hosts "$ip" 2>/dev/null | awk '{ print $2; exit }')
    short=${fqdn%%.*}               # lab_client_2 or lab-client-2
    if [[ $short =~ [_-]([0-9]+)$ ]]; then
      printf 'client-%s\n' "${BASH_REMATCH[1]}"
      return
    fi
  fi
  printf 'client-%s\n' "$(hostname)"
}

me=$(own_name)
server=${LAB_SERVER:-bakawali}
count=${LAB_INTRO_MESSAGES:-3}
if ! [[ $count =~ ^[0-9]+$ ]]; then
  printf '%s: LAB_INTRO_MESSAGES=%q is not a whole number: sending 3 messages\n' "$me" "$count" >&2
  count=3
fi

server_answers() {
  local reply
  { exec 3<>"/dev/tcp/$server/${LAB_HEALTH_PORT:-12346}" && read -r -t 2 reply <&3 &&
    [[ $reply == ok ]]; } 2>/dev/null
  local ok=$?
  exec 3>&-
  return $ok
}

for ((waited = 0; waited < ${LAB_INTRO_WAIT:-60}; waited++)); do
  server_answers && break
  sleep 1
done

kv_message() {
  local command="GET intro:$me" reply
  reply=$(lab client "$server" --kv "$command") || return
  printf 'The kv command "%s" successfully received its reply: %s\n' "$command" "$reply"
}

for ((n = 1; n <= count; n++)); do
  if [[ ${LAB_SERVICE:-} == kv ]]; then
    kv_message
  else
    lab client "$server" --message "Test message #$n from $me"
  fi || printf '%s: message #%d to %s failed (exit %d)\n' "$me" "$n" "$server" "$?" >&2
done

exec sleep infinity
