#!/usr/bin/env python3
"""Reads `perf script` (with call graphs) on stdin and prints one JSON line:
the leaf symbols of the samples whose call chain passes through ANCESTOR
(e.g. bpf_test_run: time inside the XDP program and what it calls), by share.
Usage: perf script | perf-top.py CASE ANCESTOR"""
import collections
import json
import re
import sys

case, ancestor = sys.argv[1], sys.argv[2]
counts = collections.Counter()
total = 0
block = []


def flush(lines):
    global total
    frames = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) >= 2:
            frames.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1]))
    if not any(f == ancestor for f in frames):
        return
    total += 1
    leaf = frames[0]
    # JIT-ed BPF programs are named bpf_prog_<tag>_<name>: keep the name.
    leaf = re.sub(r"^bpf_prog_[0-9a-f]+_", "bpf_prog:", leaf)
    counts[leaf] += 1


for raw in sys.stdin:
    if raw.strip():
        block.append(raw)
    else:
        if block:
            flush(block)
        block = []
if block:
    flush(block)
top = [{"symbol": s, "pct": round(100 * n / total, 1)} for s, n in counts.most_common(15)] if total else []
print(json.dumps({"case": case, "samples": total, "top": top}))
