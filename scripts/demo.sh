#!/usr/bin/env bash
# `make demo`: XLB for real on this machine. Builds a client, an XLB node and
# two backends in network namespaces (scripts/topology.sh), runs XLB with
# config/demo.yaml, sends requests through it and shows who answered and
# what XDP counted. Everything is torn down on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

P=xlbdemo
XLB=target/release/xlb
REQUESTS=${REQUESTS:-20}
work=$(mktemp -d)
xlb_pid=

cleanup() {
	set +e
	[ -n "$xlb_pid" ] && kill -TERM "$xlb_pid" 2>/dev/null && wait "$xlb_pid" 2>/dev/null
	scripts/topology.sh down "$P"
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "the demo needs root (XDP and network namespaces)" >&2; exit 1; }
[ -x "$XLB" ] || { echo "build first: make build" >&2; exit 1; }
scripts/topology.sh down "$P"
scripts/topology.sh up "$P" 2

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "backends: python3 http.server in $P-be1 (10.101.0.2:8080) and $P-be2 (10.102.0.2:8080)"
for k in 1 2; do
	mkdir -p "$work/be$k"
	echo "hello from backend be$k" >"$work/be$k/index.html"
	ip netns exec "$P-be$k" /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 \
		--directory "$work/be$k" >"$work/be$k.log" 2>&1 &
done

step "xlb run -c config/demo.yaml in $P-lb (listen 10.100.0.1:80)"
# Enter only the network namespace: the host's /sys/fs/bpf stays visible.
nsenter --net=/run/netns/$P-lb "$XLB" run -c config/demo.yaml 2>&1 | sed -u 's/^/  xlb | /' &
xlb_pid=$(pgrep -n -f "$XLB run -c config/demo.yaml" || true)
api() { ip netns exec "$P-lb" curl -fsS -m 2 "http://127.0.0.1:9090$1"; }
for _ in $(seq 100); do
	api /readyz >/dev/null 2>&1 && break
	sleep 0.1
done
api /readyz >/dev/null || { echo "xlb did not become ready" >&2; exit 1; }
for _ in $(seq 50); do
	ip netns exec "$P-be1" sh -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null &&
		ip netns exec "$P-be2" sh -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break
	sleep 0.1
done

step "$REQUESTS requests from $P-client: curl http://10.100.0.1/"
for _ in $(seq "$REQUESTS"); do
	ip netns exec "$P-client" curl -fsS -m 3 http://10.100.0.1/
done | sort | uniq -c

sleep 1.2 # counters reach the status API once a second
step "XDP counters (curl 127.0.0.1:9090/api/v1/status in $P-lb)"
api /api/v1/status | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("  interfaces:", ", ".join("%s (%s)" % (i["name"], i["xdp_mode"]) for i in s["interfaces"]))
print("  backends:  ", ", ".join("%s=%s" % (b["name"], b["address"]) for b in s["backends"]))
for k, v in s["counters"].items():
    if v:
        print(f"  {k:<22} {v}")
'

step "stopping xlb (SIGTERM): the same request now fails"
kill -TERM "$xlb_pid"
wait "$xlb_pid" 2>/dev/null || true
xlb_pid=
if ip netns exec "$P-client" curl -sS -m 2 http://10.100.0.1/ 2>&1; then
	echo "unexpected: answered without XLB" >&2
	exit 1
fi
step "done"
