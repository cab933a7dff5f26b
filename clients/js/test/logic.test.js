// Unit tests of gatecast.js's logic with a fake WebSocket and mocked timers
// (the browser tests, tests/browser.rs, run it against real nodes).
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { backoff, closeReason, splitFrame, track, place, encodePos, tokenExpired, connect } from '../gatecast.js';

class FakeWS {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    FakeWS.all.push(this);
  }
  send(d) {
    this.sent.push(d);
  }
  close(code, reason) {
    this.closedWith = [code, reason];
  }
  open() {
    this.onopen && this.onopen({});
  }
  msg(data) {
    this.onmessage && this.onmessage({ data });
  }
  shut(code, reason = '') {
    this.onclose && this.onclose({ code, reason });
  }
  welcome(id, extra = {}) {
    this.open();
    this.msg(JSON.stringify({ type: 'welcome', client_id: id, ...extra }));
  }
}

class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(k) {
    return this.items.has(k) ? this.items.get(k) : null;
  }
  setItem(k, v) {
    this.items.set(k, String(v));
  }
}

const ID1 = '7f00000122b800000001';
const ID2 = '7f00000122b800000002';
const flush = () => new Promise((r) => setImmediate(r));
const last = () => FakeWS.all[FakeWS.all.length - 1];

beforeEach(() => {
  FakeWS.all = [];
  mock.timers.enable({ apis: ['setTimeout', 'setInterval'] });
});
afterEach(() => mock.timers.reset());

function client(opts = {}) {
  const states = [];
  const messages = [];
  const c = connect('ws://gw.test/ws', { WebSocket: FakeWS, window: null, random: () => 0.5, ...opts });
  c.on('state', (s) => states.push(s));
  c.on('message', (d, p) => messages.push(p ? [d, p] : d));
  return { c, states, messages };
}

test('backoff stays between min and min(max, min * 2^(attempt+1)), and reaches max', () => {
  for (let a = 0; a < 40; a++) {
    const cap = Math.min(20000, 500 * 2 ** (a + 1));
    assert.equal(backoff(a, 500, 20000, () => 0), 500);
    const hi = backoff(a, 500, 20000, () => 0.999999);
    assert.ok(hi <= cap && hi >= cap - 1, `attempt ${a}: ${hi} vs ${cap}`);
  }
  assert.equal(backoff(1000, 500, 20000, () => 1), 20000);
  // Jitter: different random numbers give different delays.
  assert.notEqual(backoff(3, 500, 20000, () => 0.1), backoff(3, 500, 20000, () => 0.9));
});

test('close reasons: the JSON of operational closes, nothing else', () => {
  assert.deepEqual(closeReason('{"reason":"drain","retry_ms":1834}'), { reason: 'drain', retryMs: 1834 });
  assert.deepEqual(closeReason('{"reason":"overload"}'), { reason: 'overload', retryMs: undefined });
  assert.equal(closeReason('server shutting down'), null);
  assert.equal(closeReason('{not json'), null);
  assert.equal(closeReason(''), null);
  assert.equal(closeReason(undefined), null);
  assert.equal(closeReason('{"retry_ms":-5}').retryMs, undefined);
  assert.equal(closeReason('{"retry_ms":"5"}').retryMs, undefined);
  assert.equal(closeReason('{"retry_ms":1e12}').retryMs, 600000);
});

test('recovery frames: control frames, headers, exact payloads', () => {
  assert.deepEqual(splitFrame('{"type":"pong"}'), { control: { type: 'pong' } });
  assert.deepEqual(splitFrame('{"s":"g:r","e":"ab","o":3}\nhello\nworld'), {
    header: { s: 'g:r', e: 'ab', o: 3 },
    data: 'hello\nworld',
  });
  assert.deepEqual(splitFrame('{}\n'), { header: {}, data: '' });
  const payload = [0, 10, 255, 10, 1];
  const frame = new Uint8Array([...new TextEncoder().encode('{"s":"all","e":"x","o":1}\n'), ...payload]);
  const f = splitFrame(frame.buffer);
  assert.deepEqual(f.header, { s: 'all', e: 'x', o: 1 });
  assert.ok(f.data instanceof ArrayBuffer);
  assert.deepEqual([...new Uint8Array(f.data)], payload);
});

