#!/usr/bin/env bash
# XLB on each node shape (README "Node shapes"), side by side with the same
# traffic without XLB in the same run:
#   two-armed                   (scripts/topology.sh up)
#   one-armed, LB peer GRO on   (up-one-armed gro-on: native, bounce by redirect)
#   one-armed, LB peer GRO off  (up-one-armed gro-off: generic mode)
# Per shape: wrk keep-alive and one-connection-per-request (5 s each, 32
# connections), a 100 MB download, and the time a lone new connection takes
# to be refused during the drain. "direct" is the client reaching backend 1
# without XLB (routed by the node when two-armed, on the segment when
# one-armed). XLB's counters are printed to show it did the work.
# Usage (root): bench/shapes.sh   [XLB=target/release/xlb] [SECS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
XLB=${XLB:-target/release/xlb}
SECS=${SECS:-5}
P=xlbshp
work=$(mktemp -d)
pids=()

cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	scripts/topology.sh down "$P" >/dev/null 2>&1
	rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for t in wrk nginx curl; do command -v $t >/dev/null || { echo "missing $t: scripts/setup-bench.sh" >&2; exit 1; }; done

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
chmod 755 "$work"
head -c 100000000 /dev/urandom >"$work/big"
echo hello >"$work/index.html"
chmod 644 "$work/big" "$work/index.html"

backend() { # ns
	local d=$work/$1
	mkdir -p "$d"
	cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  client_body_temp_path $d/b; proxy_temp_path $d/p; fastcgi_temp_path $d/f; uwsgi_temp_path $d/u; scgi_temp_path $d/s;
  server { listen 8080 backlog=4096; root $work; } }
EOF
	nsx "$1" nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf" &
	pids+=($!)
}

rate() { # ns url extra-wrk-args...: requests/s
	local ns=$1 url=$2
	shift 2
	nsx "$ns" wrk -t2 -c32 -d"${SECS}s" "$@" "$url" 2>/dev/null | awk '/Requests\/sec/ { printf "%.0f", $2 }'
}

measure() { # shape-name client lb listen direct-url config
	local name=$1 cl=$2 lb=$3 listen=$4 direct=$5 cfg=$6
	for _ in $(seq 50); do nsx "$cl" curl -fsS -m 1 -o /dev/null "$direct" 2>/dev/null && break; sleep 0.1; done
	local d_ka d_cc d_dl x_ka x_cc x_dl
	d_ka=$(rate "$cl" "$direct")
	d_cc=$(rate "$cl" "$direct" -H "Connection: close")
	d_dl=$(nsx "$cl" curl -fsS -o /dev/null -w '%{speed_download}' "${direct%/}/big")
	nsenter --net=/run/netns/"$lb" "$XLB" run -c "$cfg" >"$work/$name.log" 2>&1 &
	local xpid=$!
	for _ in $(seq 100); do nsx "$lb" curl -fsS -m 1 -o /dev/null http://127.0.0.1:9090/readyz 2>/dev/null && break; sleep 0.1; done
	x_ka=$(rate "$cl" "http://$listen/")
	x_cc=$(rate "$cl" "http://$listen/" -H "Connection: close")
	x_dl=$(nsx "$cl" curl -fsS -o /dev/null -w '%{speed_download}' "http://$listen/big")
	sleep 1.2
	local counters
	counters=$(nsx "$lb" curl -fsS http://127.0.0.1:9090/api/v1/status | python3 -c '
import json, sys
s = json.load(sys.stdin)
c = s["counters"]
i = ", ".join("%s %s/%s" % (x["name"], x["xdp_mode"], x["transmit"]) for x in s["interfaces"])
print("%s; new_flow %d fwd_to_backend %d fwd_to_client %d pass_foreign_egress %d" % (i, c["new_flow"], c["fwd_to_backend"], c["fwd_to_client"], c["pass_foreign_egress"]))')
	kill -TERM "$xpid"
	sleep 0.5
	local t0 t1 refused
	t0=$(date +%s%N)
	refused=$(nsx "$cl" curl -sS -m 2 -o /dev/null "http://$listen/" 2>&1 | grep -c "Couldn't connect\|reset" || true)
	t1=$(date +%s%N)
	wait "$xpid" 2>/dev/null || true
	python3 - "$name" "$d_ka" "$x_ka" "$d_cc" "$x_cc" "$d_dl" "$x_dl" "$(((t1 - t0) / 1000))" "$refused" "$counters" <<'EOF'
import sys
n, dka, xka, dcc, xcc, ddl, xdl, us, refused, counters = sys.argv[1:]
r = lambda a, b: "%.2fx" % (float(b) / float(a)) if float(a) else "-"
print(f"| {n} | {xka} ({r(dka, xka)}) | {xcc} ({r(dcc, xcc)}) | {float(xdl)/1e6:.0f} MB/s ({r(ddl, xdl)}) | {'refused' if refused != '0' else 'NOT refused'} in {int(us)/1000:.1f} ms |")
print(f"|   direct | {dka} | {dcc} | {float(ddl)/1e6:.0f} MB/s | |")
print(f"|   counters | {counters} | | | |", file=sys.stderr)
EOF
}

conf() { # listen backend-ips...
	local f=$work/xlb-$RANDOM.yaml listen=$1
	shift
	{
		echo "name: xlbshapes"
		echo "listen: {ip: $listen}"
		echo "ports: [{local_port: 80, remote_port: 8080}]"
		echo "provider: {static: {backends: ["
		local k=0
		for ip in "$@"; do k=$((k + 1)); echo "  {name: be$k, ip: $ip},"; done
		echo "]}}"
		echo "shutdown_timeout: 3"
	} >"$f"
	echo "$f"
}

echo "| shape | keep-alive req/s (vs direct) | new connection per request, req/s | 100 MB download | drain: lone new connection |"
echo "|---|---|---|---|---|"
scripts/topology.sh down "$P" >/dev/null 2>&1
scripts/topology.sh up "$P" 2
nsx "$P-lb" sysctl -qw net.ipv4.ip_forward=1
for k in 1 2; do nsx "$P-client" ip route add "10.10$k.0.0/24" via 10.100.0.1; backend "$P-be$k"; done
nsx "$P-client" sysctl -qw net.ipv4.tcp_tw_reuse=1
measure two-armed "$P-client" "$P-lb" 10.100.0.1 http://10.101.0.2:8080/ "$(conf 10.100.0.1 10.101.0.2 10.102.0.2)"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
pids=()
scripts/topology.sh down "$P" >/dev/null
for gro in gro-on gro-off; do
	scripts/topology.sh up-one-armed "$P" 2 "$gro"
	for k in 1 2; do backend "$P-be$k"; done
	nsx "$P-client" sysctl -qw net.ipv4.tcp_tw_reuse=1
	measure "one-armed, $gro" "$P-client" "$P-lb" 10.200.0.1 http://10.200.0.11:8080/ "$(conf 10.200.0.1 10.200.0.11 10.200.0.12)"
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	pids=()
	scripts/topology.sh down "$P" >/dev/null
done
