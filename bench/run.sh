#!/usr/bin/env bash
# `make bench`: XLB against the node's own routing (direct), the kernel's NAT
# (nftables DNAT+SNAT, as kube-proxy does it), HAProxy (TCP mode) and nginx
# (stream proxy) on one machine, in the same run, interleaved over rounds,
# in three modes (keep-alive; connection per request; connection per
# request from 200 client addresses); then the data path's own cost, the
# 1M-connection scale test and the control plane (target/release/xlb-bench).
# The method is in bench/README.md.
#
#   BENCH_QUICK=1        a smoke run of about a minute (asserts no speed;
#                        fails only when the harness breaks)
#   BENCH_ROUNDS=N       rounds of every peer and mode (default 3; quick 1)
#   BENCH_DURATION=S     seconds measured per run (default 8; quick 2)
#   BENCH_CONNECTIONS=N  concurrent client connections (default 32)
#   BENCH_OUT=DIR        results directory (default bench/results; quick:
#                        bench/results/quick)
#   BENCH_PEERS="..."    a subset of: direct xlb nftables haproxy nginx
#   BENCH_PARTS="..."    a subset of: dataplane profile traffic control metrics
#   BENCH_KEEP=1         keep the work directory (raw wrk output, logs)
#
# Everything runs in network namespaces named xlbb<pid>-*, with addresses
# that exist only inside them; all of it is removed on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-0}
XLB=${XLB:-target/release/xlb}
XLB_BENCH=${XLB_BENCH:-target/release/xlb-bench}
PY=/usr/bin/python3
if [ "$QUICK" = 1 ]; then
	ROUNDS=${BENCH_ROUNDS:-1} DUR=${BENCH_DURATION:-2} WARM=0
	PEERS=${BENCH_PEERS:-"direct xlb nftables haproxy"}
	OUT=${BENCH_OUT:-bench/results/quick} CP_SIZES="10 1000" METRICS_SECS=2
else
	ROUNDS=${BENCH_ROUNDS:-3} DUR=${BENCH_DURATION:-8} WARM=1
	PEERS=${BENCH_PEERS:-"direct xlb nftables haproxy nginx"}
	OUT=${BENCH_OUT:-bench/results} CP_SIZES="10 1000 10000" METRICS_SECS=5
fi
CONNS=${BENCH_CONNECTIONS:-32}
PARTS=" ${BENCH_PARTS:-dataplane profile traffic control metrics} "
part() { [[ $PARTS == *" $1 "* ]]; }
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 20 ] || { echo "BENCH_ROUNDS: 1..20" >&2; exit 2; }
[ "$DUR" -ge 1 ] && [ "$DUR" -le 120 ] || { echo "BENCH_DURATION: 1..120" >&2; exit 2; }
HALF=$(((CONNS + 1) / 2))

P=xlbb$$
LB=$P-lb CL=$P-client
NAME=xlbbench-$$
NFT_TABLE=xlbbench$$
ADMIN=127.0.0.1:9090
work=$(mktemp -d /tmp/xlbbench.XXXXXX)
xlb_pid= haproxy_pid= nginx_pid= stats_pid=
bg_pids=()
started=$(date +%s)