test('positions: duplicates dropped, epochs restart a stream', () => {
  const pos = {};
  assert.ok(track(pos, { s: 'g:r', e: 'a', o: 1 }));
  assert.ok(track(pos, { s: 'g:r', e: 'a', o: 2 }));
  assert.ok(!track(pos, { s: 'g:r', e: 'a', o: 2 }));
  assert.ok(!track(pos, { s: 'g:r', e: 'a', o: 1 }));
  assert.ok(track(pos, { s: 'g:r', e: 'b', o: 1 }));
  assert.ok(track(pos, {}));
  assert.ok(track(pos, null));
  assert.deepEqual(pos, { 'g:r': ['b', 1] });
});

test('pos= is URL-safe base64 without padding of the JSON, UTF-8 names included', () => {
  const pos = { 'u:élodie': ['b3f1', 42], 'g:room?1': ['9d', 7] };
  const s = encodePos(pos);
  assert.match(s, /^[A-Za-z0-9_-]+$/);
  assert.deepEqual(JSON.parse(Buffer.from(s, 'base64url').toString('utf8')), pos);
});

test('token expiry is read from the JWT exp', () => {
  const jwt = (claims) => 'h.' + Buffer.from(JSON.stringify(claims)).toString('base64url') + '.sig';
  const now = 1_700_000_000_000;
  assert.ok(tokenExpired(jwt({ exp: now / 1000 - 1 }), now));
  assert.ok(tokenExpired(jwt({ exp: now / 1000 + 2 }), now)); // within the margin
  assert.ok(!tokenExpired(jwt({ exp: now / 1000 + 60 }), now));
  assert.ok(!tokenExpired(jwt({ sub: 'x' }), now));
  assert.ok(!tokenExpired('not a jwt', now));
});

test('welcome, messages (text and exact binary), pongs filtered, clientId event', async () => {
  const { c, states, messages } = client();
  const ids = [];
  c.on('clientId', (id) => ids.push(id));
  await flush();
  assert.equal(states[0].state, 'connecting');
  last().welcome(ID1);
  assert.equal(c.clientId, ID1);
  assert.deepEqual(ids, [ID1]);
  assert.equal(c.state, 'connected');
  last().msg('hello');
  last().msg('{"type":"pong"}');
  const bytes = new Uint8Array([1, 2, 10, 0]).buffer;
  last().msg(bytes);
  assert.deepEqual(messages, ['hello', bytes]);
  assert.ok(c.send('up'));
  assert.deepEqual(last().sent, ['up']);
});

test('a lost connection reconnects after a backoff that grows, then resets once a connection lived', async () => {
  const { states } = client({ resetAfter: 10000 });
  await flush();
  last().welcome(ID1);
  const delays = [];
  for (let i = 0; i < 8; i++) {
    last().shut(1006);
    const s = states[states.length - 1];
    assert.equal(s.state, 'disconnected');
    assert.equal(s.code, 1006);
    delays.push(s.delay);
    const before = FakeWS.all.length;
    mock.timers.tick(s.delay - 1);
    assert.equal(FakeWS.all.length, before, 'no attempt before the delay');
    mock.timers.tick(1);
    await flush();
    assert.equal(FakeWS.all.length, before + 1, 'an attempt once the delay passed');
    last().open(); // opened, never welcomed long enough to reset
    last().msg(JSON.stringify({ type: 'welcome', client_id: ID2 }));
  }
  // random() = 0.5: the middle of [500, cap].
  assert.deepEqual(delays, [750, 1250, 2250, 4250, 8250, 10250, 10250, 10250]);
  mock.timers.tick(10000); // this connection lived resetAfter
  last().shut(1006);
  assert.equal(states[states.length - 1].delay, 750);
});

test('the server asks for a delay in its close reason: it is honoured (plus a small jitter)', async () => {
  const { states } = client();
  await flush();
  last().welcome(ID1);
  last().shut(1001, '{"reason":"drain","retry_ms":7000}');
  const s = states[states.length - 1];
  assert.equal(s.delay, 7250);
  assert.equal(s.retryMs, 7000);
  assert.equal(s.reason, 'drain');
});

test('4001 without getToken stays closed; with getToken a fresh token is used', async () => {
  const a = client({ token: 'old' });
  await flush();
  last().welcome(ID1);
  last().shut(4001, 'token expired');
  assert.equal(a.c.state, 'closed');
  assert.equal(a.states[a.states.length - 1].code, 4001);
  mock.timers.tick(60000);
  assert.equal(FakeWS.all.length, 1, 'no blind retry');

  let n = 0;
  const b = client({ token: 'old', getToken: async () => 'fresh' + ++n });
  await flush();
  assert.equal(last().url.searchParams.get('token'), 'old');
  last().welcome(ID1);
  last().shut(4001, 'token expired');
  mock.timers.tick(b.states[b.states.length - 1].delay);
  await flush();
  assert.equal(last().url.searchParams.get('token'), 'fresh1');
});

