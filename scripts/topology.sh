#!/usr/bin/env bash
# A load-balancer node and its neighbours in network namespaces, for the demo
# and the benchmarks:
#
#   <p>-client (10.100.0.2) --- (10.100.0.1 = listen ip) <p>-lb
#   <p>-lb (10.10k.0.1) --- (10.10k.0.2:8080) <p>-be<k>      k = 1..N
#
# Usage: topology.sh up PREFIX N | down PREFIX
# Only addresses inside these namespaces are ever used.
set -euo pipefail

cmd=${1:?usage: topology.sh up PREFIX N | down PREFIX}
p=${2:?prefix}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# veth quirks (design.md §4): the endpoints turn tx checksum offload off (an
# XDP rewrite would leave a partial checksum behind) and GRO on (redirecting
# into a veth whose peer runs no XDP is otherwise dropped).
endpoint_quirks() {
	nsx "$1" ethtool -K "$2" tx off >/dev/null
	nsx "$1" ethtool -K "$2" gro on >/dev/null
}

case $cmd in
up)
	n=${3:?number of backends}
	ip netns add "$p-client"
	ip netns add "$p-lb"
	for ns in "$p-client" "$p-lb"; do nsx "$ns" ip link set lo up; done
	ip link add eth0 netns "$p-client" type veth peer name lb-client netns "$p-lb"
	nsx "$p-client" ip addr add 10.100.0.2/24 dev eth0
	nsx "$p-client" ip link set eth0 up
	endpoint_quirks "$p-client" eth0
	nsx "$p-lb" ip addr add 10.100.0.1/24 dev lb-client
	nsx "$p-lb" ip link set lb-client up
	for k in $(seq 1 "$n"); do
		ns="$p-be$k"
		ip netns add "$ns"
		nsx "$ns" ip link set lo up
		ip link add eth0 netns "$ns" type veth peer name "lb-be$k" netns "$p-lb"
		nsx "$ns" ip addr add "10.$((100 + k)).0.2/24" dev eth0
		nsx "$ns" ip link set eth0 up
		nsx "$ns" ip route add default via "10.$((100 + k)).0.1"
		endpoint_quirks "$ns" eth0
		nsx "$p-lb" ip addr add "10.$((100 + k)).0.1/24" dev "lb-be$k"
		nsx "$p-lb" ip link set "lb-be$k" up
	done
	;;
down)
	for ns in $(ip netns list | awk '{print $1}' | grep -E "^$p-(client|lb|be[0-9]+)$" || true); do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
		ip netns del "$ns"
	done
	;;
*)
	echo "usage: topology.sh up PREFIX N | down PREFIX" >&2
	exit 2
	;;
esac
