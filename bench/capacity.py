#!/usr/bin/env python3
"""The capacity model of docs/capacity.md as a calculator.

Takes a workload (connections, pods, pushes per second to uids, groups and
all, queries, churn) and prints what each part costs: pod memory, CPU and
network, Redis memory, commands and CPU, pub/sub traffic per node, and
which limit is hit first. Every constant below is a measured figure; the
comment names its section in docs/benchmarks.md. Figures not measured yet
are options (--delivery-us, --redis-masters) where the measurement depends on
how the load arrives or on the set-up.

usage: bench/capacity.py [--connections 1000000] [--pods 50]
       [--uid-pushes 10000] [--group-pushes 1000] [--group-size 100]
       [--all-pushes 1] [--payload 100] [--queries 100] ...
"""
import argparse
import random

# --- measured figures (docs/benchmarks.md) ---------------------------------
# "100,000 connections on one box": 6 nodes of 16,667 connections, each
# bound to a uid and in 3 groups: a node is ~22 MiB before its clients and
# 2.1-3.0 KB of RSS per connection once they are bound (up to 3.6 KB after
# pushes); the model takes 3,000 B.
POD_BASE_MIB = 22.0
POD_BYTES_PER_CONN = 3000
# Same section: node CPU per delivery. A delivery that goes out alone (the
# connection's queue empty: a lone send_to_all, a push to a uid or a small
# group) is one writev: ~9.5 us, 80-90 % of it in the kernel (on loopback
# the sender's CPU also runs the receiver's TCP path). Pushes that arrive
# together share writevs: ~1.4 us (10 send_to_all back to back; 1.0 us in
# "Side by side" fan-out at full rate). --delivery-us picks.
CPU_US_PER_DELIVERY_ALONE = 9.5
CPU_US_PER_DELIVERY_BURST = 1.4
# "Redis Cluster: one Redis, 3 and 6 masters": node CPU per API push (one
# HTTP call, one SPUBLISH, the delivery), 118-134 us with 6 nodes on a busy
# box ("Side by side": 86.5-111 us on a quiet one).
CPU_US_PER_API_PUSH = 120.0
# "100,000 connections on one box": 1,117-1,143 B of Redis used_memory per
# connection bound to a uid and in 3 groups (921-923 B with one group,
# "Redis memory per connection").
REDIS_BYTES_PER_CONN = 1140
# "Redis Cluster: one Redis, 3 and 6 masters": redis-benchmark PUBLISH to
# one subscriber, 50 clients: 2.97 us of Redis CPU per PUBLISH arriving
# alone (pipeline 1; what gatecast's nodes send, one per API push), 0.62-0.78
# us pipelined. Each node following the channel adds 0.15 us ("Redis CPU
# per PUBLISH by subscribing nodes").
REDIS_US_PUBLISH = 2.97
REDIS_US_PER_SUBSCRIBER = 0.15
# "What history costs per push": FCALL gatecast_push 13.2 us per call
# (usec_per_call; the publish to subscribers comes on top).
REDIS_US_HISTORY = 13.2
# "Redis work per operation as nodes grow": redis-benchmark -P 30 SCARD,
# 1,744,186/s: ~0.57 us of Redis per pipelined simple command (and the
# commands scripts run); each round trip (a command that arrives alone)
# adds ~2.4 us (2.97 - 0.57, the PUBLISH pair above).
REDIS_US_PER_COMMAND = 0.57
REDIS_US_PER_ROUND_TRIP = 2.4
# "Idle Redis work as nodes grow": ~9.5 commands per node per second.
IDLE_COMMANDS_PER_NODE = 9.5
# "Redis work per operation as nodes grow": commands per operation.
COMMANDS_PER_CONNECT = 5.5
COMMANDS_PER_DISCONNECT = 7.0
COMMANDS_PER_BIND_OR_JOIN = 14.0
# Round trips (commands clients sent) per operation, same table: connects
# and disconnects come in batches (0.1-0.7), bind/join 1-4, a query 2
# (the node set, then every partition's key in one pipelined write).
ROUND_TRIPS_PER_CHURN = 0.5
ROUND_TRIPS_PER_BIND_OR_JOIN = 3.0
ROUND_TRIPS_PER_QUERY = 2.0
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


