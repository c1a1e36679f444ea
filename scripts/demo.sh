#!/usr/bin/env bash
# `make demo`: XLB for real on this machine, in network namespaces
# (scripts/topology.sh). Sends requests through it, shows who answered, what
# XDP counted and how XLB attached, then stops it. Two shapes:
#
#   two-armed (default): client and backends each on their own link to the
#     XLB node, config/demo.yaml
#   one-armed: client, XLB and backends on one bridge, XLB with a single NIC
#     (as on a kind/Docker node), config/demo-one-armed.yaml; also shows that
#     during the drain a new connection is refused at once.
#
# Usage: scripts/demo.sh [two-armed|one-armed]   (or SHAPE=... in the env)
# Everything is torn down on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPE=${1:-${SHAPE:-two-armed}}
case $SHAPE in
two-armed)
	P=xlbdemo
	CONFIG=config/demo.yaml
	LISTEN=10.100.0.1
	BE_IPS=(10.101.0.2 10.102.0.2)
	UP=(up "$P" 2)
	;;
one-armed)
	P=xlbdemo1
	CONFIG=config/demo-one-armed.yaml
	LISTEN=10.200.0.1
	BE_IPS=(10.200.0.11 10.200.0.12)
	# gro-off (default): the bridge port facing XLB takes no XDP frames, so
	# XLB picks generic mode; LB_PORT_GRO=gro-on shows native mode instead.
	UP=(up-one-armed "$P" 2 "${LB_PORT_GRO:-gro-off}")
	;;
*)
	echo "usage: scripts/demo.sh [two-armed|one-armed]" >&2
	exit 2
	;;
esac
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
scripts/topology.sh "${UP[@]}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

printf '\n\033[1m#### %s demo (namespaces %s-*)\033[0m\n' "$SHAPE" "$P"
step "backends: python3 http.server in $P-be1 (${BE_IPS[0]}:8080) and $P-be2 (${BE_IPS[1]}:8080)"
for k in 1 2; do
	mkdir -p "$work/be$k"
	echo "hello from backend be$k" >"$work/be$k/index.html"
	ip netns exec "$P-be$k" /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 \
		--directory "$work/be$k" >"$work/be$k.log" 2>&1 &
done

step "xlb run -c $CONFIG in $P-lb (listen $LISTEN:80)"
# Enter only the network namespace: the host's /sys/fs/bpf stays visible.
nsenter --net="/run/netns/$P-lb" "$XLB" run -c "$CONFIG" 2>&1 | sed -u 's/^/  xlb | /' &
api() { ip netns exec "$P-lb" curl -fsS -m 2 "http://127.0.0.1:9090$1"; }
for _ in $(seq 100); do
	# nsenter execs xlb: the pid is the same before and after.
	[ -n "$xlb_pid" ] || xlb_pid=$(pgrep -n -f "$XLB run -c $CONFIG" || true)
	[ -n "$xlb_pid" ] && api /readyz >/dev/null 2>&1 && break
	sleep 0.1
done
[ -n "$xlb_pid" ] && api /readyz >/dev/null || { echo "xlb did not become ready" >&2; exit 1; }
for _ in $(seq 50); do
	ip netns exec "$P-be1" sh -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null &&
		ip netns exec "$P-be2" sh -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break
	sleep 0.1
done

step "$REQUESTS requests from $P-client: curl http://$LISTEN/"
for _ in $(seq "$REQUESTS"); do
	ip netns exec "$P-client" curl -fsS -m 3 "http://$LISTEN/"
done | sort | uniq -c

sleep 1.2 # counters reach the status API once a second
step "XDP counters (curl 127.0.0.1:9090/api/v1/status in $P-lb)"
api /api/v1/status | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("  interfaces:", ", ".join("%s (%s, %s)" % (i["name"], i["xdp_mode"], i.get("transmit", "-"))
                               for i in s["interfaces"]))
print("  backends:  ", ", ".join("%s=%s" % (b["name"], b["address"]) for b in s["backends"]))
for k, v in s["counters"].items():
    if v:
        print(f"  {k:<22} {v}")
'

if [ "$SHAPE" = one-armed ]; then
	step "stopping xlb (SIGTERM): for shutdown_timeout (2 s) it drains; a new connection is refused at once"
	kill -TERM "$xlb_pid"
	sleep 0.5
	echo "  readyz during the drain: $(ip netns exec "$P-lb" curl -s -o /dev/null -m 1 -w '%{http_code}' \
		http://127.0.0.1:9090/readyz || true)"
	echo "  curl http://$LISTEN/ from $P-client, nothing else on the wire:"
	t0=$(date +%s%N)
	rc=0
	out=$(ip netns exec "$P-client" curl -sS -v -m 2 "http://$LISTEN/" 2>&1) || rc=$?
	t1=$(date +%s%N)
	# curl's verbose lines say why: "connect to ... failed: Connection refused".
	printf '%s\n' "$out" | grep -E '(refused|reset|^curl: \()' | sed 's/^/    /' || true
	echo "    curl exit $rc after $(((t1 - t0) / 1000000)) ms"
	if [ "$rc" = 0 ]; then
		echo "unexpected: a new connection was answered during the drain" >&2
		exit 1
	fi
	case $out in
	*"Connection refused"* | *"reset by peer"*) ;;
	*) echo "unexpected: not refused with a RST" >&2; exit 1 ;;
	esac
	wait "$xlb_pid" 2>/dev/null || true
	xlb_pid=
	step "xlb exited: the same request still fails"
else
	step "stopping xlb (SIGTERM): the same request now fails"
	kill -TERM "$xlb_pid"
	wait "$xlb_pid" 2>/dev/null || true
	xlb_pid=
fi
if ip netns exec "$P-client" curl -sS -m 2 "http://$LISTEN/" 2>&1; then
	echo "unexpected: answered without XLB" >&2
	exit 1
fi
step "done"