test('a failed handshake (a 401 is invisible to JavaScript) fetches a fresh token before retrying', async () => {
  let n = 0;
  const { states } = client({ token: 'refused', getToken: () => 'fresh' + ++n });
  await flush();
  last().shut(1006); // never opened
  mock.timers.tick(states[states.length - 1].delay);
  await flush();
  assert.equal(last().url.searchParams.get('token'), 'fresh1');
  // An open connection lost for other reasons keeps its token.
  last().welcome(ID1);
  last().shut(1006);
  mock.timers.tick(states[states.length - 1].delay);
  await flush();
  assert.equal(last().url.searchParams.get('token'), 'fresh1');
});

test('an expired token is replaced before connecting', async () => {
  const expired = 'h.' + Buffer.from(JSON.stringify({ exp: 1 })).toString('base64url') + '.s';
  client({ token: expired, getToken: () => 'new' });
  await flush();
  await flush();
  assert.equal(last().url.searchParams.get('token'), 'new');
});

test('close_client (1000 "closed by server") and close() stop for good', async () => {
  const { c } = client();
  await flush();
  last().welcome(ID1);
  last().shut(1000, 'closed by server');
  assert.equal(c.state, 'closed');
  const d = client();
  await flush();
  last().welcome(ID1);
  d.c.close();
  assert.equal(d.c.state, 'closed');
  assert.deepEqual(last().closedWith, [1000, undefined]);
  mock.timers.tick(60000);
  assert.equal(FakeWS.all.length, 2);
});

test('keepalive: a ping every interval; no frame within the bound replaces the connection', async () => {
  const { states } = client({ pingInterval: 1000, pongTimeout: 500 });
  await flush();
  last().welcome(ID1);
  mock.timers.tick(1000);
  assert.deepEqual(last().sent, ['{"type":"ping"}']);
  last().msg('{"type":"pong"}');
  mock.timers.tick(1000);
  assert.equal(last().sent.length, 2);
  mock.timers.tick(500); // no pong
  const s = states[states.length - 1];
  assert.equal(s.state, 'disconnected');
  assert.equal(s.reason, 'no pong');
  mock.timers.tick(s.delay);
  await flush();
  assert.equal(FakeWS.all.length, 2);
});

test('an attempt with no welcome within connectTimeout is abandoned', async () => {
  const { states } = client({ connectTimeout: 3000 });
  await flush();
  mock.timers.tick(3000);
  assert.equal(states[states.length - 1].reason, 'connect timeout');
});

test('online and visibilitychange reconnect at once instead of waiting out the backoff', async () => {
  const win = new EventTarget();
  win.document = new EventTarget();
  win.document.visibilityState = 'hidden';
  const { states } = client({ window: win });
  await flush();
  last().shut(1006);
  assert.equal(states[states.length - 1].state, 'disconnected');
  mock.timers.tick(states[states.length - 1].delay);
  await flush();
  last().shut(1006);
  assert.equal(states[states.length - 1].delay, 1250, 'the backoff grew');
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(FakeWS.all.length, 3, 'online: an attempt at once');
  last().shut(1006);
  assert.equal(states[states.length - 1].delay, 750, 'online started the backoff afresh');
  win.document.dispatchEvent(new Event('visibilitychange')); // still hidden
  await flush();
  assert.equal(FakeWS.all.length, 3);
  win.document.visibilityState = 'visible';
  win.document.dispatchEvent(new Event('visibilitychange'));
  await flush();
  assert.equal(FakeWS.all.length, 4, 'shown: an attempt at once');
  // A delay the server asked for is not cut short.
  last().welcome(ID1);
  last().shut(1001, '{"reason":"drain","retry_ms":5000}');
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(FakeWS.all.length, 4);
  // While connected, online checks the connection with a ping.
  mock.timers.tick(5250);
  await flush();
  last().welcome(ID2);
  win.dispatchEvent(new Event('online'));
  assert.deepEqual(last().sent, ['{"type":"ping"}']);
});

