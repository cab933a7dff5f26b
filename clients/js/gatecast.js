/*! gatecast.js: browser client for the gatecast push gateway (docs/client.md). MIT. */

const PING = '{"type":"ping"}';
const PONG = '{"type":"pong"}';
// A server-asked delay longer than this is treated as this (a bad value
// must not park a page for days).
const MAX_SERVER_DELAY = 600000;

/**
 * Delay before reconnect attempt `attempt` (0 for the first after a
 * failure): uniformly random between `min` and min(max, min * 2^(attempt+1)),
 * so clients dropped together spread out, and never below `min`.
 */
export function backoff(attempt, min, max, random = Math.random) {
  const cap = Math.max(min, Math.min(max, min * 2 ** (attempt + 1)));
  return Math.round(min + random() * (cap - min));
}

/**
 * The server's close reason when it is the JSON `{"reason":..,"retry_ms":N}`
 * operational closes carry, as `{reason, retryMs}`; otherwise null.
 */
export function closeReason(text) {
  if (typeof text !== 'string' || text[0] !== '{') return null;
  const j = json(text);
  if (!j || typeof j !== 'object') return null;
  const ms = j.retry_ms;
  return {
    reason: typeof j.reason === 'string' ? j.reason : '',
    retryMs: Number.isFinite(ms) && ms >= 0 ? Math.min(ms, MAX_SERVER_DELAY) : undefined,
  };
}

/**
 * Splits a frame of a recovery connection (docs/recovery.md): a text frame
 * without `\n` is a control frame `{control}`; otherwise `{header, data}`,
 * `data` being the payload exactly as pushed (a string, or an ArrayBuffer).
 */
export function splitFrame(data) {
  if (typeof data === 'string') {
    const i = data.indexOf('\n');
    return i < 0 ? { control: json(data) } : { header: json(data.slice(0, i)), data: data.slice(i + 1) };
  }
  const bytes = new Uint8Array(data);
  const i = bytes.indexOf(10);
  if (i < 0) return { header: null, data };
  return { header: json(new TextDecoder().decode(bytes.subarray(0, i))), data: bytes.slice(i + 1).buffer };
}

/**
 * Records a push's position ({stream: [epoch, offset]}) in `seen`, the
 * pushes received, and in `pos`, where to resume from (by default the
 * same map); false when the push was already seen (same epoch, offset not
 * past the last one received).
 */
export function track(pos, h, seen = pos) {
  if (!h || typeof h.s !== 'string' || typeof h.o !== 'number') return true;
  const p = seen[h.s];
  if (p && p[0] === h.e && h.o <= p[1]) return false;
  seen[h.s] = [h.e, h.o];
  if (seen !== pos) place(pos, h.s, h.e, h.o);
  return true;
}

/**
 * Keeps `[epoch, offset]` as the position of `stream` in `pos`, unless it
 * would move it back within its epoch: a `position` frame (docs/recovery.md)
 * may arrive after a live push it was read before. True when it changed.
 */
export function place(pos, stream, epoch, offset) {
  if (typeof stream !== 'string' || typeof epoch !== 'string' || !Number.isInteger(offset) || offset < 0) return false;
  const p = pos[stream];
  if (p && p[0] === epoch && offset <= p[1]) return false;
  pos[stream] = [epoch, offset];
  return true;
}

/** The `pos=` query value: URL-safe base64 (no padding) of the JSON positions. */
export function encodePos(pos) {
  let s = '';
  for (const b of new TextEncoder().encode(JSON.stringify(pos))) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** True when the JWT's `exp` is within `margin` ms of `now` (or past it). */
export function tokenExpired(token, now = Date.now(), margin = 5000) {
  const part = typeof token === 'string' && token.split('.')[1];
  const claims = part && json(atobSafe(part.replace(/-/g, '+').replace(/_/g, '/')));
  return !!claims && typeof claims.exp === 'number' && claims.exp * 1000 <= now + margin;
}

function json(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function atobSafe(s) {
  try {
    return atob(s);
  } catch {
    return '';
  }
}

// `f()`'s result, or a rejection after `ms`: a getToken that never answers
// must not stall the client.
function bounded(f, ms) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('timed out')), ms);
    Promise.resolve()
      .then(f)
      .then(resolve, reject)
      .finally(() => clearTimeout(t));
  });
}

function validPositions(pos) {
  if (!pos || typeof pos !== 'object' || Array.isArray(pos)) return {};
  const out = {};
  for (const [k, v] of Object.entries(pos)) {
    if (Array.isArray(v) && typeof v[0] === 'string' && Number.isInteger(v[1]) && v[1] >= 0) out[k] = [v[0], v[1]];
  }
  return out;
}

/**
 * Opens a client that stays connected to gatecast until `close()`:
 * see docs/client.md for the options and events.
 */
