#!/usr/bin/env python3
"""The capacity model of docs/capacity.md as a calculator.

Takes a workload (connections, pods, pushes per second to uids, groups and
all, queries, churn) and prints what each part costs: pod memory, CPU and
network, Redis memory, commands and CPU, pub/sub traffic per node, and
which limit is hit first. Every constant below is a measured figure; the
comment names its section in docs/benchmarks.md. Figures not measured yet
are marked MISSING and kept as options so a measurement can replace them.

usage: bench/capacity.py [--connections 1000000] [--pods 50]
       [--uid-pushes 10000] [--group-pushes 1000] [--group-size 100]
       [--all-pushes 1] [--payload 100] [--queries 100] ...
"""
import argparse
import math

# --- measured figures (docs/benchmarks.md) ---------------------------------
# "Under 2 KiB" / "100,000 connections per node, on paper": a Redis-engine
# node is 35 MiB + 1,775 B per bound, pushed-to connection (worst of the
# runs at 19,000; 1.2-1.6 KB in "Re-measured with the Redis engine's own
# subscriber").
POD_BASE_MIB = 35.0
POD_BYTES_PER_CONN = 1775
# "Side by side", quiet machine, eight set-ups: server CPU per delivery,
# gc-redis2: fan-out 1.00 us, broadcast 0.52 us (gc-redis1: 1.08, 0.77).
CPU_US_PER_DELIVERY = 1.0
# Same table: "many small pushes, 1,000 groups of 2": server CPU per push
# (one HTTP API call, one PUBLISH, two deliveries) 86.5 us on one node,
# 111 us over two: ~100 us per API call, deliveries included.
CPU_US_PER_API_PUSH = 100.0
# "Redis memory per connection": 923 B per connection bound to its own uid
# and in one of 5 groups, empty session.
REDIS_BYTES_PER_CONN = 923
# "Redis CPU per PUBLISH by subscribing nodes": 0.53 us + 0.15 us per node
# following the channel.
REDIS_US_PUBLISH = 0.53
REDIS_US_PER_SUBSCRIBER = 0.15
# "What history costs per push": FCALL gatecast_push 13.2 us per call
# (usec_per_call; the publish to subscribers comes on top).
REDIS_US_HISTORY = 13.2
# "Redis work per operation as nodes grow": redis-benchmark -P 30 SCARD,
# 1,744,186/s: ~0.57 us of Redis per pipelined simple command.
REDIS_US_PER_COMMAND = 0.57
# "Idle Redis work as nodes grow": ~9.5 commands per node per second.
IDLE_COMMANDS_PER_NODE = 9.5
# "Redis work per operation as nodes grow": commands per operation.
COMMANDS_PER_CONNECT = 5.5
COMMANDS_PER_DISCONNECT = 7.0
COMMANDS_PER_BIND_OR_JOIN = 14.0
# A query reads one key per node (count/list kinds) or ~2-3 per node
# (the members_with kinds); plus a PUBLISH pair for a remote client lookup.
QUERY_COMMANDS_PER_NODE = {"count": 1.0, "members": 2.5}
# Envelope on Redis: payload + 19 B (a 200-byte message is a 219-byte
# envelope, "What history costs per push"); RESP "message" frame around
# it: ~30 B + the channel name (~25 B).
ENVELOPE_OVERHEAD = 19
RESP_OVERHEAD = 55
# WebSocket frame header for payloads under 64 KiB.
WS_HEADER = 4


