#!/usr/bin/env bash
# A bandwidth-limited cluster on one machine: K ranks, each in a network namespace of its
# own, joined by veth pairs to a bridge that lives in a namespace of its own too (nothing is
# attached to the host's namespaces, so no packet can leave the machine), every link shaped
# by tc in both directions (tbf at --rate; optional netem --delay), then the job started
# once per rank inside its namespace, and every namespace and link removed afterwards, also
# when the job fails or the script is interrupted.
#
#   scripts/netbench/cluster.sh --ranks K [--rate 1gbit|unshaped] [--delay 0.1ms] [--mtu 9000] -- CMD [ARGS...]
#   scripts/netbench/cluster.sh --cleanup      # removes what an earlier, killed run left
#
# CMD runs once per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
# GLOO_SOCKET_IFNAME (=eth0) and NETBENCH_IFACE set; rank r's address is 10.203.0.(r+1)
# inside its namespace (an address on no host network). stdout/stderr of rank r go to
# $NETBENCH_LOGDIR/rank<r>.log when NETBENCH_LOGDIR is set, else rank 0's to this stdout and
# the others' to stderr with a prefix. Exit status: 0 when every rank exited 0, else the
# first non-zero rank status (or 124 when --timeout ran out). Needs root (ip netns, tc);
# without it, it says so and exits 2.
set -euo pipefail

ranks=2 rate=unshaped delay="" mtu=9000 timeout=0 port=29500 cleanup_only=false
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    --mtu) mtu=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --cleanup) cleanup_only=true; shift ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) echo "cluster.sh: unknown option $1" >&2; usage ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "cluster.sh: needs root (network namespaces, veth, tc); run it as root or under sudo" >&2
  exit 2
fi
for tool in ip tc; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: '$tool' not found (Debian: apt-get install iproute2)" >&2; exit 2; }
done

# Namespaces are named gsnb<pid>-<r> and gsnb<pid>-br; --cleanup removes those whose pid is gone.
remove_stale() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^gsnb[0-9]*-' || true); do
    pid=${ns#gsnb}; pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then ip netns del "$ns" 2>/dev/null || true; fi
  done
}
if $cleanup_only; then remove_stale; exit 0; fi
[ $# -gt 0 ] || { echo "cluster.sh: no command after --" >&2; usage; }
case "$ranks" in '' | *[!0-9]*) echo "cluster.sh: --ranks must be a positive integer, got '$ranks'" >&2; exit 2 ;; esac
if [ "$ranks" -lt 1 ] || [ "$ranks" -gt 64 ]; then echo "cluster.sh: --ranks must lie in [1, 64], got $ranks" >&2; exit 2; fi

# tbf's bucket: enough for one GSO segment and 0.5 ms at the rate, so the link is smooth
# rather than bursty at every rate from 10 Mbit/s to 100 Gbit/s.
rate_bits() {
  local v=$1 n u
  n=$(printf '%s' "$v" | sed -E 's/^([0-9.]+).*/\1/'); u=$(printf '%s' "$v" | sed -E 's/^[0-9.]+//' | tr 'A-Z' 'a-z')
  case "$u" in
    gbit) awk -v n="$n" 'BEGIN{printf "%d", n*1e9}' ;;
    mbit) awk -v n="$n" 'BEGIN{printf "%d", n*1e6}' ;;
    kbit) awk -v n="$n" 'BEGIN{printf "%d", n*1e3}' ;;
    *) echo "cluster.sh: --rate must look like 100mbit, 1gbit, 10gbit or be 'unshaped', got '$v'" >&2; exit 2 ;;
  esac
}
shape() { # ns dev
  local ns=$1 dev=$2 parent="root"
  if [ -n "$delay" ]; then
    if ! ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000; then
      echo "cluster.sh: --delay needs tc's netem qdisc, which this kernel ($(uname -r)) does not provide (module sch_netem)" >&2
      exit 2
    fi
    parent="parent 1:"
  fi
  if [ "$rate" != unshaped ]; then
    local bits burst
    bits=$(rate_bits "$rate")
    burst=$(awk -v b="$bits" 'BEGIN{x=b/8*0.0005; if (x < 65536) x = 65536; printf "%d", x}')
    # shellcheck disable=SC2086
    ip netns exec "$ns" tc qdisc add dev "$dev" $parent handle 2: tbf rate "$bits" burst "$burst" latency 200ms
  fi
}

tag="gsnb$$"
br="$tag-br"
pids=()
made=()
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
  # Deleting a namespace deletes the veth ends inside it, and with them their peers.
  for ns in "${made[@]:-}"; do [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true; done
  if ip netns list 2>/dev/null | grep -q "^$tag-"; then
    echo "cluster.sh: teardown left namespaces behind: $(ip netns list | grep "^$tag-" | tr '\n' ' ')" >&2
    rc=1
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$br"; made+=("$br")
ip -n "$br" link set lo up
ip -n "$br" link add br0 type bridge
ip -n "$br" link set br0 mtu "$mtu" up
for r in $(seq 0 $((ranks - 1))); do
  ns="$tag-$r"
  ip netns add "$ns"; made+=("$ns")
  ip -n "$ns" link set lo up
  # created inside the rank's namespace, peer moved into the bridge's: never in the host's
  ip -n "$ns" link add eth0 mtu "$mtu" type veth peer name "p$r" mtu "$mtu" netns "$br"
  ip -n "$ns" addr add "10.203.0.$((r + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$br" link set "p$r" master br0 up
  shape "$ns" eth0   # the rank's uplink
  shape "$br" "p$r"  # its downlink
done

logdir=${NETBENCH_LOGDIR:-}
[ -n "$logdir" ] && mkdir -p "$logdir"
for r in $(seq 0 $((ranks - 1))); do
  ns="$tag-$r"
  envs=(RANK="$r" LOCAL_RANK="$r" WORLD_SIZE="$ranks" MASTER_ADDR=10.203.0.1 MASTER_PORT="$port"
    GLOO_SOCKET_IFNAME=eth0 NETBENCH_IFACE=eth0 NETBENCH_RATE="$rate" NETBENCH_DELAY="${delay:-0}")
  if [ -n "$logdir" ]; then
    ip netns exec "$ns" env "${envs[@]}" "$@" >"$logdir/rank$r.log" 2>&1 &
  elif [ "$r" -eq 0 ]; then
    ip netns exec "$ns" env "${envs[@]}" "$@" &
  else
    ip netns exec "$ns" env "${envs[@]}" "$@" 2>&1 | sed -u "s/^/[rank $r] /" >&2 &
  fi
  pids+=($!)
done

status=0
deadline=$(( $(date +%s) + timeout ))
for i in "${!pids[@]}"; do
  p=${pids[$i]}
  if [ "$timeout" -gt 0 ]; then
    while kill -0 "$p" 2>/dev/null; do
      if [ "$(date +%s)" -ge "$deadline" ]; then echo "cluster.sh: --timeout $timeout s ran out" >&2; exit 124; fi
      sleep 0.1
    done
  fi
  rc=0; wait "$p" || rc=$?
  pids[$i]=""
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "cluster.sh: rank $i exited with status $rc" >&2
  fi
done
exit "$status"
