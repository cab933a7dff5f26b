#!/usr/bin/env python3
"""Handle gatecast's connect / message / close events from the Redis stream.

With `--events`, every gatecast node appends one entry per event to the
Redis Stream `<prefix>:events`. This program is the backend side, the
counterpart of GatewayWorker's BusinessWorker onConnect / onMessage /
onClose: it reads the stream with a consumer group (each event goes to one
consumer of the group; run as many as you like, each with its own name),
handles each event, then acknowledges it (XACK). An event whose handler
failed, or whose consumer died before acknowledging it, stays pending and is
reclaimed with XAUTOCLAIM: delivery is at least once. docs/events.md
describes the entry format and the guarantees.

The demo handler echoes each message back to its sender through gatecast's
HTTP API (send_to_client): text as "echo: <text>", binary as the same bytes.

Needs redis-py (`pip install redis`); the HTTP call uses the standard
library.

    consume_events.py [options] REDIS_URL API_URL

    REDIS_URL            the Redis gatecast writes to, e.g. redis://127.0.0.1:6379
    API_URL              gatecast's HTTP API, e.g. http://127.0.0.1:8081/api
    --prefix P           gatecast's --redis-prefix (default gatecast)
    --group G            the consumer group (default backend)
    --consumer C         this consumer's name, unique in the group
                         (default <hostname>-<pid>)
    --start ID           where a new group starts: $ (default, only events
                         written from now on) or 0 (the whole stream)
    --claim-min-idle MS  on start and every 30 s, take over the entries left
                         pending for at least MS milliseconds by any consumer
                         (XAUTOCLAIM; default 60000)
    --max-events N       exit after handling N events (default: run forever)
    --no-ack             never XACK (to see entries stay pending)
    --api-key KEY        gatecast's --api-key (default $GATECAST_API_KEY)

Each handled event is printed on stdout as one JSON line: the entry's
fields, plus its stream `id` and `reclaimed` (true when it came from
XAUTOCLAIM); `session` and `headers` parsed, `time_ms` a number, `uid` null
when there is none, and for messages `binary` a boolean with the data in
`data` (text frames) or `data_base64` (binary frames), as in the webhook.
"""

import argparse
import base64
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import redis

READ_COUNT = 100  # entries per XREADGROUP / XAUTOCLAIM
BLOCK_MS = 1000  # how long one XREADGROUP waits for new entries
RECLAIM_EVERY_S = 30  # how often a running consumer looks for stale entries


