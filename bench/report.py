#!/usr/bin/env python3
"""Turns one bench run (bench/run.sh's work directory) into the results
files: a JSON document with every measurement and a markdown report with
the tables, the ratios against the peers and the targets of issue 13 (with
those of issue 7 it does not replace).

Usage: report.py --work DIR --json OUT.json --md OUT.md [--load-end L] [--seconds S]
       report.py --from-json RESULTS.json --json unused --md OUT.md   (re-render)
"""
import argparse
import json
import os
import statistics

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
MODES = [
    ("keepalive", "keep-alive"),
    ("close", "connection per request"),
    ("many", "connection per request, 200 client addresses"),
]
PEER_NAMES = {
    "direct": "direct (routed by the node, no balancing)",
    "xlb": "XLB (XDP; generic mode on veth)",
    "nftables": "nftables DNAT+SNAT",
    "haproxy": "HAProxy (TCP mode)",
    "nginx": "nginx (stream proxy)",
}


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def load_json(path):
    return json.load(open(path)) if os.path.exists(path) else None


def mixture_quantile(wrks, q):
    """Latency quantile (us) of the merged distribution of several wrk runs,
    each given by its percentile table, weighted by its request count."""
    tables = []
    for w in wrks:
        pts = sorted((float(p), v) for p, v in w["latency_pct_us"].items())
        if w["requests"] > 0:
            tables.append((w["requests"], pts))
    if not tables:
        return None
    total = sum(n for n, _ in tables)

    def cdf(pts, x):
        # fraction of requests at or below x, from the percentile points
        if x < pts[0][1]:
            return 0.0
        best = 0.0
        for p, v in pts:
            if v <= x:
                best = p / 100
        return best

    xs = sorted({v for _, pts in tables for _, v in pts})
    for x in xs:
        if sum(n * cdf(pts, x) for n, pts in tables) / total >= q - 1e-9:
            return x
    return xs[-1]


def run_summary(r, nproc):
    wrk = r["wrk"]
    reqs = sum(w["requests"] for w in wrk)
    rps = sum(w["requests"] / (w["duration_us"] / 1e6) for w in wrk if w["duration_us"] > 0)
    errors = sum(sum(w["errors"].values()) for w in wrk)
    c0 = [int(x) for x in r["cpu_before"]]
    c1 = [int(x) for x in r["cpu_after"]]
    d = [b - a for a, b in zip(c0, c1)]
    # user nice system idle iowait irq softirq steal guest guest_nice
    total = sum(d[:8]) or 1
    wall = total / nproc  # ticks of wall time
    busy = total - d[3] - d[4]
    secs = r["duration_s"]
    out = {
        "requests": reqs,
        "rps": rps,
        "errors": errors,
        "p50_ms": (mixture_quantile(wrk, 0.50) or 0) / 1e3,
        "p99_ms": (mixture_quantile(wrk, 0.99) or 0) / 1e3,
        "cpu_cores_busy": busy / wall,
        "cpu_cores_user": (d[0] + d[1]) / wall,
        "cpu_cores_system": d[2] / wall,
        "cpu_cores_softirq": (d[5] + d[6]) / wall,
        "cpu_cores_steal": d[7] / wall,
        "cpu_us_per_request": busy * TICK_S * 1e6 / reqs if reqs else None,
        "lb_process_cores": r["lb_ticks"] * TICK_S / secs,
        "lb_process_us_per_request": r["lb_ticks"] * TICK_S * 1e6 / reqs if reqs else None,
        "load_before": r.get("load_before"),
        "client_retransmits": r.get("client_tcp", {}).get("RetransSegs"),
        "client_syn_retransmits": r.get("client_tcp", {}).get("TCPSynRetrans"),
        "client_resets_sent": r.get("client_tcp", {}).get("OutRsts"),
        "client_connects": r.get("client_tcp", {}).get("ActiveOpens"),
        "backend_time_wait": r.get("backend_time_wait"),
    }
    if r.get("xdp_run_cnt"):
        out["xdp_ns_per_packet"] = r["xdp_run_time_ns"] / r["xdp_run_cnt"]
        out["xdp_packets_per_request"] = r["xdp_run_cnt"] / reqs if reqs else None
        out["xdp_cores"] = r["xdp_run_time_ns"] / 1e9 / secs
        out["xdp_us_per_request"] = r["xdp_run_time_ns"] / 1e3 / reqs if reqs else None
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def fmt(x, nd=0, unit=""):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}{unit}"


def fmt_spread(s, nd=0):
    if not s:
        return ""
    if len({round(v, nd) for v in s}) == 1:
        return ""
    return f" ({s[0]:,.{nd}f}–{s[1]:,.{nd}f})"