log() { printf '[%4ds] %s\n' $(($(date +%s) - started)) "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

stop_pid() { # pid: TERM, then KILL after 5 s
	local pid=$1 i
	[ -n "$pid" ] || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for i in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$?
	set +e
	trap - EXIT INT TERM ERR
	stop_pid "$xlb_pid"
	stop_pid "$haproxy_pid"
	stop_pid "$nginx_pid"
	stop_pid "$stats_pid"
	for p in "${bg_pids[@]}"; do stop_pid "$p"; done
	nsx "$LB" nft delete table ip "$NFT_TABLE" 2>/dev/null
	scripts/topology.sh down "$P" 2>/dev/null
	[ -x "$XLB" ] && "$XLB" detach --instance "$NAME" >/dev/null 2>&1
	if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
	exit $rc
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM
set -E
trap 'log "FAILED at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || die "the bench needs root (XDP, BPF, network namespaces)"
for b in "$XLB" "$XLB_BENCH"; do [ -x "$b" ] || die "$b missing: make bench builds it"; done
for t in wrk nginx haproxy nft bpftool curl ethtool nsenter; do
	command -v "$t" >/dev/null || die "$t missing: scripts/setup-bench.sh installs it"
done
mkdir -p "$OUT"

# ------------------------------------------------------------------ machine
read -r load_start _ </proc/loadavg
# How busy the machine is before we start (the load average also remembers
# the last minutes): CPU use over 3 seconds.
stat0=$(head -1 /proc/stat)
sleep 3
stat1=$(head -1 /proc/stat)
$PY - "$work/machine.json" "$QUICK" "$ROUNDS" "$DUR" "$CONNS" "$PEERS" "$load_start" "$stat0" "$stat1" "$XLB" <<'EOF'
import json, os, platform, subprocess, sys, datetime
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception: return ""
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
out, quick, rounds, dur, conns, peers, load, st0, st1, xlb = sys.argv[1:]
d = [int(b) - int(a) for a, b in zip(st0.split()[1:], st1.split()[1:])]
busy = 1 - (d[3] + d[4]) / max(sum(d[:8]), 1)
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_mb": mem // 1024,
    "kernel": platform.release(), "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
    "virtualization": sh("systemd-detect-virt 2>/dev/null") or "unknown",
    "load_at_start": float(load), "busy_before_start": round(busy, 3),
    "git": sh("git rev-parse --short HEAD") + ("-dirty" if sh("git status --porcelain") else ""),
    "xlb_version": sh(f"{xlb} version"),
    "tools": {"wrk": sh("wrk -v 2>&1 | head -1"), "nginx": sh("nginx -v 2>&1"),
              "haproxy": sh("haproxy -v | head -1"), "nft": sh("nft --version")},
    "quick": quick == "1", "rounds": int(rounds), "duration_s": int(dur),
    "connections": int(conns), "peers": peers.split(),
}, open(out, "w"), indent=1)
EOF
busy=$(jq -r '.busy_before_start * 100 | floor' "$work/machine.json")
log "machine: $(nproc) cores, $(uname -r), ${busy}% busy before the start (load $load_start); results to $OUT"
[ "$busy" -lt 25 ] || log "WARNING: the machine is busy (${busy}% CPU before the start): numbers will be noisy"

# ------------------------------------------------- data path (xlb-bench)
if part dataplane; then
	log "data path: XDP cost, 1M connections, control plane (xlb-bench dataplane)"
	dp_args=(dataplane --out "$work/dataplane.json")
	[ "$QUICK" = 1 ] && dp_args+=(--quick)
	"$XLB_BENCH" "${dp_args[@]}" 2>&1 | sed -u 's/^/    /' >&2 || die "xlb-bench dataplane"
fi

# Where the data path's time goes: perf (cpu-clock; a VM has no hardware
# counters for bpftool prog profile) over the program in a tight test-run
# loop, established packets and new connections.
: >"$work/profile.jsonl"
if part profile && [ "$QUICK" != 1 ] && command -v perf >/dev/null; then
	for case in established synchain; do
		"$XLB_BENCH" spin --case "$case" --secs 4 2>"$work/spin-$case.log" &
		spin_pid=$!
		bg_pids+=("$spin_pid")
		sleep 1.5
		perf record -q -e cpu-clock -F 4000 -g -p "$spin_pid" -o "$work/perf-$case.data" -- sleep 2 \
			>/dev/null 2>&1 || true
		wait "$spin_pid" || die "xlb-bench spin $case: $(cat "$work/spin-$case.log")"
		perf script -i "$work/perf-$case.data" 2>/dev/null | $PY bench/perf-top.py "$case" bpf_test_run \
			>>"$work/profile.jsonl" || true
	done
	log "  profile: $(jq -r '"\(.case): " + ([.top[:4][] | "\(.symbol) \(.pct)%"] | join(", "))' "$work/profile.jsonl" | tr '\n' ';')"
