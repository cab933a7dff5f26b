#!/usr/bin/env node
// Push to gatecast WebSocket clients by publishing straight to Redis.
//
// Every push or command is one PUBLISH (SPUBLISH on Redis Cluster) of a
// MessagePack map, the envelope, on a gatecast channel: no gatecast library
// and no HTTP call. The format is described in docs/publishing.md.
//
// Needs node-redis (v4 or later) and @msgpack/msgpack: `npm ci` here.
//
//     node publish.js [--cluster] REDIS_URL PREFIX SCENARIO CLIENT_ID...
//
// SCENARIO is one of the fixed sequences that tests/examples.rs checks:
//
//     commands A B   A joins "room" and "lobby", B joins "room", B is bound
//                    to uid "bob", A's session becomes {"name": "alice", "n": 1}
//     pushes A B     a text push to A, to uid "bob", to "room" except B, to
//                    "room" and "lobby" (once per connection), a binary push
//                    to B, a push to everyone
//     cleanup A B    A's session gets n=2, A leaves "lobby", "bob" is unbound
//                    from B, "room" is emptied
//     close A B      pushes to "room" and "bob" (nobody is left there), then
//                    closes A after a last message and B without one
//
// --cluster: REDIS_URL is a Redis Cluster node; publish with SPUBLISH.

import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { encode } from '@msgpack/msgpack';
import { createClient, createCluster } from 'redis';

const VERSION = 1;
const CLIENT_ID = /^[0-9a-f]{20}$/;

// Publishes gatecast envelopes with a node-redis client.
//
// Pushes are fire-and-forget (at-most-once): they reach the connections that
// exist when Redis delivers them. Commands (joinGroup, bindUid, ...) are
// applied by the node holding the connection, in the order published, but
// asynchronously: use the HTTP API when you must wait for one.
export class Publisher {
  // sharded: true on Redis Cluster (SPUBLISH).
  constructor(redis, prefix = 'gatecast', { sharded = false } = {}) {
    this.redis = redis;
    this.prefix = prefix;
    this.sharded = sharded;
  }

  // ----- pushes: a string is a text frame, a Uint8Array/Buffer a binary one

  async sendToClient(clientId, data) {
    const id = checkId(clientId);
    await this.#publish(this.#node(id), { ...push(data), client_ids: [id] });
  }

  async sendToUid(uid, data) {
    await this.#publish(`${this.prefix}:uid:${uid}`, push(data));
  }

  async sendToGroup(group, data, exclude = []) {
    await this.sendToGroups([group], data, exclude);
  }

  // Once per connection, even one that is in several of the groups.
  async sendToGroups(groups, data, exclude = []) {
    const envelope = push(data, exclude);
    if (groups.length > 1) {
      // The same envelope on every group's channel, naming all of them in
      // the same order: a node delivers on a group's channel only to members
      // of none of the groups listed before it.
      envelope.groups = groups.map(String);
    }
    for (const group of groups) {
      await this.#publish(`${this.prefix}:group:${group}`, envelope);
    }
  }

  async sendToAll(data, exclude = []) {
    await this.#publish(`${this.prefix}:all`, push(data, exclude));
  }

  // Closes a connection (code 1000), after `data` if given.
  async closeClient(clientId, data) {
    const id = checkId(clientId);
    const envelope = { op: 'close', client_id: id };
    if (data !== undefined) Object.assign(envelope, message(data));
    await this.#publish(this.#node(id), envelope);
  }

  // ----- commands: applied by the node holding the connection

  bindUid(clientId, uid) {
    return this.#command(clientId, { op: 'bind_uid', uid: String(uid) });
  }

  unbindUid(clientId, uid) {
    return this.#command(clientId, { op: 'unbind_uid', uid: String(uid) });
  }

  joinGroup(clientId, group) {
    return this.#command(clientId, { op: 'join_group', group: String(group) });
  }

  leaveGroup(clientId, group) {
    return this.#command(clientId, { op: 'leave_group', group: String(group) });
  }