test('recovery: positions and token kept in storage, resumed with them, duplicates dropped', async () => {
  const storage = new MemoryStorage();
  const { c, messages } = client({ recover: true, storage });
  const events = [];
  c.on('recovered', (e) => events.push(['recovered', e]));
  c.on('discontinuity', (e) => events.push(['discontinuity', e]));
  await flush();
  assert.equal(last().url.searchParams.get('recover'), '1');
  assert.equal(last().url.searchParams.get('resume'), null);
  last().welcome(ID1, { resume: 'tok1' });
  last().msg('{"s":"g:r","e":"E","o":1}\none');
  last().msg('{}\ndirect');
  last().msg('{"type":"pong"}');
  assert.deepEqual(messages, [['one', { stream: 'g:r', epoch: 'E', offset: 1 }], 'direct']);
  assert.deepEqual(JSON.parse(storage.getItem('gatecast:ws://gw.test/ws')), { resume: 'tok1', pos: { 'g:r': ['E', 1] } });
  assert.deepEqual(events, [], 'nothing to recover on a first connection');

  // A reload: a new client on the same storage.
  c.close();
  const again = client({ recover: true, storage });
  const ev2 = [];
  again.c.on('recovered', (e) => ev2.push(['recovered', e]));
  again.c.on('discontinuity', (e) => ev2.push(['discontinuity', e]));
  await flush();
  const q = last().url.searchParams;
  assert.equal(q.get('resume'), 'tok1');
  assert.deepEqual(JSON.parse(Buffer.from(q.get('pos'), 'base64url')), { 'g:r': ['E', 1] });
  last().welcome(ID2, { resume: 'tok2', resumed: true });
  last().msg('{"s":"g:r","e":"E","o":1}\none'); // already seen
  last().msg('{"s":"g:r","e":"E","o":2}\ntwo');
  last().msg('{"type":"recovered","streams":{"g:r":true}}');
  assert.deepEqual(again.messages, [['two', { stream: 'g:r', epoch: 'E', offset: 2 }]]);
  assert.deepEqual(ev2, [['recovered', { resumed: true, streams: { 'g:r': true } }]]);
  assert.equal(JSON.parse(storage.getItem('gatecast:ws://gw.test/ws')).resume, 'tok2');
});

test('positions told by the server: kept, never moved back within an epoch, never a reason to drop a push', () => {
  const pos = {};
  const seen = {};
  assert.ok(place(pos, 'u:a', 'E', 4));
  assert.ok(!place(pos, 'u:a', 'E', 3), 'not back within the epoch');
  assert.ok(place(pos, 'u:a', 'F', 1), 'a new epoch replaces it');
  assert.ok(!place(pos, 'u:a', 'F', -1) && !place(pos, 7, 'F', 2) && !place(pos, 'u:a', null, 2));
  assert.deepEqual(pos, { 'u:a': ['F', 1] });
  // A push below the told position is new to this page: kept, and the
  // position stays where it was told.
  assert.ok(track(pos, { s: 'u:a', e: 'F', o: 1 }, seen));
  assert.ok(!track(pos, { s: 'u:a', e: 'F', o: 1 }, seen), 'a push seen twice is dropped');
  assert.ok(track(pos, { s: 'u:a', e: 'F', o: 2 }, seen));
  assert.deepEqual(pos, { 'u:a': ['F', 2] });
  assert.deepEqual(seen, { 'u:a': ['F', 2] });
});

test('recovery: a position frame is kept, sent on resume, and survives its stream said not recovered', async () => {
  const storage = new MemoryStorage();
  const { c, messages } = client({ recover: true, storage, storageKey: 'k' });
  const events = [];
  c.on('recovered', (e) => events.push(['recovered', e]));
  c.on('discontinuity', (e) => events.push(['discontinuity', e]));
  await flush();
  last().welcome(ID1, { resume: 't1' });
  // Bound to u:a, whose history is at 5: told so.
  last().msg('{"type":"position","s":"u:a","e":"E","o":5}');
  // A live push read before the position was told still comes through.
  last().msg('{"s":"u:a","e":"E","o":5}\nfive');
  assert.deepEqual(messages, [['five', { stream: 'u:a', epoch: 'E', offset: 5 }]]);
  assert.deepEqual(JSON.parse(storage.getItem('k')).pos, { 'u:a': ['E', 5] });
  last().shut(1006);
  mock.timers.tick(10000);
  await flush();
  assert.deepEqual(JSON.parse(Buffer.from(last().url.searchParams.get('pos'), 'base64url')), { 'u:a': ['E', 5] });
  last().welcome(ID2, { resume: 't2', resumed: true });
  last().msg('{"s":"u:a","e":"E","o":6}\nsix');
  // g:b keeps history but was never named: told where it stands, and not recovered.
  last().msg('{"type":"position","s":"g:b","e":"G","o":9}');
  last().msg('{"type":"recovered","streams":{"u:a":true,"g:b":false}}');
  assert.deepEqual(events, [
    ['recovered', { resumed: true, streams: { 'u:a': true, 'g:b': false } }],
    ['discontinuity', { resumed: true, streams: ['g:b'] }],
  ]);
  assert.deepEqual(JSON.parse(storage.getItem('k')).pos, { 'u:a': ['E', 6], 'g:b': ['G', 9] });
});