fi

# ----------------------------------------------------------------- topology
log "topology: $CL, $LB, $P-be1, $P-be2"
scripts/topology.sh down "$P"
scripts/topology.sh up "$P" 2
nsx "$LB" sysctl -qw net.ipv4.ip_forward=1
# Each NAT/proxy peer gets its own source addresses towards the backends.
# The backends close first and keep TIME_WAIT for 60 s, so peers sharing
# one source address would run into each other's TIME_WAIT tuples with
# unrelated sequence numbers and lose SYNs; with separate addresses each
# peer meets only its own. The two NATs (XLB, nftables) get a pool of 16
# each: with 200 client addresses (mode many) every new client tuple needs
# a port the backend holds in no TIME_WAIT, and one address has about 320
# of those per second per backend (README "NAT ports"). The proxies open
# their own connections, whose timestamps the backends accept out of
# TIME_WAIT: one address each.
for a in 10.99.0.12 10.99.0.13; do nsx "$LB" ip addr add "$a/32" dev lo; done
for i in $(seq 1 16); do
	nsx "$LB" ip addr add "10.99.1.$i/32" dev lo
	nsx "$LB" ip addr add "10.99.2.$i/32" dev lo
done
# Direct: the client routes to the backends through the node (its own IP
# forwarding, no XDP, no NAT).
for k in 1 2; do nsx "$CL" ip route add "10.10$k.0.0/24" via 10.100.0.1; done
# The load generator closes first about half the time (wrk closes on
# "Connection: close"), so its TIME_WAIT sockets pile up towards the one
# service address; without reuse, connect() soon searches the whole port
# range for every connection and the client, not the balancer, is measured.
nsx "$CL" sysctl -qw net.ipv4.tcp_tw_reuse=1
# The `many` mode's 200 client addresses (xlb-bench connect binds each
# connection to the next): on the client's link, so the node routes the
# replies to them as to 10.100.0.2 (direct: the backends' default route is
# the node; the NAT and proxy peers answer from the listen address).
for i in $(seq 30 229); do echo "addr add 10.100.0.$i/24 dev eth0"; done | nsx "$CL" ip -batch -
MANY_SOURCES=10.100.0.30-229

mkdir -p "$work/www"
chmod 755 "$work" "$work/www" # nginx workers run unprivileged
$PY -c 'import sys; sys.stdout.write(("hello from an xlb bench backend\n" * 8)[:256])' >"$work/www/index.html"
for k in 1 2; do
	d=$work/be$k
	mkdir -p "$d/tmp"
	cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
	access_log off;
	default_type text/html;
	keepalive_requests 10000000;
	keepalive_timeout 120s;
	client_body_temp_path $d/tmp/body;
	proxy_temp_path $d/tmp/proxy;
	fastcgi_temp_path $d/tmp/fastcgi;
	uwsgi_temp_path $d/tmp/uwsgi;
	scgi_temp_path $d/tmp/scgi;
	server { listen 8080 backlog=8192; root $work/www; }
}
EOF
	# ip netns exec execs the command: $! is nginx itself.
	ip netns exec "$P-be$k" nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf" &
	bg_pids+=($!)
done
for k in 1 2; do
	ok=
	for _ in $(seq 50); do
		nsx "$LB" curl -fsS -m 1 -o /dev/null "http://10.10$k.0.2:8080/" 2>/dev/null && { ok=1; break; }
		sleep 0.1
	done
	[ -n "$ok" ] || die "backend nginx in $P-be$k does not answer"
done

# BPF run-time statistics on (reference counted; off when this exits), so
# the attached program's real ns/packet can be read during the XLB runs.
"$XLB_BENCH" hold-stats --secs 1500 >"$work/stats.out" 2>&1 &
stats_pid=$!

# ------------------------------------------------------------------- peers
cat >"$work/xlb.yaml" <<EOF
name: $NAME
listen:
  ip: 10.100.0.1