def traffic(runs, nproc):
    by = {}
    for r in runs:
        by.setdefault((r["peer"], r["mode"]), []).append((r["round"], run_summary(r, nproc)))
    table = {}
    for (peer, mode), rs in by.items():
        rs.sort()
        keys = rs[0][1].keys()
        table.setdefault(mode, {})[peer] = {
            "rounds": [dict(s, round=n) for n, s in rs],
            "median": {k: med([s[k] for _, s in rs]) for k in keys},
            "spread": {k: spread([s[k] for _, s in rs]) for k in keys},
        }
    return table


def ratios(table):
    out = {}
    for mode, peers in table.items():
        if "xlb" not in peers:
            continue
        x = {r["round"]: r for r in peers["xlb"]["rounds"]}
        for peer, d in peers.items():
            if peer == "xlb":
                continue
            rr = [x[r["round"]]["rps"] / r["rps"] for r in d["rounds"] if r["round"] in x and r["rps"]]
            p99 = [x[r["round"]]["p99_ms"] / r["p99_ms"] for r in d["rounds"] if r["round"] in x and r["p99_ms"]]
            cpu = [
                x[r["round"]]["cpu_us_per_request"] / r["cpu_us_per_request"]
                for r in d["rounds"]
                if r["round"] in x and r["cpu_us_per_request"]
            ]
            out.setdefault(mode, {})[peer] = {
                "rps_ratio": med(rr), "rps_ratio_spread": spread(rr), "rounds": len(rr),
                "p99_ratio": med(p99), "p99_ratio_spread": spread(p99),
                "cpu_per_request_ratio": med(cpu),
            }
    return out


def targets(table, rat, dp):
    """Issue 13's targets (and issue 7's where 13 does not replace them)
    against what was measured (never asserted). A goal of None: reported
    only, neither met nor missed."""
    rows = []

    def add(name, target, value, ok, note=""):
        rows.append({"target": name, "goal": target, "measured": value, "met": ok, "note": note})

    def rps_row(mode, label, peer, goal, note=""):
        r = rat.get(mode, {}).get(peer)
        if not r or r["rps_ratio"] is None:
            return
        s = r["rps_ratio_spread"]
        add(f"req/s XLB/{peer}, {label}", f">= {goal:.2f}x" if goal else "reported",
            f"{r['rps_ratio']:.2f}x" + (f" ({s[0]:.2f}–{s[1]:.2f})" if s and r["rounds"] > 1 else ""),
            r["rps_ratio"] >= goal if goal else None, note)

    def p99_row(mode, label, note=""):
        r = rat.get(mode, {}).get("nftables")
        if r and r["p99_ratio"] is not None:
            x = table[mode]["xlb"]["median"]["p99_ms"]
            n = table[mode]["nftables"]["median"]["p99_ms"]
            add(f"p99 latency XLB vs nftables, {label}", "<= nftables",
                f"{x:.2f} ms vs {n:.2f} ms", r["p99_ratio"] <= 1.0, note)

    label = dict(MODES)
    rps_row("keepalive", label["keepalive"], "direct", 1.0)
    rps_row("keepalive", label["keepalive"], "nftables", 1.3)
    rps_row("keepalive", label["keepalive"], "haproxy", 1.4, "issue 7")
    p99_row("keepalive", label["keepalive"])
    rps_row("close", label["close"], "nftables", 1.0)
    rps_row("close", label["close"], "direct", 0.9)
    rps_row("close", label["close"], "haproxy", 1.4, "issue 7")
    p99_row("close", label["close"], "issue 7")
    rps_row("many", label["many"], "nftables", None, "at the highest rate the machine sustains")
    # Lost handshakes through XLB: the client namespace's TCPSynRetrans,
    # summed over the rounds of each connection-per-request mode.
    syn = {}
    for mode in ("close", "many"):
        rs = table.get(mode, {}).get("xlb", {}).get("rounds", [])
        if rs and all(r.get("client_syn_retransmits") is not None for r in rs):
            syn[mode] = (sum(r["client_syn_retransmits"] for r in rs),
                         sum(r.get("client_retransmits") or 0 for r in rs),
                         sum(r.get("client_connects") or 0 for r in rs))
    if syn:
        names = {"close": "one client", "many": "200 clients"}
        add("client SYN retransmits, XLB, connection per request (both modes)", "0",
            "; ".join(f"{names[m]}: {n:,} ({rx:,} segments retransmitted, {c:,} connections)"
                      for m, (n, rx, c) in syn.items()),
            all(n == 0 for n, _, _ in syn.values()), "summed over rounds")
    if dp:
        # XDP cost as a multiple of the passed-packet floor (the same
        # program parsing a packet that is not ours) at the same fill level
        # of the same run: the test-run loop's and the machine's speed cancel.
        lv = {l["label"]: l for l in dp["levels"]}
        for case, goal in [("established", 2.0), ("reply", 2.0), ("syn", 5.0)]:
            vals = []
            for k in ("1%", "50%", "90%"):
                loop = lv.get(k, {}).get("loop", {})
                v = loop.get(case, {}).get("median")
                floor = loop.get("pass", {}).get("median")
                if v is not None and floor:
                    vals.append((k, v, floor))
            if vals:
                worst = max(v / f for _, v, f in vals)
                add(f"XDP {case} packet / passed packet (test_run loop, hot cache)", f"<= {goal:.1f}x",
                    ", ".join(f"{v / f:.1f}x at {k} ({v:.0f} / {f:.0f} ns)" for k, v, f in vals),
                    worst <= goal)
        s = dp["scale"]
        mib = s["all_maps_memlock_full_bytes"]["total"] / 2**20
        add(f"{s['connections']:,} connections in maps", "<= 200 MiB" if s["connections"] >= 10**6 else
            "(quick run: scaled)", f"{mib:.0f} MiB ({s['conntrack_memlock_full_bytes'] / s['connections']:.0f} B/connection, "
            "reserved at load)", mib <= 200 * s["connections"] / 10**6)
    return rows


