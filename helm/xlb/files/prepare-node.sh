#!/bin/sh
# Sets the net.ipv4.conf sysctls that `xlb run` needs on the interfaces it
# attaches to, as xlb itself does (src/netinfo.rs, prepare_sysctls):
#   forwarding=1, accept_local=1, and an effective rp_filter (the larger of
#   conf.all and the interface's) of 1, strict, made loose by setting the
#   interface's to 2; conf.all is left alone.
# xlb sets them itself, over rtnetlink, in an unprivileged container; this
# script is what the chart's deprecated privileged init container
# (nodePrep.enabled) runs. Interfaces: XLB_INTERFACES (config.interfaces) if set,
# else the one holding XLB_LISTEN_IP (config.listen.ip), else the one of the
# IPv4 default route (listen: auto).
set -eu

conf=/proc/sys/net/ipv4/conf

ifaces=${XLB_INTERFACES:-}
if [ -z "$ifaces" ] && [ -n "${XLB_LISTEN_IP:-}" ]; then
	ifaces=$(ip -4 -o addr show | awk -v ip="$XLB_LISTEN_IP" '{ split($4, a, "/"); if (a[1] == ip) { print $2; exit } }')
	[ -n "$ifaces" ] || { echo "prepare-node: no interface holds $XLB_LISTEN_IP" >&2; exit 1; }
fi
if [ -z "$ifaces" ]; then
	ifaces=$(ip -4 route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
	[ -n "$ifaces" ] || { echo "prepare-node: no IPv4 default route; set config.interfaces" >&2; exit 1; }
fi

set_conf() { # interface key value
	old=$(cat "$conf/$1/$2")
	if [ "$old" != "$3" ]; then
		echo "$3" >"$conf/$1/$2"
		echo "prepare-node: net.ipv4.conf.$(echo "$1" | tr . /).$2 $old -> $3"
	fi
}

for ifc in $ifaces; do
	if [ ! -d "$conf/$ifc" ]; then
		echo "prepare-node: no IPv4 configuration for interface $ifc" >&2
		exit 1
	fi
	set_conf "$ifc" forwarding 1
	set_conf "$ifc" accept_local 1
	all=$(cat "$conf/all/rp_filter")
	this=$(cat "$conf/$ifc/rp_filter")
	max=$all
	[ "$this" -le "$max" ] || max=$this
	[ "$max" != 1 ] || set_conf "$ifc" rp_filter 2 # strict -> loose
done
echo "prepare-node: ready: $ifaces"