ports:
  - local_port: 80
    remote_port: 8080
provider:
  static:
    backends:
      - name: be1
        ip: 10.101.0.2
      - name: be2
        ip: 10.102.0.2
shutdown_timeout: 0
snat_ips: [$(seq -s ', ' -f '10.99.1.%g' 1 16)]
admin:
  address: 127.0.0.1
  port: 9090
EOF

api() { nsx "$LB" curl -fsS -m 3 "http://$ADMIN$1"; }

start_xlb() { # config log
	nsenter --net="/run/netns/$LB" "$XLB" run -c "$1" >>"$2" 2>&1 &
	xlb_pid=$!
	local i
	for i in $(seq 100); do
		api /readyz >/dev/null 2>&1 && return 0
		kill -0 "$xlb_pid" 2>/dev/null || break
		sleep 0.1
	done
	tail -5 "$2" >&2
	die "xlb did not become ready"
}

stop_xlb() {
	stop_pid "$xlb_pid"
	xlb_pid=
}

xdp_prog_id() { # of the program XLB attached (its pinned link on lb-client)
	bpftool link show pinned "/sys/fs/bpf/xlb/$NAME/link_lb-client" -j 2>/dev/null | jq -r '.prog_id // empty' || true
}

xlb_counters() { # file
	api /api/v1/status | jq -c '{counters, interfaces: [.interfaces[] | {name, xdp_mode}]}' >"$1"
}

peer_up() {
	# Nothing may still listen on the service port (an earlier peer).
	[ -z "$(nsx "$LB" ss -Htln 'sport = :80')" ] || die "something still listens on :80 in $LB"
	case $1 in
	direct) ;;
	xlb)
		start_xlb "$work/xlb.yaml" "$work/xlb.log"
		prog_id=$(xdp_prog_id)
		[ -n "$prog_id" ] || die "cannot find XLB's XDP program"
		xlb_counters "$work/xlb-before.json"
		;;
	nftables)
		# kube-proxy's nftables mode, reduced to one service: DNAT to a
		# random endpoint (numgen), SNAT towards the backends (kube-proxy
		# masquerades to the node's address; here the peer's own pool).
		nsx "$LB" nft -f - <<EOF
table ip $NFT_TABLE {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.100.0.1 tcp dport 80 counter dnat to numgen random mod 2 map { 0 : 10.101.0.2, 1 : 10.102.0.2 } : 8080
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip daddr { 10.101.0.2, 10.102.0.2 } tcp dport 8080 counter snat to 10.99.2.1-10.99.2.16
	}
}
EOF
		;;
	haproxy)
		cat >"$work/haproxy.cfg" <<EOF
global
	maxconn 9000 # two fds per connection; the hard fd limit may be 20000
defaults
	mode tcp
	timeout connect 5s
	timeout client 60s
	timeout server 60s
frontend fe
	bind 10.100.0.1:80
	default_backend be
backend be
	balance roundrobin
	source 10.99.0.12
	server be1 10.101.0.2:8080
	server be2 10.102.0.2:8080
EOF
		ip netns exec "$LB" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
		haproxy_pid=$!
		;;
	nginx)
		mkdir -p "$work/lbnginx"
		cat >"$work/lbnginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
daemon off;
pid $work/lbnginx/nginx.pid;
error_log $work/lbnginx/error.log warn;
events { worker_connections 8192; }
stream {
	upstream be { server 10.101.0.2:8080; server 10.102.0.2:8080; }
	server { listen 10.100.0.1:80 backlog=8192; proxy_bind 10.99.0.13; proxy_pass be; }
}
EOF
		ip netns exec "$LB" nginx -e "$work/lbnginx/error.log" -p "$work/lbnginx" -c "$work/lbnginx/nginx.conf" &
		nginx_pid=$!
		;;
	esac
	local i url
	url=$(peer_urls "$1" | awk '{ print $1 }')
	for i in $(seq 50); do
		nsx "$CL" curl -fsS -m 1 -o /dev/null "$url" 2>/dev/null && return 0
		sleep 0.1
	done
	die "$1 does not answer $url"
}

