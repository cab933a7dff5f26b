#!/usr/bin/env python3
"""Helper of bench/op-costs.sh.

`op-costs.py parse NODES < monitor-output` reads redis-cli MONITOR output
holding `ECHO mark:<op>:<count>` ... `ECHO mark:end:0` windows (the first
one, `idle`, is the quiet window), subtracts each command's idle rate from
each window and prints one tab-separated line per operation: nodes, op,
commands per op (everything Redis ran, script and function bodies
included), round trips per op (commands clients sent), and the commands
per op, most first.

`op-costs.py table FILE` prints the lines of FILE as a markdown table:
one row per operation, commands (round trips) per node count.
"""
import collections
import re
import sys

LINE = re.compile(r'^(\d+\.\d+) \[\d+ ([^\]]+)\] "([^"]*)"(.*)$')
SKIP = {"PING", "ECHO", "COMMAND", "MONITOR", "INFO"}


def parse(nodes):
    windows = []  # (op, count, start, end, Counter of (cmd, inner))
    current = None
    for line in sys.stdin:
        m = LINE.match(line.strip())
        if not m:
            continue
        ts, source, cmd, rest = float(m[1]), m[2], m[3].upper(), m[4]
        if cmd == "ECHO" and '"mark:' in rest:
            _, op, count = rest.strip().strip('"').split(":")
            if op == "end":
                if current:
                    current[3] = ts
                    windows.append(current)
                current = None
            else:
                current = [op, int(count), ts, ts, collections.Counter()]
            continue
        if current is None or cmd in SKIP:
            continue
        inner = source == "lua"
        current[4][(cmd, inner)] += 1
    idle = next(w for w in windows if w[0] == "idle")
    secs = max(idle[3] - idle[2], 1e-3)
    rate = {k: v / secs for k, v in idle[4].items()}
    for op, count, start, end, seen in windows:
        if op == "idle" or count == 0:
            continue
        span = end - start
        per = {}
        for k in set(seen) | set(rate):
            v = (seen.get(k, 0) - rate.get(k, 0) * span) / count
            if v > 0.05:
                per[k] = v
        total = sum(per.values())
        trips = sum(v for (c, inner), v in per.items() if not inner)
        byname = collections.Counter()
        for (c, _), v in per.items():
            byname[c] += v
        top = " ".join(f"{c}:{v:.1f}" for c, v in byname.most_common(6))
        print(f"{nodes}\t{op}\t{total:.1f}\t{trips:.1f}\t{top}")


def table(path):
    rows = collections.OrderedDict()
    nodes = []
    for line in open(path):
        n, op, total, trips, _ = line.rstrip("\n").split("\t")
        if n not in nodes:
            nodes.append(n)
        rows.setdefault(op, {})[n] = f"{total} ({trips})"
    print("| operation | " + " | ".join(f"{n} node{'s' if n != '1' else ''}" for n in nodes) + " |")
    print("| --- |" + " --- |" * len(nodes))
    for op, cells in rows.items():
        print(f"| {op} | " + " | ".join(cells.get(n, "") for n in nodes) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "parse":
        parse(sys.argv[2])
    else:
        table(sys.argv[2])