def md_report(doc):
    m = doc["machine"]
    L = []
    w = L.append
    w(f"# XLB benchmark, {m['date']}")
    w("")
    quick = " **Quick smoke run (BENCH_QUICK=1): too short for conclusions.**" if m.get("quick") else ""
    w(f"{m['nproc']} cores ({m['cpu_model']}, {m.get('virtualization', '?')}), {m['mem_total_mb']:,} MB, "
      f"kernel {m['kernel']}, {m['os']}; XLB {m['xlb_version']} at {m['git']}. "
      f"{m['rounds']} round(s) x {m['duration_s']} s per peer and mode, {m['connections']} connections "
      f"(two wrk processes, one thread each; in the 200-address mode one `xlb-bench connect`, one thread per "
      f"connection). CPU {100 * m.get('busy_before_start', 0):.0f}% busy in the 3 s "
      f"before the start; load average {m['load_at_start']:.2f} at the start, {doc.get('load_at_end', 0):.2f} "
      f"at the end; the whole bench took {doc.get('seconds', 0)} s.{quick}")
    if m.get("busy_before_start", 1) > 0.25:
        w("")
        w(f"> **The machine was not quiet** ({100 * m.get('busy_before_start', 0):.0f}% CPU busy before the start, "
          f"load {m['load_at_start']:.2f} on {m['nproc']} cores): other work shared the CPUs, so absolute "
          "numbers and ratios are noisy. Re-run `make bench` on a quiet machine for numbers to quote.")
    else:
        w("")
        w("> The machine was idle before the start; other work that started during the run would not be noticed "
          "(the bench keeps the cores busy itself). The spread over rounds is the check.")
    w("")
    w("Client, load balancer and backends share the same cores: requests/s is bounded by the whole "
      "machine, and a balancer that costs less CPU leaves more for wrk and nginx. See "
      "[bench/README.md](../README.md) for the method.")
    w("")
    tg = doc["targets"]
    if tg:
        w("## Targets (issue 13; reported, never asserted)")
        w("")
        w("Issue 13's targets replace issue 7's where they overlap; the rows marked *issue 7* are kept from it.")
        w("")
        w("| target | goal | measured | |")
        w("|---|---|---|---|")
        for t in tg:
            state = "reported" if t["met"] is None else "met" if t["met"] else "**missed**"
            note = f" *({t['note']})*" if t.get("note") else ""
            w(f"| {t['target']}{note} | {t['goal']} | {t['measured']} | {state} |")
        w("")
    tr = doc["traffic"]
    for mode, label in MODES:
        if mode not in tr:
            continue
        w(f"## HTTP, {label}")
        w("")
        if mode == "many":
            w(f"A new connection per request from 200 client addresses (10.100.0.30–229, round robin), the "
              f"backend closing first, {m['connections']} closed-loop connections (`xlb-bench connect`: one "
              "blocking thread each, the request's latency from `socket()` to EOF, the handshake included, "
              "so a lost SYN shows in the latency as a second or more).")
            w("")
        lost = ("wrk's latency does not include: it times requests, not connects" if mode != "many" else
                "shows in this mode's latency")
        w("Medians over rounds (min–max in brackets). CPU: the whole machine's busy cores during the run "
          "(user+nice / system / softirq), and per request; LB process: CPU of the processes in the LB namespace; "
          "client SYN retransmits / retransmits / RSTs: the client namespace's TCP counters over the run "
          f"(TcpExt TCPSynRetrans, Tcp RetransSegs and OutRsts; a lost SYN costs a 1 s retransmission, which {lost}).")
        w("")
        w("| peer | req/s | p50 ms | p99 ms | errors | machine CPU cores (usr/sys/softirq) | CPU µs/req | LB process cores | client SYN retransmits / retransmits / RSTs |")
        w("|---|---|---|---|---|---|---|---|---|")
        for peer in ["direct", "xlb", "nftables", "haproxy", "nginx"]:
            if peer not in tr[mode]:
                continue
            d, s = tr[mode][peer]["median"], tr[mode][peer]["spread"]
            w(f"| {PEER_NAMES[peer]} | {fmt(d['rps'])}{fmt_spread(s['rps'])} | {fmt(d['p50_ms'], 2)} | "
              f"{fmt(d['p99_ms'], 2)}{fmt_spread(s['p99_ms'], 2)} | {fmt(d['errors'])} | "
              f"{fmt(d['cpu_cores_busy'], 2)} ({fmt(d['cpu_cores_user'], 2)}/{fmt(d['cpu_cores_system'], 2)}/"
              f"{fmt(d['cpu_cores_softirq'], 2)}) | {fmt(d['cpu_us_per_request'], 1)} | "
              f"{fmt(d['lb_process_cores'], 2)} | {fmt(d.get('client_syn_retransmits'))} / "
              f"{fmt(d['client_retransmits'])} / {fmt(d['client_resets_sent'])} |")
        w("")
        x = tr[mode].get("xlb", {}).get("median", {})
        if x.get("xdp_ns_per_packet"):
            w(f"XLB's XDP program in this traffic (kernel BPF run-time statistics): "
              f"{x['xdp_ns_per_packet']:.0f} ns per packet, {x['xdp_packets_per_request']:.1f} packets per "
              f"request, {x['xdp_us_per_request']:.2f} µs per request, {x['xdp_cores']:.3f} cores.")
            w("")
        r = doc["ratios"].get(mode, {})
        if r:
            w("| XLB / peer | req/s ratio | p99 ratio | CPU/request ratio |")
            w("|---|---|---|---|")
            for peer in ["direct", "nftables", "haproxy", "nginx"]:
                if peer in r:
                    q = r[peer]
                    w(f"| XLB / {peer} | {fmt(q['rps_ratio'], 2)}x{fmt_spread(q['rps_ratio_spread'], 2)} | "
                      f"{fmt(q['p99_ratio'], 2)}x{fmt_spread(q['p99_ratio_spread'], 2)} | "
                      f"{fmt(q['cpu_per_request_ratio'], 2)}x |")
            w("")
    proof = doc.get("xlb_proof") or []
    if proof:
        w("XDP proof (status API counters over each XLB segment, interfaces attached (generic mode on veth)): " + "; ".join(
            f"round {p['round']}: {p['requests_measured']:,} requests measured, fwd_to_backend "
            f"+{p['counters_delta'].get('fwd_to_backend', 0):,}, fwd_to_client "
            f"+{p['counters_delta'].get('fwd_to_client', 0):,}"
            + "".join(f", {k} +{v:,}" for k, v in p["counters_delta"].items()
                      if k not in ("fwd_to_backend", "fwd_to_client", "new_flow"))
            for p in proof) + ".")
        w("")
    dp = doc.get("dataplane")
    if dp:
        w("## XDP program cost (BPF_PROG_TEST_RUN, kernel-timed)")
        w("")
        w(f"Conntrack capacity {dp['capacity']:,} connections, {dp['backends']} backends, NAT ports "
          f"{dp['nat_port_range'][0]}–{dp['nat_port_range'][1]} per backend. **loop**: repeat "
          f"{dp['loop_repeat']} on a packet that maps onto itself (hot cache; includes the test-run loop's own "
          "few ns). **single**: one run per call on genuine packets of random connections (cold cache), "
          "minus the measured per-call overhead. Medians, ns per packet.")
        w("")
        w("| fill | connections | SYN loop | SYN single | established loop | established single | "
          "reply loop | reply single | no flow (drop) loop | passed loop | overhead subtracted |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for l in dp["levels"] + [dp["scale"]["level"]]:
            lp, sc = l["loop"], l["single_corrected_median"]
            g = lambda d, k: d.get(k, {}).get("median") if isinstance(d.get(k), dict) else d.get(k)
            w(f"| {l['label']} | {l['connections']:,} | {fmt(g(lp, 'syn'))} | {fmt(sc.get('syn'))} | "
              f"{fmt(g(lp, 'established'))} | {fmt(sc.get('established'))} | {fmt(g(lp, 'reply'))} | "
              f"{fmt(sc.get('reply'))} | {fmt(g(lp, 'no_flow'))} | {fmt(g(lp, 'pass'))} | "
              f"{fmt(l['test_run_overhead_ns'])} |")
        w("")
        prof = doc.get("profile") or []
        for p in prof:
            if p["top"]:
                w(f"Profile, {p['case']} ({p['samples']} samples inside the program and its helpers, perf "
                  "cpu-clock): " + ", ".join(f"{t['symbol']} {t['pct']}%" for t in p["top"][:10]) + ".")
                w("")
        s = dp["scale"]
        lv = s["level"]
        w(f"## Scale: {s['connections']:,} connections")
        w("")
        gc = s["gc_check_live_connections"]
        opened = ", ".join("{:,} at {:,.0f}/s".format(f["opened"], f["syns_per_sec"]) for f in dp["fills"])
        w(f"- Opened by SYNs through the program: {opened} (one test-run syscall each).")
        w(f"- Memory (the kernel's memlock accounting of the maps): conntrack {s['conntrack_memlock_full_bytes'] / 2**20:.1f} MiB "
          f"full, {s['conntrack_memlock_empty_bytes'] / 2**20:.1f} MiB empty (reserved at load: the map is preallocated), "
          f"{s['conntrack_memlock_full_bytes'] / s['connections']:.0f} bytes per connection (two entries, the buckets included); all maps "
          f"{s['all_maps_memlock_full_bytes']['total'] / 2**20:.1f} MiB. Machine slab+percpu grew by "
          f"{s['kernel_slab_percpu_delta_kb'] / 1024:.0f} MiB (noisy cross-check).")
        w(f"- Lookups at that size: established {fmt(lv['loop'].get('established', {}).get('median'))} ns (loop), "
          f"{fmt(lv['single_corrected_median'].get('established'))} ns (single, cold); reply "
          f"{fmt(lv['loop'].get('reply', {}).get('median'))} / {fmt(lv['single_corrected_median'].get('reply'))} ns; "
          f"a non-SYN without a flow {fmt(lv['loop'].get('no_flow', {}).get('median'))} ns.")
        w(f"- Reading the whole table: {lv['dump_ms']:.0f} ms ({lv['entries']:,} entries, batched until ENOENT). "
          f"The library's `flows()` returned {lv['library_flows_entries']:,} of them in {lv['library_flows_ms']:.0f} ms; "
          f"its per-second sweep took {lv['sweep_ms']:.0f} ms and counted {lv['sweep_saw_connections']:,} "
          f"of {lv['connections']:,} connections.")
        w(f"- GC correctness: a sweep with the production policy 11 s after the last packet (nothing may expire) "
          f"removed **{gc['wrongly_removed_entries']:,} of {gc['entries_before']:,} entries of open connections**."
          if gc["wrongly_removed_entries"] else
          "- GC correctness: a sweep with the production policy 11 s after the last packet removed nothing (as it must).")
        w(f"- Full expiry (every connection idle past its TTL): {s['gc_full_expiry_seconds']:.2f} s in "
          f"{s['gc_full_expiry_sweeps']} sweeps, {s['gc_full_expiry_entries_left']} entries left.")
        w("")
        w("Per fill level (ms): " + "; ".join(
            f"{l['label']}: full read {l['dump_ms']:.0f}, library flows() {l['library_flows_ms']:.0f} "
            f"({l['library_flows_entries']:,}/{l['entries']:,} entries), sweep {l['sweep_ms']:.0f}"
            for l in dp["levels"]) + ".")
        w("")
        w("## Control plane")
        w("")
        w("Backend-set change to the data plane, in-process (BackendSet diff + Maglev build, then the map "
          "write of the idle half and the flip):")
        w("")
        w("| backends | Maglev slots | first set: build + write ms | one backend removed/added: build + write ms | counters read µs |")
        w("|---|---|---|---|---|")
        for c in dp["control_plane"]:
            w(f"| {c['backends']:,} | {c['maglev_size']:,} | {c['first']['build_ms']:.1f} + {c['first']['write_ms']:.1f} | "
              f"{fmt(c['change_one']['build_ms'], 1)} + {fmt(c['change_one']['write_ms'], 1)} | {c['counters_read_us']:.0f} |")
        w("")
    cp = doc.get("control_plane_e2e") or []
    if cp:
        w("End to end in the running binary (Maglev table sized for the set, >= 100 slots per backend): SIGHUP with a new static list → "
          "the first `backend added/removed` log line (logged once the table is live), and → the status API "
          "showing the set (refreshed once a second):")
        w("")
        w("| change | Maglev slots | SIGHUP → applied ms | SIGHUP → last log line ms | signal → status ms |")
        w("|---|---|---|---|---|")
        last = 2
        for c in cp:
            label = f"2 → {c['backends']:,}" if c["backends"] != 2 else f"{last:,} → 2"
            last = c["backends"] if c["backends"] != 2 else last
            w(f"| {label} backends | {c.get('maglev_size', 0):,} | {fmt(c['sighup_to_applied_ms'], 0)} | "
              f"{fmt(c['sighup_to_last_log_ms'], 0)} | {fmt(c['signal_to_status_ms'], 0)} |")
        w("")
    mt = doc.get("metrics")
    if mt:
        w(f"Metrics collection: the idle xlb process uses {mt['idle_cpu_ms_per_s']:.2f} ms CPU per second "
          f"(1 Hz counters read + conntrack sweep, no connections); scraped {mt['scrape_rate_per_s']:.1f} times a "
          f"second (`/metrics` + `/api/v1/status`) {mt['scraped_cpu_ms_per_s']:.2f} ms/s, i.e. "
          f"{mt['cpu_ms_per_scrape']:.3f} ms CPU per scrape pair; `/metrics` is {mt['metrics_bytes']:,} bytes and "
          f"answers in {fmt(mt['metrics_scrape_ms_median'], 2)} ms (median, curl). The sweep's cost grows with "
          "the connection count: see the per-fill sweep times above.")
        w("")
    fs = findings(doc)
    if fs:
        w("## Where XLB falls short, and why")
        w("")
        for f in fs:
            w(f"- {f}")
        w("")
    return "\n".join(L) + "\n"


def findings(doc):
    """Explanations of the shortfalls, each tied to a measurement of this run."""
    out = []
    tr, dp = doc["traffic"], doc.get("dataplane")
    # Lost handshakes (issue 13: 0 client SYN retransmits through XLB in
    # both connection-per-request modes).
    proof = doc.get("xlb_proof") or []
    nat = {k: sum(p["counters_delta"].get(k, 0) for p in proof)
           for k in ("new_flow", "nat_port_preserved", "nat_port_derived", "nat_port_probed", "nat_port_reclaimed",
                     "nat_port_collision", "ct_reopened")}
    for mode, label in MODES[1:]:
        peers = tr.get(mode, {})
        x = peers.get("xlb", {}).get("rounds", [])

        def lost(rs):
            # TCPSynRetrans when the run recorded it, else all retransmits
            return sum(r.get("client_syn_retransmits") if r.get("client_syn_retransmits") is not None
                       else r.get("client_retransmits") or 0 for r in rs)
        conn, syn = sum(r.get("client_connects") or 0 for r in x), lost(x)
        if not conn or not syn:
            continue
        others = {p: lost(v["rounds"]) for p, v in peers.items() if p != "xlb"}
        what = "SYNs" if all(r.get("client_syn_retransmits") is not None for r in x) else "segments"
        text = (f"**{label[0].upper()}{label[1:]}: lost handshakes.** Through XLB the client retransmitted {syn:,} "
                f"{what} ({sum(r.get('client_retransmits') or 0 for r in x):,} segments in all, "
                f"{sum(r.get('client_resets_sent') or 0 for r in x):,} RSTs sent) for {conn:,} connections (other "
                f"peers: {', '.join(f'{p} {n:,}' for p, n in others.items())}). Each costs its client a second. "
                "The backends close first and hold each 4-tuple in TIME_WAIT for 60 s, and answer a SYN from an "
                "unrelated connection on such a tuple with a stale ACK: a lost SYN means a NAT port went to a new "
                "client tuple while its backend tuple was still in TIME_WAIT (README, \"NAT ports\").")
        if nat["new_flow"] and any(v for k, v in nat.items() if k != "new_flow"):
            text += (f" XLB's port counters over its segments (all modes): {nat['new_flow']:,} new flows, "
                     + ", ".join(f"{k} {v:,}" for k, v in nat.items() if k != "new_flow") + ".")
        rps = peers.get("xlb", {}).get("median", {}).get("rps")
        if mode == "many" and rps:
            text += (f" At {rps / 2:,.0f} new connections per second per backend from clients that do not come "
                     "back on their tuples, XLB's one SNAT address (its listen address; the bench sets no "
                     "`snat_ips`) holds about 320 per second per backend in steady state (22,528 ports / 70 s); "
                     "beyond that the ports fill within seconds (the one-address run just before this one holds "
                     "some too) and SYNs take tombstones over (`nat_port_reclaimed`), which a Linux backend refuses "
                     "when the new client's timestamp is older. `snat_ips` multiplies the ports.")
        out.append(text)
    ka = tr.get("keepalive", {})
    xk = ka.get("xlb", {}).get("median", {})
    nk = ka.get("nftables", {}).get("median", {})
    dk = ka.get("direct", {}).get("median", {})
    if xk and nk and xk.get("rps") and nk.get("rps") and xk["rps"] < 1.3 * nk["rps"]:
        lv50 = {l["label"]: l for l in dp["levels"]}.get("50%", {}) if dp else {}
        loop_ns = lv50.get("loop", {}).get("established", {}).get("median")
        cold_ns = lv50.get("single_corrected_median", {}).get("established")
        text = (f"**Keep-alive: {xk['rps']:,.0f} req/s through XLB against {nk['rps']:,.0f} through nftables and "
                f"{dk.get('rps', 0):,.0f} routed directly; p99 {xk['p99_ms']:.1f} ms against {nk['p99_ms']:.1f} and "
                f"{dk.get('p99_ms', 0):.1f} ms.** ")
        if xk.get("xdp_ns_per_packet"):
            text += (f"In this traffic the program ran {xk['xdp_ns_per_packet']:,.0f} ns per packet (the kernel's BPF "
                     f"run-time statistics), {xk['xdp_packets_per_request']:.1f} packets per request, "
                     f"{xk['xdp_cores']:.2f} cores in all")
            if loop_ns and cold_ns:
                text += (f": close to the cold-cache single runs ({cold_ns:,.0f} ns) rather than the hot loop "
                         f"({loop_ns:,.0f} ns), as every packet meets caches the client, the backends and the stack "
                         "have just used on the same two cores")
            text += ". "
        text += (f"Per request the whole machine spent {fmt(xk.get('cpu_us_per_request'), 0)} µs of CPU with XLB, "
                 f"{fmt(dk.get('cpu_us_per_request'), 0)} µs routed directly and {fmt(nk.get('cpu_us_per_request'), 0)} µs "
                 "with nftables: XLB does not leave wrk and nginx more of the two cores than the kernel's own "
                 "forwarding does, so it cannot serve more; the per-packet costs below are the lever. The higher p99 "
                 "is likely the veth path: a "
                 "redirected frame is queued to the peer's NAPI ring and handled in a second softirq pass, which "
                 "the kernel's forwarding does not take (veth-specific; not measured separately here).")
        out.append(text)
    if dp:
        lv = dp["scale"]["level"]
        gc = dp["scale"]["gc_check_live_connections"]
        if lv["library_flows_entries"] < lv["entries"] or gc["wrongly_removed_entries"]:
            out.append(
                f"**Conntrack reads stop early: the GC deletes open connections.** `Dataplane::flows()` and "
                f"`expire_flows()` read the table with libbpf-rs's `lookup_batch` iterator, which ends at the first "
                f"batch shorter than asked; a hash map's batch read returns whole buckets, so a short batch is "
                f"normal and only ENOENT means the end. With {lv['entries']:,} entries the library saw "
                f"{lv['library_flows_entries']:,}; the sweep then treats entries whose peer it did not read as "
                f"unpaired and, once they are 10 s idle, deletes them: {gc['wrongly_removed_entries']:,} entries of "
                "open connections in one sweep here, so idle connections break and status undercounts. Expiring "
                f"the full table took {dp['scale']['gc_full_expiry_sweeps']} sweeps instead of one (xlb sweeps at "
                "most once a second). Fix in src/dataplane/conntrack.rs: loop the batch read until ENOENT (as "
                "xlb-bench's `dump` does), and never delete a half whose peer lookup was not done by key.")
        lv_all = {l["label"]: l for l in dp["levels"]}

        def per_floor(case):
            # (ns, ns / the passed packet's ns) per fill level, loop medians
            out = []
            for l in lv_all.values():
                v, f = l["loop"].get(case, {}).get("median"), l["loop"].get("pass", {}).get("median")
                if v and f:
                    out.append((v, v / f))
            return out
        est_f = per_floor("established")
        est = [v for v, _ in est_f]
        if est and max(r for _, r in est_f) > 2.0:
            prof = {p["case"]: {t["symbol"]: t["pct"] for t in p["top"]} for p in doc.get("profile") or []}
            e = prof.get("established", {})
            fib = sum(v for k, v in e.items() if "fib" in k or k in ("ip_mtu_from_fib_result", "dev_get_by_index_rcu",
                                                                      "find_exception"))
            hashp = sum(v for k, v in e.items() if "htab" in k or "lookup_nulls" in k or k == "memcmp")
            body = e.get("bpf_prog:xlb_xdp")
            nf, ps = lv_all.get("50%", {}).get("loop", {}).get("no_flow", {}).get("median"), \
                lv_all.get("50%", {}).get("loop", {}).get("pass", {}).get("median")
            out.append(
                f"**Established packets cost {min(est):.0f}–{max(est):.0f} ns, "
                f"{min(r for _, r in est_f):.1f}–{max(r for _, r in est_f):.1f}x a passed packet, not <= 2x.** "
                + (f"Profile: hash map lookups take {hashp:.0f}% (the conntrack entry, the route cache, the "
                   "ingress interface's entry; hashing the 16-byte flow key alone is `htab_map_hash`), the FIB "
                   f"{fib:.0f}% (the route cache answers), the program's own instructions {body}%, the rest is the "
                   "devmap redirect and the test-run loop. " if e else "")
                + (f"A passed packet costs {ps:.0f} ns and a non-SYN without a flow (parse + one hash miss) "
                   f"{nf:.0f} ns, so forwarding a found connection costs the rest. " if nf and ps else "")
                + "The per-packet atomics and the per-packet FIB lookup are gone; what is left is about three hash "
                "lookups per packet. To approach 2x the floor: the next hop kept in the connection's own entry "
                "(no second lookup) and the interface table as an array.")
        syn_f = per_floor("syn")
        syn = [v for v, _ in syn_f]
        if syn and max(r for _, r in syn_f) > 5.0:
            prof = {p["case"]: {t["symbol"]: t["pct"] for t in p["top"]} for p in doc.get("profile") or []}
            c = prof.get("synchain", {})
            ins = sum(v for k, v in c.items() if "htab" in k or "lookup_nulls" in k)
            out.append(
                f"**A new connection costs {min(syn):.0f}–{max(syn):.0f} ns, "
                f"{min(r for _, r in syn_f):.0f}–{max(r for _, r in syn_f):.0f}x a passed packet, not <= 5x.** "
                + (f"{ins:.0f}% of it is in the conntrack hash map's insert path (two `BPF_NOEXIST` inserts per SYN, "
                   "the reverse entry first as the NAT port's claim, each under its bucket lock with interrupts "
                   "off, plus lookups; the map is preallocated, so no allocator is involved). " if c else "")
                + "In the test-run chain every SYN is a new connection into a table at that fill, with cold "
                "buckets. What would cut it: one entry per connection keyed for both directions (one insert).")
        s = dp["scale"]
        if s["connections"] >= 10**6 and s["all_maps_memlock_full_bytes"]["total"] > 200 * 2**20:
            out.append(
                f"**{s['connections']:,} connections take {s['all_maps_memlock_full_bytes']['total'] / 2**20:.0f} MiB, "
                f"not 200.** Each connection is two preallocated hash elements (the kernel's 48-byte element "
                f"header + 16-byte key + 64-byte value), {s['conntrack_memlock_full_bytes'] / s['connections']:.0f} bytes with its share of the "
                "2^21 buckets; all of it is reserved at load. "
                "The kernel's share alone (header + key, two elements) is 128 bytes per connection, 122 MiB plus "
                "32 MiB of buckets: for 200 MiB the two values together must fit in about 48 bytes, against 128 "
                "now (per-direction byte and packet totals, two timestamps, the TCP state, the FIN sequence). The "
                "way there: per-direction totals per CPU and backend instead of per entry, a 32-bit coarse "
                "timestamp, and a reverse entry that holds only its client tuple.")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work")
    ap.add_argument("--from-json", help="re-render the markdown of an earlier results JSON")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--load-end", type=float, default=0)
    ap.add_argument("--seconds", type=int, default=0)
    a = ap.parse_args()
    if a.from_json:
        doc = json.load(open(a.from_json))
        doc["targets"] = targets(doc["traffic"], doc["ratios"], doc.get("dataplane"))
        with open(a.md, "w") as f:
            f.write(md_report(doc))
        return
    W = lambda f: os.path.join(a.work, f)
    machine = load_json(W("machine.json"))
    runs = load_jsonl(W("runs.jsonl"))
    dp = load_json(W("dataplane.json"))
    tr = traffic(runs, machine["nproc"])
    rat = ratios(tr)
    doc = {
        "machine": machine,
        "load_at_end": a.load_end,
        "seconds": a.seconds,
        "targets": targets(tr, rat, dp),
        "traffic": tr,
        "ratios": rat,
        "xlb_proof": load_jsonl(W("xlb-proof.jsonl")),
        "dataplane": dp,
        "profile": load_jsonl(W("profile.jsonl")),
        "control_plane_e2e": load_jsonl(W("cp.jsonl")),
        "metrics": load_json(W("metrics.json")),
    }
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)
    with open(a.md, "w") as f:
        f.write(md_report(doc))


if __name__ == "__main__":
    main()
