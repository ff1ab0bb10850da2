#!/usr/bin/env bash
# Hosts on one machine: K Linux network namespaces TAGh0 .. TAGh<K-1>, each with eth0 at
# SUBNET.<i+1>/24, a veth whose peer is on the bridge TAGb (a non-blocking switch). With RATE (a tc
# rate: 10gbit, 25gbit, ...) each eth0's egress is shaped by tbf to it: a NIC of that speed.
#   deploy/netns.sh up TAG K SUBNET [RATE]   on failure removes what it made, says which step failed
#   deploy/netns.sh down TAG K               kills what still runs in the namespaces, removes them
# Needs root and iproute2. Used by deploy/multihost.sh and `lmsgd-bench allreduce --link`.
set -euo pipefail

down() {
  local tag=$1 k=$2 i p
  for ((i = 0; i < k; ++i)); do
    for p in $(ip netns pids "${tag}h$i" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "${tag}h$i" 2>/dev/null || true
  done
  ip link del "${tag}b" 2>/dev/null || true
}

step() {
  if ! out=$("$@" 2>&1); then
    echo "netns.sh: failed: $* ($out)" >&2
    return 1
  fi
}

up() {
  local tag=$1 k=$2 subnet=$3 rate=${4:-} i
  step ip link add "${tag}b" type bridge || return 1
  step ip link set "${tag}b" up || return 1
  for ((i = 0; i < k; ++i)); do
    local ns="${tag}h$i"
    step ip netns add "$ns" || return 1
    step ip link add "${tag}v$i" type veth peer name eth0 netns "$ns" || return 1
    step ip link set "${tag}v$i" master "${tag}b" up || return 1
    step ip netns exec "$ns" ip addr add "$subnet.$((i + 1))/24" dev eth0 || return 1
    step ip netns exec "$ns" ip link set eth0 up || return 1
    step ip netns exec "$ns" ip link set lo up || return 1
    if [ -n "$rate" ]; then
      # A 256 KiB bucket, a fifth of a millisecond at 10 Gbit/s: a message of a megabyte or more
      # moves at the rate, not in one burst.
      step ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms || return 1
    fi
  done
}

case "${1:-}" in
  up)
    [ $# -ge 4 ] || { echo "usage: netns.sh up TAG K SUBNET [RATE]" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "netns.sh: needs root (ip netns, tc)" >&2; exit 1; }
    up "$2" "$3" "$4" "${5:-}" || { down "$2" "$3"; exit 1; }
    ;;
  down)
    [ $# -ge 3 ] || { echo "usage: netns.sh down TAG K" >&2; exit 2; }
    down "$2" "$3"
    ;;
  *) echo "usage: netns.sh up TAG K SUBNET [RATE] | down TAG K" >&2; exit 2 ;;
esac