def nodes_holding(members, pods):
    """Pods holding at least one of `members` clients spread at random."""
    return pods * (1 - (1 - 1 / pods) ** members)


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--connections", type=float, default=1_000_000)
    a.add_argument("--pods", type=int, default=50)
    a.add_argument("--pod-cores", type=float, default=1.0, help="CPU limit per pod")
    a.add_argument("--pod-memory-mib", type=float, default=256, help="memory limit per pod")
    a.add_argument("--memory-headroom", type=float, default=2.0,
                   help="pod memory headroom for reconnect storms (docs/deploy.md: x2)")
    a.add_argument("--uid-pushes", type=float, default=10_000, help="send_to_uid per second")
    a.add_argument("--uid-connections", type=float, default=1.0,
                   help="connections per uid (devices), on different pods")
    a.add_argument("--group-pushes", type=float, default=1_000, help="send_to_group per second")
    a.add_argument("--group-size", type=float, default=100, help="members per pushed group")
    a.add_argument("--all-pushes", type=float, default=1.0, help="send_to_all per second")
    a.add_argument("--payload", type=float, default=100, help="bytes per message")
    a.add_argument("--history", type=float, default=0.0,
                   help="fraction of pushes kept in history (0-1)")
    a.add_argument("--queries", type=float, default=100, help="cluster-wide queries per second")
    a.add_argument("--query-kind", choices=QUERY_COMMANDS_PER_NODE, default="count")
    a.add_argument("--churn", type=float, default=1_000,
                   help="connects per second (as many disconnects)")
    a.add_argument("--binds", type=float, default=2_000, help="bind_uid + join_group per second")
    a.add_argument("--redis-cores", type=float, default=1.0,
                   help="Redis cores doing the work (1 for one Redis; masters on Cluster, "
                   "MISSING: Cluster scaling is not measured)")
    a.add_argument("--redis-memory-gib", type=float, default=8.0)
    a.add_argument("--redis-network-mbit", type=float, default=10_000,
                   help="the Redis host's network (not a gatecast figure)")
    o = a.parse_args()

    p = o.pods
    conns_per_pod = o.connections / p
    uid_nodes = min(o.uid_connections, p)
    group_nodes = nodes_holding(o.group_size, p)
    deliveries = (o.uid_pushes * o.uid_connections + o.group_pushes * o.group_size
                  + o.all_pushes * o.connections)
    api_pushes = o.uid_pushes + o.group_pushes + o.all_pushes

    # Pods.
    mem_mib = POD_BASE_MIB + conns_per_pod * POD_BYTES_PER_CONN / 2**20
    cpu_us = (deliveries * CPU_US_PER_DELIVERY + api_pushes * CPU_US_PER_API_PUSH) / p
    pod_cores = cpu_us / 1e6
    frame = o.payload + WS_HEADER
    out_mbit = deliveries / p * frame * 8 / 1e6
    # Pub/sub messages each pod receives from Redis.
    sub_msgs = (o.uid_pushes * uid_nodes + o.group_pushes * group_nodes
                + o.all_pushes * p) / p
    sub_bytes = sub_msgs * (o.payload + ENVELOPE_OVERHEAD + RESP_OVERHEAD)

    # Redis.
    redis_mem_gib = o.connections * REDIS_BYTES_PER_CONN / 2**30
    publish_us = (o.uid_pushes * (REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * uid_nodes)
                  + o.group_pushes * (REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * group_nodes)
                  + o.all_pushes * (REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * p))
    history_us = api_pushes * o.history * REDIS_US_HISTORY
    query_cmds = o.queries * (1 + QUERY_COMMANDS_PER_NODE[o.query_kind] * (p - 1))
    churn_cmds = o.churn * (COMMANDS_PER_CONNECT + COMMANDS_PER_DISCONNECT)
    bind_cmds = o.binds * COMMANDS_PER_BIND_OR_JOIN
    idle_cmds = IDLE_COMMANDS_PER_NODE * p
    other_cmds = query_cmds + churn_cmds + bind_cmds + idle_cmds
    redis_cmds = api_pushes + other_cmds
    redis_us = publish_us + history_us + other_cmds * REDIS_US_PER_COMMAND
    redis_cores = redis_us / 1e6
    redis_out_mbit = sub_msgs * p * (o.payload + ENVELOPE_OVERHEAD + RESP_OVERHEAD) * 8 / 1e6

    rows = [
        ("pod", "connections", f"{conns_per_pod:,.0f}"),
        ("pod", "memory MiB", f"{mem_mib:,.0f}"),
        ("pod", "deliveries/s", f"{deliveries / p:,.0f}"),
        ("pod", "CPU cores", f"{pod_cores:,.2f}"),
        ("pod", "network out to clients Mbit/s", f"{out_mbit:,.1f}"),
        ("pod", "pub/sub messages in /s", f"{sub_msgs:,.0f}"),
        ("pod", "pub/sub in Mbit/s", f"{sub_bytes * 8 / 1e6:,.2f}"),
        ("redis", "memory GiB (connections only)", f"{redis_mem_gib:,.2f}"),
        ("redis", "commands/s", f"{redis_cmds:,.0f}"),
        ("redis", "  of which queries", f"{query_cmds:,.0f}"),
        ("redis", "  of which connects/disconnects", f"{churn_cmds:,.0f}"),
        ("redis", "  of which binds/joins", f"{bind_cmds:,.0f}"),
        ("redis", "  of which idle (heartbeats...)", f"{idle_cmds:,.0f}"),
        ("redis", "CPU cores (pushes+history+commands)", f"{redis_cores:,.2f}"),
        ("redis", "  of which publishing", f"{publish_us / 1e6:,.2f}"),
        ("redis", "  of which history", f"{history_us / 1e6:,.2f}"),
        ("redis", "pub/sub out Mbit/s", f"{redis_out_mbit:,.1f}"),
    ]
    print(f"workload: {o.connections:,.0f} connections on {p} pods; pushes/s: "
          f"{o.uid_pushes:,.0f} to uids, {o.group_pushes:,.0f} to groups of "
          f"{o.group_size:,.0f} (on ~{group_nodes:.1f} pods each), {o.all_pushes:,.1f} to all; "
          f"{o.payload:.0f} B messages; {o.queries:,.0f} {o.query_kind} queries/s")
    print()
    print("| part | figure | value |")
    print("| --- | --- | --- |")
    for part, name, value in rows:
        print(f"| {part} | {name} | {value} |")
    limits = [
        ("pod CPU", pod_cores / o.pod_cores),
        ("pod memory (with headroom)", mem_mib * o.memory_headroom / o.pod_memory_mib),
        ("Redis CPU", redis_cores / o.redis_cores),
        ("Redis memory", redis_mem_gib / o.redis_memory_gib),
        ("Redis network out", redis_out_mbit / o.redis_network_mbit),
    ]
    print()
    print("use of each limit (1.0 = full):")
    for name, use in sorted(limits, key=lambda x: -x[1]):
        print(f"  {name}: {use:.2f}")
    first = max(limits, key=lambda x: x[1])
    verdict = "over it" if first[1] > 1 else "the nearest limit"
    print(f"first limit: {first[0]} at {first[1]:.2f} of it ({verdict})")
    if math.isclose(o.redis_cores, 1.0):
        print("note: Redis is one core; Redis Cluster scaling (masters, sharded pub/sub) "
              "is not measured yet (MISSING)")


if __name__ == "__main__":
    main()
