#!/bin/sh
# Sets the net.ipv4.conf sysctls that `xlb run` needs on the interfaces it
# attaches to, as xlb itself would (src/netinfo.rs, prepare_sysctls):
#   forwarding=1, accept_local=1, and a strict rp_filter (1) made loose (2)
#   on the interface and, if conf.all is strict, on conf.all.
# The xlb container cannot write them (a container's /proc/sys is read-only
# unless it is privileged), so the chart runs this in a privileged init
# container first. Interfaces: XLB_INTERFACES (config.interfaces) if set,
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
	if [ "$max" = 1 ]; then # strict
		set_conf "$ifc" rp_filter 2
		[ "$all" != 1 ] || set_conf all rp_filter 2
	fi
done
echo "prepare-node: ready: $ifaces"
