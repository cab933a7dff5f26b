#!/usr/bin/env python3
"""Push to gatecast WebSocket clients by publishing straight to Redis.

Every push or command is one PUBLISH (SPUBLISH on Redis Cluster) of a
MessagePack map, the envelope, on a gatecast channel: no gatecast library and
no HTTP call. The format is described in docs/publishing.md.

Needs redis-py and msgpack (`pip install redis msgpack`).

    publish.py [--cluster] REDIS_URL PREFIX SCENARIO CLIENT_ID...

SCENARIO is one of the fixed sequences that tests/examples.rs checks:

    commands A B   A joins "room" and "lobby", B joins "room", B is bound to
                   uid "bob", A's session becomes {"name": "alice", "n": 1}
    pushes A B     a text push to A, to uid "bob", to "room" except B, to
                   "room" and "lobby" (once per connection), a binary push
                   to B, a push to everyone
    cleanup A B    A's session gets n=2, A leaves "lobby", "bob" is unbound
                   from B, "room" is emptied
    close A B      pushes to "room" and "bob" (nobody is left there), then
                   closes A after a last message and B without one
    malformed A    three envelopes that A's node skips (not MessagePack,
                   version 2, unknown op), then a valid push to A

--cluster: REDIS_URL is a Redis Cluster node; publish with SPUBLISH.
"""

import re
import sys

import msgpack
import redis
from redis.cluster import RedisCluster

VERSION = 1
_CLIENT_ID = re.compile(r"^[0-9a-f]{20}$")


class Publisher:
    """Publishes gatecast envelopes with a redis-py client.

    Pushes are fire-and-forget (at-most-once): they reach the connections
    that exist when Redis delivers them. Commands (join_group, bind_uid, ...)
    are applied by the node holding the connection, in the order published,
    but asynchronously: use the HTTP API when you must wait for one.
    """

    def __init__(self, client, prefix="gatecast", sharded=False):
        self.redis = client
        self.prefix = prefix
        self.sharded = sharded  # True on Redis Cluster: SPUBLISH

    # ----- pushes --------------------------------------------------------

    def send_to_client(self, client_id, data):
        """str -> text frame, bytes -> binary frame, to one connection."""
        client_id = _check_id(client_id)
        self._publish(self._node(client_id), _push(data, client_ids=[client_id]))

    def send_to_uid(self, uid, data):
        self._publish(f"{self.prefix}:uid:{uid}", _push(data))

    def send_to_group(self, group, data, exclude=()):
        self.send_to_groups([group], data, exclude)

    def send_to_groups(self, groups, data, exclude=()):
        """Once per connection, even one that is in several of the groups."""
        envelope = _push(data, exclude=exclude)
        if len(groups) > 1:
            # The same envelope on every group's channel, naming all of them
            # in the same order: a node delivers on a group's channel only to
            # members of none of the groups listed before it.
            envelope["groups"] = list(groups)
        for group in groups:
            self._publish(f"{self.prefix}:group:{group}", envelope)

    def send_to_all(self, data, exclude=()):
        self._publish(f"{self.prefix}:all", _push(data, exclude=exclude))

    def close_client(self, client_id, data=None):
        """Closes a connection (code 1000), after `data` if given."""
        client_id = _check_id(client_id)
        envelope = {"op": "close", "client_id": client_id}
        if data is not None:
            envelope.update(_message(data))
        self._publish(self._node(client_id), envelope)

    # ----- commands: applied by the node holding the connection ----------

    def bind_uid(self, client_id, uid):
        self._command(client_id, "bind_uid", uid=str(uid))

    def unbind_uid(self, client_id, uid):
        self._command(client_id, "unbind_uid", uid=str(uid))

    def join_group(self, client_id, group):
        self._command(client_id, "join_group", group=str(group))

    def leave_group(self, client_id, group):
        self._command(client_id, "leave_group", group=str(group))

    def set_session(self, client_id, session):
        self._command(client_id, "set_session", session=dict(session))

    def update_session(self, client_id, session):
        self._command(client_id, "update_session", session=dict(session))

    def ungroup(self, group):
        """Everyone leaves the group (on the group's own channel)."""
        self._publish(f"{self.prefix}:group:{group}", {"op": "ungroup"})

    # ----- the wire -------------------------------------------------------

    def _command(self, client_id, op, **fields):
        client_id = _check_id(client_id)
        self._publish(self._node(client_id), {"op": op, "client_id": client_id, **fields})

    def _node(self, client_id):
        # The first 12 hex digits of a client_id name the node that holds it.
        return f"{self.prefix}:node:{client_id[:12]}"

    def publish_raw(self, channel, payload):
        """Publishes bytes as they are (the malformed scenario uses it)."""
        if self.sharded:
            self.redis.spublish(channel, payload)
        else:
            self.redis.publish(channel, payload)

    def _publish(self, channel, envelope):
        # use_bin_type=True: bytes become MessagePack bin, str become str.
        self.publish_raw(channel, msgpack.packb({"v": VERSION, **envelope}, use_bin_type=True))