def busiest_share(parts, masters, trials=4000):
    """Mean largest number of `parts` random slots' partitions on one of
    `masters` (each node's partition is one slot), as a multiple of the
    even share: "Redis Cluster: one Redis, 3 and 6 masters"."""
    if masters <= 1:
        return 1.0
    rng = random.Random(33)
    total = 0
    for _ in range(trials):
        counts = [0] * masters
        for _ in range(parts):
            counts[rng.randrange(masters)] += 1
        total += max(counts)
    return total / trials / (parts / masters)


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
    a.add_argument("--redis-masters", type=int, default=1,
                   help="1: one Redis; more: a Redis Cluster of that many masters (sharded "
                   "pub/sub: pushes spread evenly, a node's partition sits on one master, "
                   "send_to_all on one)")
    a.add_argument("--redis-memory-gib", type=float, default=8.0, help="per master")
    a.add_argument("--delivery-us", type=float, default=CPU_US_PER_DELIVERY_ALONE,
                   help=f"pod CPU per delivery: {CPU_US_PER_DELIVERY_ALONE} when each goes out "
                   f"alone, {CPU_US_PER_DELIVERY_BURST} when pushes arrive in bursts")
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
    cpu_us = (deliveries * o.delivery_us + api_pushes * CPU_US_PER_API_PUSH) / p
    pod_cores = cpu_us / 1e6
    frame = o.payload + WS_HEADER
    out_mbit = deliveries / p * frame * 8 / 1e6
    # Pub/sub messages each pod receives from Redis.
    sub_msgs = (o.uid_pushes * uid_nodes + o.group_pushes * group_nodes
                + o.all_pushes * p) / p
    sub_bytes = sub_msgs * (o.payload + ENVELOPE_OVERHEAD + RESP_OVERHEAD)

    # Redis. On Cluster (--redis-masters > 1) channels spread evenly over
    # the masters, so publishing and history divide by the masters; a
    # node's partition (its keys, and the connects, binds, joins and
    # partition reads of queries) sits on one master, the busiest of which
    # carries `imbalance` times the even share; send_to_all is one channel,
    # on one master.
    m = max(o.redis_masters, 1)
    imbalance = busiest_share(p, m)
    redis_mem_gib = o.connections * REDIS_BYTES_PER_CONN / 2**30
    per_push = {
        "uid": REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * uid_nodes,
        "group": REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * group_nodes,
        "all": REDIS_US_PUBLISH + REDIS_US_PER_SUBSCRIBER * p,
    }
    spread_publish_us = o.uid_pushes * per_push["uid"] + o.group_pushes * per_push["group"]
    all_publish_us = o.all_pushes * per_push["all"]
    publish_us = spread_publish_us + all_publish_us
    history_us = api_pushes * o.history * REDIS_US_HISTORY
    query_cmds = o.queries * (1 + QUERY_COMMANDS_PER_NODE[o.query_kind] * (p - 1))
    churn_cmds = o.churn * (COMMANDS_PER_CONNECT + COMMANDS_PER_DISCONNECT)
    bind_cmds = o.binds * COMMANDS_PER_BIND_OR_JOIN
    idle_cmds = IDLE_COMMANDS_PER_NODE * p
    other_cmds = query_cmds + churn_cmds + bind_cmds + idle_cmds
    round_trips = (o.queries * ROUND_TRIPS_PER_QUERY + o.churn * 2 * ROUND_TRIPS_PER_CHURN
                   + o.binds * ROUND_TRIPS_PER_BIND_OR_JOIN + idle_cmds)
    redis_cmds = api_pushes + other_cmds
    partition_us = other_cmds * REDIS_US_PER_COMMAND + round_trips * REDIS_US_PER_ROUND_TRIP
    redis_us = publish_us + history_us + partition_us
    redis_cores = redis_us / 1e6
    busiest_master_cores = ((spread_publish_us + history_us) / m + partition_us * imbalance / m
                            + all_publish_us) / 1e6
    busiest_master_mem_gib = redis_mem_gib * imbalance / m
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
    if m > 1:
        rows += [
            ("redis", f"busiest of {m} masters: partitions x even share", f"{imbalance:,.2f}"),
            ("redis", "busiest master: CPU cores", f"{busiest_master_cores:,.2f}"),
            ("redis", "busiest master: memory GiB", f"{busiest_master_mem_gib:,.2f}"),
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
        ("Redis CPU (busiest master)", busiest_master_cores),
        ("Redis memory (busiest master)", busiest_master_mem_gib / o.redis_memory_gib),
        ("Redis network out", redis_out_mbit / o.redis_network_mbit),
    ]
    print()
    print("use of each limit (1.0 = full):")
    for name, use in sorted(limits, key=lambda x: -x[1]):
        print(f"  {name}: {use:.2f}")
    first = max(limits, key=lambda x: x[1])
    verdict = "over it" if first[1] > 1 else "the nearest limit"
    print(f"first limit: {first[0]} at {first[1]:.2f} of it ({verdict})")


if __name__ == "__main__":
    main()