peer_down() {
	case $1 in
	xlb)
		sleep 1.2 # the status document refreshes once a second
		xlb_counters "$work/xlb-after.json"
		stop_xlb
		;;
	nftables)
		nsx "$LB" nft list table ip "$NFT_TABLE" >"$work/nft-last.txt"
		nsx "$LB" nft delete table ip "$NFT_TABLE"
		;;
	haproxy) stop_pid "$haproxy_pid"; haproxy_pid= ;;
	nginx) stop_pid "$nginx_pid"; nginx_pid= ;;
	esac
}

peer_urls() {
	case $1 in
	direct) echo http://10.101.0.2:8080/ http://10.102.0.2:8080/ ;;
	*) echo http://10.100.0.1/ http://10.100.0.1/ ;;
	esac
}

# CPU ticks of every process in the LB namespace (user+system).
lb_ticks() {
	local t=0 pid
	for pid in $(ip netns pids "$LB" 2>/dev/null); do
		[ -r "/proc/$pid/stat" ] || continue
		t=$((t + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
	done
	echo $t
}

prog_stats() { # run_time_ns run_cnt of XLB's program
	if [ -n "${prog_id:-}" ]; then
		bpftool prog show id "$prog_id" -j | jq -r '"\(.run_time_ns // 0) \(.run_cnt // 0)"'
	else
		echo "0 0"
	fi
}

# Two wrk processes (one thread, half the connections each): for direct one
# per backend, for the balancers both at the listen address. Mode `many`:
# one xlb-bench connect process instead (wrk cannot bind source addresses),
# $CONNS closed-loop connections from the 200 client addresses, a new
# connection per request over the same targets, the backend closing first;
# it writes the same report line as wrk.
run_wrk() { # peer mode seconds outprefix
	local peer=$1 mode=$2 secs=$3 out=$4 i=0 url hdr=() pids=()
	if [ "$mode" = many ]; then
		local targets=()
		for url in $(peer_urls "$peer"); do
			url=${url#http://} url=${url%%/*}
			[[ $url == *:* ]] || url=$url:80
			targets+=(--target "$url")
		done
		nsx "$CL" "$XLB_BENCH" connect "${targets[@]}" --sources "$MANY_SOURCES" --conns "$CONNS" \
			--secs "$secs" >"$out.0" 2>&1 || die "xlb-bench connect failed: $(cat "$out.0")"
		return 0
	fi
	[ "$mode" = close ] && hdr=(-H "Connection: close")
	for url in $(peer_urls "$peer"); do
		nsx "$CL" wrk -t1 -c"$HALF" -d"${secs}s" --timeout 2s "${hdr[@]}" \
			-s bench/wrk-report.lua "$url" >"$out.$i" 2>&1 &
		pids+=($!)
		i=$((i + 1))
	done
	for i in "${pids[@]}"; do wait "$i" || die "wrk failed: $(cat "$out".*)"; done
}

# The client namespace's TCP counters: Tcp (/proc/net/snmp) and TcpExt
# (/proc/net/netstat, for TCPSynRetrans), names and values lines.
client_tcp() {
	nsx "$CL" grep -h -e '^Tcp:' -e '^TcpExt:' /proc/net/snmp /proc/net/netstat
}

measure() { # peer mode round
	local peer=$1 mode=$2 round=$3 out=$work/r$3-$1-$2
	[ "$WARM" = 0 ] || run_wrk "$peer" "$mode" "$WARM" "$out.warm"
	local cpu0 cpu1 lb0 lb1 x0 x1 load tcp0 tcp1 tw
	read -r load _ </proc/loadavg
	cpu0=$(head -1 /proc/stat)
	lb0=$(lb_ticks)
	x0=$(prog_stats)
	tcp0=$(client_tcp)
	run_wrk "$peer" "$mode" "$DUR" "$out"
	cpu1=$(head -1 /proc/stat)
	lb1=$(lb_ticks)
	x1=$(prog_stats)
	tcp1=$(client_tcp)
	# Connections the backends hold in TIME_WAIT (they close first).
	tw=$(for k in 1 2; do nsx "$P-be$k" ss -Htan state time-wait; done | wc -l)
	tw="$tw $(nsx "$CL" ss -Htan state time-wait | wc -l) $(nsx "$LB" ss -Htan state time-wait | wc -l)"
	$PY - "$peer" "$mode" "$round" "$DUR" "$cpu0" "$cpu1" "$lb0" "$lb1" "$x0" "$x1" "$load" "$tcp0" "$tcp1" "$tw" \
		"$out".[0-9] >>"$work/runs.jsonl" <<'EOF'
import json, sys
peer, mode, rnd, dur, cpu0, cpu1, lb0, lb1, x0, x1, load, tcp0, tcp1, tw, *files = sys.argv[1:]
def tcp(text):
    # "Tcp: names" / "Tcp: values" then "TcpExt: names" / "TcpExt: values"
    out, names = {}, {}
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        if proto in names:
            out.update(zip(names.pop(proto), map(int, rest.split())))
        else:
            names[proto] = rest.split()
    return out
t0, t1 = tcp(tcp0), tcp(tcp1)
client_tcp = {k: t1[k] - t0[k] for k in ("ActiveOpens", "AttemptFails", "EstabResets", "RetransSegs", "OutRsts",
                                        "TCPSynRetrans")}
wrk = []
for f in files:
    line = next((l for l in open(f) if l.startswith("XLBBENCH ")), None)
    if line is None:
        sys.exit(f"no wrk report in {f}: {open(f).read()}")
    wrk.append(json.loads(line[9:]))
print(json.dumps({"peer": peer, "mode": mode, "round": int(rnd), "duration_s": int(dur),
    "cpu_before": cpu0.split()[1:], "cpu_after": cpu1.split()[1:],
    "lb_ticks": int(lb1) - int(lb0),
    "xdp_run_time_ns": int(x1.split()[0]) - int(x0.split()[0]),
    "xdp_run_cnt": int(x1.split()[1]) - int(x0.split()[1]),
    "load_before": float(load), "client_tcp": client_tcp, "backend_time_wait": int(tw.split()[0]),
    "client_time_wait": int(tw.split()[1]), "lb_time_wait": int(tw.split()[2]), "wrk": wrk}))
EOF
	local last
	last=$(tail -1 "$work/runs.jsonl" | jq -r '[([.wrk[].requests] | add), ([.wrk[].errors[]] | add), .client_tcp.TCPSynRetrans, .client_tcp.RetransSegs] | "\(.[0]) requests, \(.[1]) errors, \(.[2]) client SYN retransmits, \(.[3]) retransmits"')
	log "  round $round $peer $mode: $last"
	[ "$(tail -1 "$work/runs.jsonl" | jq '[.wrk[].requests] | add')" -gt 0 ] || die "$peer $mode: no request answered"
}

# ---------------------------------------------------------------- traffic
: >"$work/runs.jsonl"
: >"$work/xlb-proof.jsonl"
if part traffic; then
	log "traffic: peers [$PEERS], $ROUNDS round(s) x {keepalive, close, many} x ${DUR}s, $CONNS connections"
	read -r -a peers <<<"$PEERS"
	for round in $(seq "$ROUNDS"); do
		# Rotate the order each round so no peer always runs first or last.
		n=${#peers[@]}
		for j in $(seq 0 $((n - 1))); do
			peer=${peers[$(((j + round - 1) % n))]}
			prog_id=
			peer_up "$peer"
			measure "$peer" keepalive "$round"
			measure "$peer" close "$round"
			measure "$peer" many "$round"
			peer_down "$peer"
			if [ "$peer" = xlb ]; then
				# Proof that the traffic went through XDP: the program rewrote
				# at least one packet per measured request each way, on all three
				# interfaces (veths: generic mode, README "Node shapes").
				$PY - "$work/xlb-before.json" "$work/xlb-after.json" "$work/runs.jsonl" "$round" \
					>>"$work/xlb-proof.jsonl" <<'EOF' || die "XLB runs did not go through XDP"
import json, sys
b, a = (json.load(open(f)) for f in sys.argv[1:3])
rnd = int(sys.argv[4])
reqs = sum(w["requests"] for l in open(sys.argv[3]) for r in [json.loads(l)]
           if r["peer"] == "xlb" and r["round"] == rnd for w in r["wrk"])
d = {k: a["counters"].get(k, 0) - b["counters"].get(k, 0) for k in a["counters"]}
proof = {"round": rnd, "requests_measured": reqs, "counters_delta": {k: v for k, v in d.items() if v},
         "interfaces": a["interfaces"]}
print(json.dumps(proof))
bad = len(a["interfaces"]) != 3 or any(i["xdp_mode"] != "generic" for i in a["interfaces"])
fwd = d.get("fwd_to_backend", 0)
back = d.get("fwd_to_client", 0) + d.get("pass_aggregate", 0)
if fwd < reqs or back < reqs or bad:
    sys.exit(f"XDP proof failed: {proof}")
EOF
			fi
		done
	done
fi

# ----------------------------------------------- control plane, end to end
# A backend-set change (SIGHUP reload of the static list) to the data plane
# applying it: from XLB's own log, the SIGHUP line to the first "backend
# added/removed" line (written right after the new table is live).
write_cp_config() { # backends maglev-slots
	$PY - "$1" "$NAME" "$2" >"$work/xlb-cp.yaml" <<'EOF'
import sys
n, name, slots = int(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"name: {name}\nlisten:\n  ip: 10.100.0.1\nports:\n  - local_port: 80\n    remote_port: 8080")
print(f"maglev_table_size: {slots}\nshutdown_timeout: 0\nadmin:\n  address: 127.0.0.1\n  port: 9090")
print("provider:\n  static:\n    backends:")
print("      - name: be1\n        ip: 10.101.0.2\n      - name: be2\n        ip: 10.102.0.2")
for k in range(n - 2):
    print(f"      - name: s{k}\n        ip: 10.200.{k // 250}.{k % 250 + 1}")
EOF
}
: >"$work/cp.jsonl"
if part control; then
	log "control plane: backend-set change to applied, via SIGHUP ($CP_SIZES backends)"
	# Each size runs on an XLB started with the Maglev table the config check
	# asks for (>= 100 slots per backend, at least the default 65537), as an
	# operator would size it.
	: >"$work/xlb-cp.log"
	for n in $CP_SIZES; do
		slots=$($PY -c 'import sys; n = max(65537, 100 * int(sys.argv[1])); print(next(k for k in range(n, 2 * n) if all(k % d for d in range(2, int(k ** 0.5) + 1))))' "$n")
	write_cp_config 2 "$slots"
		start_xlb "$work/xlb-cp.yaml" "$work/xlb-cp.log"
		for target in "$n" 2; do
			write_cp_config "$target" "$slots"
			mark=$(wc -l <"$work/xlb-cp.log")
			t0=$(date +%s.%N)
			kill -HUP "$xlb_pid"
			ok=
			for _ in $(seq 600); do
				got=$(api /api/v1/status 2>/dev/null | jq '[.backends[] | select(.state == "active")] | length' 2>/dev/null || echo 0)
				[ "$got" = "$target" ] && { ok=1; break; }
				sleep 0.1
			done
			t1=$(date +%s.%N)
			[ -n "$ok" ] || die "the status never showed $target backends"
			tail -n +"$((mark + 1))" "$work/xlb-cp.log" >"$work/cp-step.log"
			$PY - "$target" "$t0" "$t1" "$work/cp-step.log" "$slots" >>"$work/cp.jsonl" <<'EOF'
import sys, re, json, datetime
target, t0, t1, slots = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[5])
ansi = re.compile(r"\x1b\[[0-9;]*m")
def ts(l):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", ansi.sub("", l))
    return datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp() if m else None
lines = [ansi.sub("", l) for l in open(sys.argv[4])]
sig = next((ts(l) for l in lines if "SIGHUP" in l), None)
changes = [ts(l) for l in lines if "backend added" in l or "backend removed" in l]
changes = [c for c in changes if c is not None]
print(json.dumps({"backends": target, "maglev_size": slots, "changed": len(changes),
    "sighup_to_applied_ms": (changes[0] - sig) * 1e3 if sig and changes else None,
    "sighup_to_last_log_ms": (changes[-1] - sig) * 1e3 if sig and changes else None,
    "signal_to_status_ms": (t1 - t0) * 1e3}))
EOF
			log "  -> $target backends: $(tail -1 "$work/cp.jsonl")"
		done
		stop_xlb
	done
fi

# ------------------------------------------------------- metrics cost
# CPU of the xlb process (all threads, from schedstat) idle, and while
# /metrics and /api/v1/status are scraped 10 times a second.
if part metrics; then
	log "metrics collection cost (${METRICS_SECS}s idle, ${METRICS_SECS}s scraped at 10/s)"
	start_xlb "$work/xlb.yaml" "$work/xlb.log"
	xlb_cpu_ns() { cat /proc/"$xlb_pid"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d\n", s }'; }
	sleep 1
	c0=$(xlb_cpu_ns) t0=$(date +%s.%N)
	sleep "$METRICS_SECS"
	c1=$(xlb_cpu_ns) t1=$(date +%s.%N)
	scrapes=0
	: >"$work/scrape-times.txt"
	end=$(($(date +%s) + METRICS_SECS))
	while [ "$(date +%s)" -lt "$end" ] && [ $scrapes -lt 1000 ]; do
		nsx "$LB" curl -fsS -m 2 -o /dev/null -w '%{time_total}\n' "http://$ADMIN/metrics" >>"$work/scrape-times.txt"
		nsx "$LB" curl -fsS -m 2 -o /dev/null "http://$ADMIN/api/v1/status"
		scrapes=$((scrapes + 1))
		sleep 0.1
	done
	c2=$(xlb_cpu_ns) t2=$(date +%s.%N)
	metrics_bytes=$(api /metrics | wc -c)
	stop_xlb
	$PY - "$c0" "$c1" "$c2" "$t0" "$t1" "$t2" "$scrapes" "$metrics_bytes" "$work/scrape-times.txt" \
		>"$work/metrics.json" <<'EOF'
import json, sys, statistics
c0, c1, c2, t0, t1, t2 = map(float, sys.argv[1:7])
scrapes, size = int(sys.argv[7]), int(sys.argv[8])
times = [float(x) * 1e3 for x in open(sys.argv[9]) if x.strip()]
idle = (c1 - c0) / 1e6 / (t1 - t0)
busy = (c2 - c1) / 1e6 / (t2 - t1)
print(json.dumps({"idle_cpu_ms_per_s": idle, "scraped_cpu_ms_per_s": busy,
    "scrapes": scrapes, "scrape_rate_per_s": scrapes / (t2 - t1),
    "cpu_ms_per_scrape": (busy - idle) * (t2 - t1) / max(scrapes, 1),
    "metrics_scrape_ms_median": statistics.median(times) if times else None,
    "metrics_bytes": size}))
EOF
	log "  $(cat "$work/metrics.json")"
fi

# ------------------------------------------------------------------ report
read -r load_end _ </proc/loadavg
stamp=$(date -u +%Y%m%d-%H%M%S)
$PY bench/report.py --work "$work" --load-end "$load_end" --seconds $(($(date +%s) - started)) \
	--json "$OUT/bench-$stamp.json" --md "$OUT/bench-$stamp.md"
cp "$OUT/bench-$stamp.json" "$OUT/latest.json"
cp "$OUT/bench-$stamp.md" "$OUT/latest.md"
log "done in $(($(date +%s) - started)) s: $OUT/bench-$stamp.md (also $OUT/latest.md)"
