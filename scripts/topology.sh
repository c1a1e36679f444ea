#!/usr/bin/env bash
# A load-balancer node and its neighbours in network namespaces, for the demo
# and the benchmarks. Two shapes:
#
# up (two-armed): the lb routes between its own links
#   <p>-client (10.100.0.2) --- (10.100.0.1 = listen ip) <p>-lb
#   <p>-lb (10.10k.0.1) --- (10.10k.0.2:8080) <p>-be<k>      k = 1..N
#
# up-one-armed: everyone on one L2 segment, the lb with a single NIC, as on
# a kind/Docker node; the switch is a Linux bridge whose ports run no XDP
#   <p>-client eth0 10.200.0.2/24       --- pc   \
#   <p>-lb     eth0 10.200.0.1/24 (listen) --- pl  +- br0 in <p>-sw
#   <p>-be<k>  eth0 10.200.0.(10+k)/24  --- pb<k> /        k = 1..N
#   The lb's port pl has GRO off by default (gro-off): its peer then takes
#   no XDP frames and XLB picks generic mode; gro-on lets it take them.
#
# Usage: topology.sh up PREFIX N | up-one-armed PREFIX N [gro-on|gro-off]
#        | down PREFIX   (down removes either shape)
# Only addresses inside these namespaces are ever used.
set -euo pipefail

usage="usage: topology.sh up PREFIX N | up-one-armed PREFIX N [gro-on|gro-off] | down PREFIX"
cmd=${1:?$usage}
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
up-one-armed)
	n=${3:?number of backends}
	case ${4:-gro-off} in
	gro-on) lb_port_gro=on ;;
	gro-off) lb_port_gro=off ;;
	*) echo "$usage" >&2; exit 2 ;;
	esac
	sw="$p-sw"
	ip netns add "$sw"
	nsx "$sw" ip link set lo up
	nsx "$sw" ip link add br0 type bridge
	nsx "$sw" ip link set br0 up
	# plug NS PORT ADDR: NS's eth0 on bridge port PORT, with ADDR/24.
	plug() {
		ip netns add "$1"
		nsx "$1" ip link set lo up
		ip link add eth0 netns "$1" type veth peer name "$2" netns "$sw"
		nsx "$sw" ip link set "$2" master br0
		nsx "$sw" ip link set "$2" up
		nsx "$1" ip addr add "$3/24" dev eth0
		nsx "$1" ip link set eth0 up
	}
	plug "$p-client" pc 10.200.0.2
	nsx "$p-client" ethtool -K eth0 tx off >/dev/null
	plug "$p-lb" pl 10.200.0.1
	nsx "$sw" ethtool -K pl gro "$lb_port_gro" >/dev/null
	for k in $(seq 1 "$n"); do
		plug "$p-be$k" "pb$k" "10.200.0.$((10 + k))"
		nsx "$p-be$k" ethtool -K eth0 tx off >/dev/null
	done
	;;
down)
	for ns in $(ip netns list | awk '{print $1}' | grep -E "^$p-(client|lb|be[0-9]+|sw)$" || true); do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
		ip netns del "$ns"
	done
	;;
*)
	echo "$usage" >&2
	exit 2
	;;
esac