export function connect(url, options = {}) {
  const o = {
    minDelay: 500,
    maxDelay: 20000,
    resetAfter: 10000,
    pingInterval: 25000,
    pongTimeout: 10000,
    connectTimeout: 10000,
    random: Math.random,
    ...options,
  };
  const WS = o.WebSocket || globalThis.WebSocket;
  const win = 'window' in o ? o.window : globalThis.window;
  const doc = win && win.document;
  const recover = !!o.recover;
  let store = null;
  if (recover) {
    try {
      store = 'storage' in o ? o.storage : globalThis.sessionStorage;
    } catch {
      // Storage can be forbidden (sandboxed frames): recover in memory only.
    }
  }
  const key = o.storageKey || 'gatecast:' + (typeof url === 'string' ? url.split('?')[0] : '');
  const handlers = {};
  let token = o.token;
  let needToken = false;
  let ws = null;
  let c = null; // the current connection's bookkeeping
  let state = '';
  let clientId = null;
  let attempt = 0;
  let timer = null;
  let serverDelay = false;
  let stopped = false;
  let gen = 0;
  let saved = load();
  // Positions of the pushes received (saved.pos also holds positions the
  // server told): a push is dropped as a duplicate only against these.
  const seen = { ...saved.pos };

  function load() {
    const v = store && json(store.getItem(key));
    return { resume: v && typeof v.resume === 'string' ? v.resume : undefined, pos: validPositions(v && v.pos) };
  }
  function persist() {
    try {
      if (store) store.setItem(key, JSON.stringify(saved));
    } catch {
      // Full or forbidden: recovery still works within this page.
    }
  }

  function emit(event, ...args) {
    for (const f of (handlers[event] || []).slice()) {
      try {
        f(...args);
      } catch (e) {
        // A failing handler must not break the connection: report it apart.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
  function setState(s, info) {
    state = s;
    emit('state', { state: s, ...info });
  }

  async function open() {
    timer = null;
    serverDelay = false;
    const my = ++gen;
    if (stopped) return;
    setState('connecting', { attempt });
    if (o.getToken && (needToken || !token || tokenExpired(token))) {
      try {
        token = await bounded(o.getToken, o.connectTimeout);
        needToken = false;
      } catch (e) {
        if (my === gen && !stopped) retry({ code: 0, reason: 'getToken failed: ' + e });
        return;
      }
      if (my !== gen || stopped) return;
    }
    const conn = { opened: false, welcomed: false, framed: false, resuming: false, fresh: new Set() };
    let sock;
    try {
      // A bad URL (or a url() that throws) is a failed attempt, not a stuck client.
      const u = new URL(typeof url === 'function' ? url() : url, globalThis.location && location.href);
      u.protocol = u.protocol.replace(/^http/, 'ws');
      const q = u.searchParams;
      if (token) q.set('token', token);
      if (recover) {
        q.set('recover', '1');
        if (saved.resume) q.set('resume', saved.resume);
        conn.resuming = !!saved.resume || Object.keys(saved.pos).length > 0;
        if (Object.keys(saved.pos).length) q.set('pos', encodePos(saved.pos));
      }
      sock = new WS(u.href);
    } catch (e) {
      retry({ code: 0, reason: String(e) });
      return;
    }
    sock.binaryType = 'arraybuffer';
    ws = sock;
    c = conn;
    conn.welcomeTimer = setTimeout(() => drop(conn, 1006, 'connect timeout'), o.connectTimeout);
    sock.onopen = () => {
      conn.opened = true;
    };
    sock.onmessage = (ev) => {
      if (ws === sock) received(conn, ev.data);
    };
    sock.onclose = (ev) => {
      if (ws === sock) ended(conn, ev.code, ev.reason);
    };
  }

  function received(conn, data) {
    clearTimeout(conn.pongTimer);
    conn.pongTimer = null;
    if (!conn.welcomed) return welcomed(conn, data);
    if (!conn.framed) {
      if (data !== PONG) emit('message', data);
      return;
    }
    const f = splitFrame(data);
    if (f.control) {
      const k = f.control;
      if (k.type === 'recovered') recovered(conn, k.streams || {});
      // Where the connection stands in a stream it holds no position in:
      // kept so that the next resume names the stream.
      if (k.type === 'position' && place(saved.pos, k.s, k.e, k.o)) {
        conn.fresh.add(k.s);
        persist();
      }
      return;
    }
    const h = f.header;
    if (!track(saved.pos, h, seen)) return;
    if (h && h.s) {
      conn.fresh.add(h.s);
      persist();
    }
    emit('message', f.data, h && h.s ? { stream: h.s, epoch: h.e, offset: h.o } : undefined);
  }

  function welcomed(conn, data) {
    const w = typeof data === 'string' ? json(data) : null;
    const id = (w && w.client_id) || (String(data).match(/[0-9a-f]{20}/) || [])[0] || null;
    conn.welcomed = true;
    clearTimeout(conn.welcomeTimer);
    conn.stableTimer = setTimeout(() => (attempt = 0), o.resetAfter);
    conn.pingTimer = setInterval(() => ping(conn), o.pingInterval);
    if (recover && w && typeof w.resume === 'string') {
      conn.framed = true;
      conn.resumed = w.resumed;
      saved.resume = w.resume;
      persist();
    }
    if (id !== clientId) {
      clientId = id;
      emit('clientId', id);
    }
    setState('connected', { clientId: id });
    if (conn.resuming && !conn.framed) {
      // A server without recovery: nothing of the saved state comes back.
      // (One with it always ends a resume with its own `recovered`.)
      recovered(conn, Object.fromEntries(Object.keys(saved.pos).map((s) => [s, false])), false);
    }
  }

  function recovered(conn, streams, resumed = conn.resumed) {
    const lost = Object.keys(streams).filter((s) => !streams[s]);
    // A lost stream's old position is worthless; its next push, or the
    // position the server told on this connection, starts it again.
    for (const s of lost) {
      if (!conn.fresh.has(s)) delete saved.pos[s];
      delete seen[s];
    }
    persist();
    emit('recovered', { resumed, streams });
    if (resumed === false || lost.length) emit('discontinuity', { resumed, streams: lost });
  }

  function ping(conn) {
    if (ws && conn === c && conn.welcomed) {
      ws.send(PING);
      conn.pongTimer = conn.pongTimer || setTimeout(() => drop(conn, 1006, 'no pong'), o.pongTimeout);
    }
  }

  // Gives up on a connection that went silent without waiting for the
  // browser to notice (that can take minutes on a dead network).
  function drop(conn, code, reason) {
    if (conn !== c || !ws) return;
    const sock = ws;
    sock.onmessage = sock.onclose = null;
    try {
      sock.close(4000, reason);
    } catch {
      // Already closing.
    }
    ended(conn, code, reason);
  }

  function ended(conn, code, reason) {
    for (const t of ['welcomeTimer', 'stableTimer', 'pongTimer']) clearTimeout(conn[t]);
    clearInterval(conn.pingTimer);
    ws = null;
    c = null;
    if (stopped) return;
    const info = { code, reason };
    if (!conn.opened) {
      // The handshake failed: node down, or refused (a 401 is hidden from
      // JavaScript). A fresh token first, in case it was the token.
      needToken = true;
      return retry(info);
    }
    if (code === 1000 && reason === 'closed by server') return finish(info);
    if (code === 4001 || code === 1008) {
      if (!o.getToken) return finish(info);
      needToken = true;
      return retry(info, code === 4001 ? Math.round(o.random() * o.minDelay) : undefined);
    }
    const asked = closeReason(reason);
    if (asked && asked.retryMs !== undefined) {
      attempt = 0;
      serverDelay = true;
      return retry({ ...info, ...asked }, asked.retryMs + Math.round(o.random() * o.minDelay));
    }
    retry(info);
  }

  function retry(info, delay) {
    ws = null;
    if (delay === undefined) delay = backoff(attempt++, o.minDelay, o.maxDelay, o.random);
    setState('disconnected', { ...info, delay });
    clearTimeout(timer);
    timer = setTimeout(open, delay);
  }

  function finish(info) {
    stopped = true;
    clearTimeout(timer);
    if (win) win.removeEventListener('online', wake);
    if (doc) doc.removeEventListener('visibilitychange', visible);
    setState('closed', info);
  }

  // The network is back or the page is shown again: reconnect now instead
  // of waiting out the backoff (not a delay the server asked for), with the
  // backoff started afresh, or check that the connection still lives.
  function wake() {
    if (stopped) return;
    if (timer && !serverDelay) {
      clearTimeout(timer);
      attempt = 0;
      open();
    } else if (c && c.welcomed) {
      ping(c);
    }
  }
  function visible() {
    if (doc.visibilityState === 'visible') wake();
  }
  function off(event, f) {
    handlers[event] = (handlers[event] || []).filter((g) => g !== f);
  }
  if (win) win.addEventListener('online', wake);
  if (doc) doc.addEventListener('visibilitychange', visible);

  Promise.resolve().then(open);

  return {
    get clientId() {
      return clientId;
    },
    get state() {
      return state;
    },
    on(event, f) {
      (handlers[event] = handlers[event] || []).push(f);
      return () => off(event, f);
    },
    off,
    send(data) {
      if (!ws || !c || !c.welcomed) return false;
      ws.send(data);
      return true;
    },
    close() {
      if (stopped) return;
      stopped = true;
      gen++;
      const sock = ws;
      if (sock && c) {
        sock.onmessage = sock.onclose = null;
        ended(c, 1000, 'closed by client');
        sock.close(1000);
      }
      finish({ code: 1000, reason: 'closed by client' });
    },
  };
}
