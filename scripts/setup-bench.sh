#!/usr/bin/env bash
# Installs what `make bench` needs on Debian 12, when missing: the load
# generator (wrk), the backends' HTTP server (nginx), the peers XLB is
# compared with (nftables, haproxy, nginx stream) and tools (iperf3, bpftool, jq).
# Idempotent and quiet when everything is there. Services are never started
# by the install: the bench runs its own copies inside network namespaces.
set -euo pipefail

declare -A need=(
	[wrk]=/usr/bin/wrk
	[nginx-light]=/usr/sbin/nginx
	[libnginx-mod-stream]=/usr/lib/nginx/modules/ngx_stream_module.so
	[haproxy]=/usr/sbin/haproxy
	[nftables]=/usr/sbin/nft
	[iperf3]=/usr/bin/iperf3
	[bpftool]=/usr/sbin/bpftool
	[jq]=/usr/bin/jq
	[python3]=/usr/bin/python3
	[iproute2]=/usr/sbin/ip
	[ethtool]=/usr/sbin/ethtool
	[curl]=/usr/bin/curl
	[util-linux]=/usr/bin/nsenter
)
missing=()
for pkg in "${!need[@]}"; do
	[ -e "${need[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup-bench: missing packages: ${missing[*]} (run as root to install them)" >&2
		exit 1
	fi
	echo "setup-bench: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Never start the distribution's own nginx/haproxy services: a
	# policy-rc.d that refuses is added for the install when none exists.
	added_policy=
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		added_policy=1
	fi
	trap '[ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