def _message(data):
    if isinstance(data, str):
        return {"data": data.encode("utf-8")}
    return {"data": bytes(data), "binary": True}


def _push(data, client_ids=(), exclude=()):
    envelope = {"op": "push", **_message(data)}
    if client_ids:
        envelope["client_ids"] = list(client_ids)
    if exclude:
        envelope["exclude"] = [_check_id(c) for c in exclude]
    return envelope


def _check_id(client_id):
    client_id = client_id.lower()
    if not _CLIENT_ID.match(client_id):
        raise ValueError(f"not a client_id (20 hex digits): {client_id!r}")
    return client_id


# ----- the scripted sequences ------------------------------------------------


def commands(p, a, b):
    p.join_group(a, "room")
    p.join_group(a, "lobby")
    p.join_group(b, "room")
    p.bind_uid(b, "bob")
    p.set_session(a, {"name": "alice", "n": 1})


def pushes(p, a, b):
    p.send_to_client(a, "hello a ✓")
    p.send_to_uid("bob", "hello bob")
    p.send_to_group("room", "room without b", exclude=[b])
    p.send_to_groups(["room", "lobby"], "room or lobby")
    p.send_to_client(b, bytes([0x00, 0xFF, 0x80, 0x9F]) + b"gatecast")
    p.send_to_all("everyone")


def cleanup(p, a, b):
    p.update_session(a, {"n": 2})
    p.leave_group(a, "lobby")
    p.unbind_uid(b, "bob")
    p.ungroup("room")


def close(p, a, b):
    p.send_to_group("room", "nobody is in room")
    p.send_to_uid("bob", "nobody is bob")
    p.close_client(a, "bye a")
    p.close_client(b)


def malformed(p, a):
    node = p._node(_check_id(a))
    p.publish_raw(node, b"\xc1 not MessagePack")
    p.publish_raw(node, msgpack.packb({"v": 2, "op": "push", "client_ids": [a], "data": b"v2"}))
    p.publish_raw(node, msgpack.packb({"v": 1, "op": "explode", "client_id": a}))
    p.send_to_client(a, "still here")


SCENARIOS = {
    "commands": (commands, 2),
    "pushes": (pushes, 2),
    "cleanup": (cleanup, 2),
    "close": (close, 2),
    "malformed": (malformed, 1),
}


def main(argv):
    args = argv[1:]
    cluster = bool(args) and args[0] == "--cluster"
    if cluster:
        args = args[1:]
    if len(args) < 3 or args[2] not in SCENARIOS or len(args) != 3 + SCENARIOS[args[2]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    url, prefix, scenario, *client_ids = args
    client = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        run, _ = SCENARIOS[scenario]
        run(Publisher(client, prefix, sharded=cluster), *client_ids)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
