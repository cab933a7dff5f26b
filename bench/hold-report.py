#!/usr/bin/env python3
"""Merges the reports of `gatecast-bench hold` processes (bench/100k.sh,
bench/cluster-scale.sh).

usage: hold-report.py N FILE...   merges every holder's N-th report line
  (0 = the first after `ready`) and prints one JSON line per tag: clients
  that got it, p50/p99/max push-to-frame latency (ms), and the span from
  the first push sent to the last frame received, with deliveries/s over
  that span.
       hold-report.py ready FILE...   sums the holders' `ready` lines.
"""
import itertools
import json
import sys


def lines(path, event):
    with open(path) as f:
        return [json.loads(l) for l in f if l.startswith("{") and f'"event":"{event}"' in l]


def pct(sorted_values, p):
    if not sorted_values:
        return 0.0
    i = round((len(sorted_values) - 1) * p)
    return sorted_values[min(i, len(sorted_values) - 1)]


def main():
    what, files = sys.argv[1], sys.argv[2:]
    if what == "ready":
        ready = [lines(f, "ready")[0] for f in files]
        errors = {}
        for r in ready:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        print(json.dumps({
            "connected": sum(r["connected"] for r in ready),
            "failed": sum(r["failed"] for r in ready),
            "commands": sum(r["commands"] for r in ready),
            "command_errors": sum(r["command_errors"] for r in ready),
            "failed_per_round": [sum(x) for x in itertools.zip_longest(
                *[r.get("failed_per_round", []) for r in ready], fillvalue=0)],
            "connect_seconds_max": max(r["connect_seconds"] for r in ready),
            "bind_seconds_max": max(r["bind_seconds"] for r in ready),
            "errors": errors,
        }))
        return
    n = int(what)
    reports = [lines(f, "report")[n] for f in files]
    tags = {}
    for r in reports:
        for tag, t in r["tags"].items():
            m = tags.setdefault(tag, {"count": 0, "min_sent_us": 0, "max_recv_us": 0, "lat": []})
            m["count"] += t["count"]
            if t["min_sent_us"] and (not m["min_sent_us"] or t["min_sent_us"] < m["min_sent_us"]):
                m["min_sent_us"] = t["min_sent_us"]
            m["max_recv_us"] = max(m["max_recv_us"], t["max_recv_us"])
            m["lat"].extend(t["latencies_ms"])
    for tag, m in sorted(tags.items()):
        lat = sorted(m["lat"])
        span = (m["max_recv_us"] - m["min_sent_us"]) / 1e6 if m["min_sent_us"] else 0
        print(json.dumps({
            "tag": tag,
            "frames": m["count"],
            "p50_ms": round(pct(lat, 0.5), 2),
            "p99_ms": round(pct(lat, 0.99), 2),
            "max_ms": round(lat[-1], 2) if lat else 0,
            "first_sent_to_last_frame_s": round(span, 4),
            "deliveries_per_s": round(m["count"] / span) if span > 0 else 0,
            "closed_clients": sum(r["closed"] for r in reports),
        }))


if __name__ == "__main__":
    main()
