// The Node.js peer of the side-by-side benchmark: a minimal WebSocket push
// gateway on `ws`, clustered over Redis pub/sub, the way such gateways are
// usually written. Every push is PUBLISHed through Redis, also on one node;
// each node delivers what arrives on the channels it follows (a uid's or a
// group's channel while a local client is bound to it, `all` always). A
// membership change for another node's client is a command on that node's
// channel, answered once that node follows the channel, so a push sent
// after the answer reaches the client.
//
// It speaks the subset of gatecast's API the load generator uses
// (POST /api/{bind_uid,join_group,send_to_uid,send_to_group,send_to_all})
// and sends the same welcome frame ({"client_id": ...}).
//
// usage: node server.js WS_PORT API_PORT NODE_NAME [REDIS_URL]
import http from 'node:http';
import { WebSocketServer } from 'ws';
import { createClient } from 'redis';

const [wsPort, apiPort, node, redisUrl = 'redis://127.0.0.1:6390'] = process.argv.slice(2);
const P = 'peer:';
const RPC_TIMEOUT_MS = 2000;

const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
await pub.connect();
await sub.connect();

const conns = new Map(); // client_id -> ws
const members = new Map(); // channel -> Set(client_id)
const following = new Map(); // channel -> Promise of the SUBSCRIBE
const pending = new Map(); // req -> resolve
let nextId = 0;
let nextReq = 0;

function deliver(channel, message) {
  const ids = members.get(channel);
  if (!ids) return;
  for (const id of ids) {
    const ws = conns.get(id);
    if (ws) ws.send(message);
  }
}

function follow(channel) {
  let done = following.get(channel);
  if (!done) {
    done = sub.subscribe(channel, (message) => deliver(channel, message));
    following.set(channel, done);
  }
  return done;
}

async function apply(op, clientId, name) {
  if (!conns.has(clientId)) return;
  const channel = P + (op === 'bind_uid' ? 'uid:' : 'group:') + name;
  let set = members.get(channel);
  if (!set) members.set(channel, (set = new Set()));
  set.add(clientId);
  conns.get(clientId).channels.push(channel);
  await follow(channel);
}

await sub.subscribe(P + 'all', (message) => {
  for (const ws of conns.values()) ws.send(message);
});
await sub.subscribe(P + 'node:' + node, async (raw) => {
  const m = JSON.parse(raw);
  if (m.op === 'reply') {
    const resolve = pending.get(m.req);
    if (resolve) resolve();
    return;
  }
  await apply(m.op, m.client_id, m.name);
  await pub.publish(P + 'node:' + m.reply_to, JSON.stringify({ op: 'reply', req: m.req }));
});

async function command(op, clientId, name) {
  const owner = String(clientId).split('-')[0];
  if (owner === node) return apply(op, clientId, name);
  const req = `${node}-${++nextReq}`;
  const answered = new Promise((resolve, reject) => {
    const timer = setTimeout(() => { pending.delete(req); reject(new Error('no answer')); }, RPC_TIMEOUT_MS);
    pending.set(req, () => { clearTimeout(timer); pending.delete(req); resolve(); });
  });
  await pub.publish(P + 'node:' + owner, JSON.stringify({ op, req, reply_to: node, client_id: clientId, name }));
  await answered;
}

const wss = new WebSocketServer({ port: Number(wsPort), host: '127.0.0.1', path: '/ws' });
wss.on('connection', (ws) => {
  const id = `${node}-${++nextId}`;
  ws.channels = [];
  conns.set(id, ws);
  ws.send(JSON.stringify({ client_id: id }));
  ws.on('close', () => {
    conns.delete(id);
    for (const channel of ws.channels) members.get(channel)?.delete(id);
  });
  ws.on('error', () => {});
});

function reply(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    if (req.url === '/readyz') return reply(res, 200, {});
    let p;
    try {
      p = JSON.parse(Buffer.concat(chunks).toString());
    } catch {
      return reply(res, 400, { error: 'invalid json' });
    }
    try {
      switch (req.url) {
        case '/api/bind_uid':
          await command('bind_uid', p.client_id, String(p.uid));
          break;
        case '/api/join_group':
          await command('join_group', p.client_id, String(p.group));
          break;
        case '/api/send_to_uid':
          await pub.publish(P + 'uid:' + p.uid, p.data);
          break;
        case '/api/send_to_group':
          await pub.publish(P + 'group:' + p.group, p.data);
          break;
        case '/api/send_to_all':
          await pub.publish(P + 'all', p.data);
          break;
        default:
          return reply(res, 404, { error: 'unknown method' });
      }
      reply(res, 200, { result: null });
    } catch (e) {
      reply(res, 503, { error: String(e) });
    }
  });
}).listen(Number(apiPort), '127.0.0.1');