test('recovery: a resume with a token and no positions hears only the server\'s recovered', async () => {
  const storage = new MemoryStorage();
  storage.setItem('k', JSON.stringify({ resume: 't' }));
  const { c } = client({ recover: true, storage, storageKey: 'k' });
  const events = [];
  c.on('recovered', (e) => events.push(e));
  await flush();
  assert.equal(last().url.searchParams.get('pos'), null);
  last().welcome(ID1, { resume: 't2', resumed: true });
  assert.deepEqual(events, []);
  last().msg('{"type":"recovered","streams":{}}');
  assert.deepEqual(events, [{ resumed: true, streams: {} }]);
});

test('recovery: a stream not recovered, or resumed:false, is a discontinuity', async () => {
  const storage = new MemoryStorage();
  storage.setItem('k', JSON.stringify({ resume: 't', pos: { 'g:a': ['E', 3], 'g:b': ['E', 4], bad: 'x' } }));
  const { c } = client({ recover: true, storage, storageKey: 'k' });
  const events = [];
  c.on('discontinuity', (e) => events.push(e));
  await flush();
  assert.deepEqual(JSON.parse(Buffer.from(last().url.searchParams.get('pos'), 'base64url')), {
    'g:a': ['E', 3],
    'g:b': ['E', 4],
  });
  last().welcome(ID1, { resume: 't2', resumed: false });
  last().msg('{"type":"recovered","streams":{"g:a":true,"g:b":false}}');
  assert.deepEqual(events, [{ resumed: false, streams: ['g:b'] }]);
  assert.deepEqual(JSON.parse(storage.getItem('k')).pos, { 'g:a': ['E', 3] });
});

test('recovery against a server that does not speak it: plain frames, and a discontinuity for saved state', async () => {
  const storage = new MemoryStorage();
  storage.setItem('k', JSON.stringify({ resume: 't', pos: { 'g:a': ['E', 3] } }));
  const { c, messages } = client({ recover: true, storage, storageKey: 'k' });
  const events = [];
  c.on('discontinuity', (e) => events.push(e));
  await flush();
  last().welcome(ID1);
  last().msg('plain\ntext');
  assert.deepEqual(messages, ['plain\ntext']);
  assert.deepEqual(events, [{ resumed: false, streams: ['g:a'] }]);
});

test('a getToken that never answers counts as a failed attempt after connectTimeout', async () => {
  let calls = 0;
  const { states } = client({ connectTimeout: 2000, getToken: () => (calls++, new Promise(() => {})) });
  await flush();
  assert.equal(calls, 1);
  mock.timers.tick(2000);
  await flush();
  const s = states[states.length - 1];
  assert.equal(s.state, 'disconnected');
  assert.match(s.reason, /getToken failed/);
  mock.timers.tick(s.delay);
  await flush();
  assert.equal(calls, 2);
  assert.equal(FakeWS.all.length, 0);
});

test('on() returns its own remover; off() removes a handler', async () => {
  const { c } = client();
  const seen = [];
  const { on, off } = c;
  const stop = on('message', (d) => seen.push('a' + d));
  const b = (d) => seen.push('b' + d);
  on('message', b);
  await flush();
  last().welcome(ID1);
  last().msg('1');
  stop();
  last().msg('2');
  off('message', b);
  last().msg('3');
  assert.deepEqual(seen, ['a1', 'b1', 'b2']);
});

test('a handler that throws does not stop the others nor the client', async () => {
  const { c, messages } = client();
  c.on('message', () => {
    throw new Error('app bug');
  });
  await flush();
  last().welcome(ID1);
  last().msg('1');
  last().msg('2');
  assert.deepEqual(messages, ['1', '2']);
  assert.equal(c.state, 'connected');
});

test('a URL that cannot be used is a failed attempt with a reason, then backoff', async () => {
  let n = 0;
  const bad = connect(() => (n++ === 0 ? 'not a url' : 'ws://gw.test/ws'), { WebSocket: FakeWS, window: null, random: () => 0.5 });
  const seen = [];
  bad.on('state', (s) => seen.push(s));
  await flush();
  assert.equal(seen[1].state, 'disconnected');
  assert.match(seen[1].reason, /URL/i);
  mock.timers.tick(seen[1].delay);
  await flush();
  assert.equal(FakeWS.all.length, 1);
  assert.equal(last().url.href, 'ws://gw.test/ws');
});