  setSession(clientId, session) {
    return this.#command(clientId, { op: 'set_session', session });
  }

  updateSession(clientId, session) {
    return this.#command(clientId, { op: 'update_session', session });
  }

  // Everyone leaves the group (on the group's own channel).
  ungroup(group) {
    return this.#publish(`${this.prefix}:group:${group}`, { op: 'ungroup' });
  }

  // ----- the wire

  #command(clientId, envelope) {
    const id = checkId(clientId);
    return this.#publish(this.#node(id), { ...envelope, client_id: id });
  }

  // The first 12 hex digits of a client_id name the node that holds it.
  #node(clientId) {
    return `${this.prefix}:node:${clientId.slice(0, 12)}`;
  }

  async #publish(channel, envelope) {
    // Uint8Array becomes MessagePack bin, string becomes str. Leave fields
    // out rather than set them to undefined (which would encode as nil).
    const bytes = encode({ v: VERSION, ...envelope }, { ignoreUndefined: true });
    const payload = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (this.sharded) {
      await this.redis.sPublish(channel, payload);
    } else {
      await this.redis.publish(channel, payload);
    }
  }
}

function message(data) {
  if (typeof data === 'string') return { data: Buffer.from(data, 'utf8') };
  return { data: data instanceof Uint8Array ? data : Uint8Array.from(data), binary: true };
}

function push(data, exclude = []) {
  const envelope = { op: 'push', ...message(data) };
  if (exclude.length > 0) envelope.exclude = exclude.map(checkId);
  return envelope;
}

function checkId(clientId) {
  const id = String(clientId).toLowerCase();
  if (!CLIENT_ID.test(id)) throw new TypeError(`not a client_id (20 hex digits): ${clientId}`);
  return id;
}

// ----- the scripted sequences

const SCENARIOS = {
  async commands(p, a, b) {
    await p.joinGroup(a, 'room');
    await p.joinGroup(a, 'lobby');
    await p.joinGroup(b, 'room');
    await p.bindUid(b, 'bob');
    await p.setSession(a, { name: 'alice', n: 1 });
  },
  async pushes(p, a, b) {
    await p.sendToClient(a, 'hello a ✓');
    await p.sendToUid('bob', 'hello bob');
    await p.sendToGroup('room', 'room without b', [b]);
    await p.sendToGroups(['room', 'lobby'], 'room or lobby');
    await p.sendToClient(b, Buffer.concat([Buffer.from([0x00, 0xff, 0x80, 0x9f]), Buffer.from('gatecast')]));
    await p.sendToAll('everyone');
  },
  async cleanup(p, a, b) {
    await p.updateSession(a, { n: 2 });
    await p.leaveGroup(a, 'lobby');
    await p.unbindUid(b, 'bob');
    await p.ungroup('room');
  },
  async close(p, a, b) {
    await p.sendToGroup('room', 'nobody is in room');
    await p.sendToUid('bob', 'nobody is bob');
    await p.closeClient(a, 'bye a');
    await p.closeClient(b);
  },
};

async function main(argv) {
  const args = argv.slice(2);
  const cluster = args[0] === '--cluster';
  if (cluster) args.shift();
  const [url, prefix, scenario, ...clientIds] = args;
  if (!Object.hasOwn(SCENARIOS, scenario ?? '') || clientIds.length !== 2) {
    console.error('usage: node publish.js [--cluster] REDIS_URL PREFIX commands|pushes|cleanup|close A B');
    return 2;
  }
  const redis = cluster ? createCluster({ rootNodes: [{ url }] }) : createClient({ url });
  redis.on('error', (e) => console.error('redis:', e.message));
  await redis.connect();
  try {
    await SCENARIOS[scenario](new Publisher(redis, prefix, { sharded: cluster }), ...clientIds);
  } finally {
    await redis.close(); // node-redis v4: quit()
  }
  return 0;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === resolve(process.argv[1])) {
  process.exitCode = await main(process.argv);
}