class Gatecast:
    """A small client of gatecast's HTTP API (POST /api/<method>)."""

    def __init__(self, base_url, api_key=None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    def call(self, method, params):
        request = urllib.request.Request(
            f"{self.base_url}/{method}",
            data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as e:
            reply = json.load(e)
        if "error" in reply:
            raise RuntimeError(f"gatecast {method}: {reply['error']}")
        return reply["result"]

    def send_to_client(self, client_id, data):
        """str -> text frame, bytes -> binary frame."""
        if isinstance(data, str):
            return self.call("send_to_client", {"client_id": client_id, "data": data})
        encoded = base64.b64encode(data).decode()
        return self.call("send_to_client", {"client_id": client_id, "data_base64": encoded})


# ----- the business logic: one function per event type -----------------------


def on_connect(api, event):
    """A client connected (GatewayWorker: onConnect + onWebSocketConnect).

    event["query"] is the raw query string of /ws, event["headers"] the
    origin, user-agent, cookie, proxy headers... of the upgrade request. A
    real backend would authenticate here and call bind_uid / join_group.
    """


def on_message(api, event):
    """A client sent a message: echo it back through the HTTP API."""
    if event["binary"]:
        api.send_to_client(event["client_id"], event["data"])
    else:
        api.send_to_client(event["client_id"], "echo: " + event["data"])


def on_close(api, event):
    """A connection closed. Its uid and session are in the event; gatecast
    has already forgotten them (and its groups)."""


def on_resumed(api, event):
    """A client that opted in to recovery came back with its resume token:
    event["client_id"] (its new id) has the uid, groups and session of
    event["old_client_id"] now. Move any state kept per client_id over."""


HANDLERS = {
    "connect": on_connect,
    "message": on_message,
    "close": on_close,
    "resumed": on_resumed,
}


# ----- the stream --------------------------------------------------------------


def decode(entry_id, fields):
    """A stream entry (bytes -> bytes) as a dict of Python values."""
    text = {k.decode(): v for k, v in fields.items()}
    event = {
        "id": entry_id.decode(),
        "type": text["type"].decode(),
        "client_id": text["client_id"].decode(),
        "node": text["node"].decode(),
        "uid": text["uid"].decode() or None,
        "session": json.loads(text["session"]),
        "time_ms": int(text["time_ms"]),
    }
    if event["type"] == "connect":
        event["remote_addr"] = text["remote_addr"].decode()
        event["query"] = text["query"].decode()
        event["headers"] = json.loads(text["headers"])
    elif event["type"] == "resumed":
        event["old_client_id"] = text["old_client_id"].decode()
    elif event["type"] == "message":
        event["binary"] = text["binary"] == b"1"
        # Text frames are UTF-8 (gatecast checks); binary frames are bytes.
        event["data"] = text["data"] if event["binary"] else text["data"].decode()
    return event


def printable(event, reclaimed):
    out = dict(event, reclaimed=reclaimed)
    if isinstance(out.get("data"), bytes):
        out["data_base64"] = base64.b64encode(out.pop("data")).decode()
    return json.dumps(out, ensure_ascii=False)


class Consumer:
    def __init__(self, r, api, args):
        self.redis = r
        self.api = api
        self.stream = f"{args.prefix}:events"
        self.group = args.group
        self.name = args.consumer
        self.ack = not args.no_ack
        self.max_events = args.max_events
        self.min_idle_ms = args.claim_min_idle
        self.handled = 0

    def create_group(self, start):
        """XGROUP CREATE <stream> <group> <start> MKSTREAM, once per group."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def done(self):
        return self.max_events is not None and self.handled >= self.max_events

    def batch(self):
        """How many entries to take at once: no more than --max-events needs,
        so that none is left delivered but unhandled."""
        if self.max_events is None:
            return READ_COUNT
        return min(READ_COUNT, self.max_events - self.handled)

    def handle(self, entry_id, fields, reclaimed=False):
        if fields is None:  # trimmed away while pending (Redis 6.2)
            return
        event = decode(entry_id, fields)
        try:
            # Types added later are acknowledged and skipped, not retried.
            handler = HANDLERS.get(event["type"])
            if handler is not None:
                handler(self.api, event)
        except Exception as e:  # noqa: BLE001 - left pending, retried later
            print(f"event {event['id']} failed, left pending: {e}", file=sys.stderr)
            return
        if self.ack:
            self.redis.xack(self.stream, self.group, entry_id)
        self.handled += 1
        print(printable(event, reclaimed), flush=True)

    def reclaim(self):
        """Takes over the entries that consumers (dead ones, this one in an
        earlier run, or a handler that failed) read and did not acknowledge
        for at least --claim-min-idle milliseconds."""
        cursor = "0-0"
        while not self.done():
            reply = self.redis.xautoclaim(
                self.stream, self.group, self.name, self.min_idle_ms, cursor, count=self.batch()
            )
            cursor, entries = reply[0], reply[1]
            for entry_id, fields in entries:
                self.handle(entry_id, fields, reclaimed=True)
                if self.done():
                    return
            if cursor in (b"0-0", "0-0"):
                return

    def run(self):
        self.reclaim()
        last_reclaim = time.monotonic()
        while not self.done():
            if time.monotonic() - last_reclaim >= RECLAIM_EVERY_S:
                self.reclaim()
                last_reclaim = time.monotonic()
            # ">": entries never delivered to any consumer of the group.
            reply = self.redis.xreadgroup(
                self.group, self.name, {self.stream: ">"}, count=self.batch(), block=BLOCK_MS
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self.handle(entry_id, fields)
                    if self.done():
                        return


def main(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("redis_url")
    parser.add_argument("api_url")
    parser.add_argument("--prefix", default="gatecast")
    parser.add_argument("--group", default="backend")
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--start", default="$")
    parser.add_argument("--claim-min-idle", type=int, default=60_000, metavar="MS")
    parser.add_argument("--max-events", type=int, metavar="N")
    parser.add_argument("--no-ack", action="store_true")
    parser.add_argument("--api-key", default=os.environ.get("GATECAST_API_KEY"))
    args = parser.parse_args(argv[1:])

    # decode_responses=False: message data is raw bytes.
    r = redis.Redis.from_url(args.redis_url)
    consumer = Consumer(r, Gatecast(args.api_url, args.api_key), args)
    try:
        consumer.create_group(args.start)
        consumer.run()
    except KeyboardInterrupt:
        pass
    finally:
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
