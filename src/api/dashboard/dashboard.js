// gatecast dashboard (docs/dashboard.md). Plain JS, no build step, nothing
// loaded from elsewhere. The API key is asked once and kept in this tab's
// sessionStorage; it travels only in the Authorization header, never in a
// URL. Everything shown from the server goes through textContent.
'use strict';

const KEY = 'gatecast.dashboard.apiKey';
const REFRESH_MS = 2000;
const TAIL_ROWS = 200;

const $ = (id) => document.getElementById(id);
const state = { overview: null, tail: [], tailState: 'idle', errors: 0 };
window.dashboard = state; // for the browser tests and the curious

function key() {
  return sessionStorage.getItem(KEY);
}

function headers(extra = {}) {
  const h = { ...extra };
  const k = key();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

class Unauthorized extends Error {}

/** Calls the API; returns `result`, or throws with the API's error message. */
async function call(path, { method = 'GET', body } = {}) {
  const res = await fetch(path, {
    method,
    headers: headers(body === undefined ? {} : { 'content-type': 'application/json' }),
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
    signal: AbortSignal.timeout(10000),
  });
  let json = null;
  try { json = await res.json(); } catch { /* not JSON */ }
  if (res.status === 401) throw new Unauthorized((json && json.error && json.error.message) || 'unauthorized');
  if (!res.ok) throw new Error((json && json.error && `${json.error.code}: ${json.error.message}`) || `HTTP ${res.status}`);
  return json ? json.result : null;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtUptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

const fmtRate = (r) => (r >= 100 ? r.toFixed(0) : r.toFixed(1));

function showKeyForm(message) {
  $('app').hidden = true;
  $('key-box').hidden = false;
  $('forget-key').hidden = true;
  $('key-error').textContent = message || '';
  $('key-input').focus();
}

function setStatus(text, bad) {
  $('status').textContent = text;
  $('status').className = bad ? 'bad' : 'muted';
}

// --- Cluster ---

function renderOverview(o) {
  state.overview = o;
  $('where').textContent = `node ${o.this_node} · ${o.engine} engine`;
  const t = o.totals;
  const cards = $('totals');
  cards.replaceChildren();
  for (const [label, value] of [
    ['nodes', t.nodes], ['ready', `${t.ready}/${t.nodes}`], ['connections', t.connections],
    ['pushes/s', fmtRate(t.pushes_per_sec)], ['deliveries/s', fmtRate(t.deliveries_per_sec)],
    ['memory', fmtBytes(t.memory_rss_bytes)],
  ]) {
    const c = el('div', null, 'card');
    c.append(el('b', value), el('span', label));
    cards.append(c);
  }
  const body = $('nodes').tBodies[0];
  body.replaceChildren();
  for (const n of o.nodes) {
    const tr = el('tr');
    tr.dataset.node = n.node;
    if (n.node === o.this_node) tr.className = 'self';
    const ready = n.draining ? 'draining' : n.ready ? 'ready' : 'not ready';
    const cells = [
      [n.node, 'mono'], [n.inner, 'mono'], [ready, n.ready ? 'ok' : 'bad'],
      [n.connections, 'connections'], [fmtRate(n.pushes_per_sec)], [fmtRate(n.deliveries_per_sec)],
      [n.redis_rtt_ms === null || n.redis_rtt_ms === undefined ? '–' : `${n.redis_rtt_ms.toFixed(1)} ms`],
      [fmtBytes(n.memory_rss_bytes)], [n.version], [fmtUptime(n.uptime_secs)], [n.api, 'mono'],
    ];
    for (const [text, cls] of cells) tr.append(el('td', text, cls));
    const act = el('td');
    if (!n.draining) {
      const b = el('button', 'Evacuate', 'danger');
      b.type = 'button';
      b.addEventListener('click', () => evacuate(n.node, n.node === o.this_node));
      act.append(b);
    }
    tr.append(act);
    body.append(tr);
  }
  $('without-stats').textContent = o.without_stats.length
    ? `Live without a stats record yet (older version, or just started): ${o.without_stats.join(', ')}`
    : '';
}

async function refresh() {
  try {
    renderOverview(await call('/api/dashboard/overview'));
    const self = state.overview.nodes.find((n) => n.node === state.overview.this_node);
    if (self && self.draining) evacuationState();
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
    state.errors = 0;
    return true;
  } catch (e) {
    if (e instanceof Unauthorized) {
      const hadKey = key() !== null;
      sessionStorage.removeItem(KEY);
      if (timer) clearInterval(timer);
      showKeyForm(hadKey ? `Refused: ${e.message}` : '');
      return false;
    }
    state.errors++;
    setStatus(`refresh failed: ${e.message}`, true);
    return true;
  }
}

let timer = null;
async function start() {
  if (timer) clearInterval(timer);
  if (!(await refresh())) return;
  $('key-box').hidden = true;
  $('app').hidden = false;
  $('forget-key').hidden = key() === null;
  // A hidden tab asks nothing; it catches up when shown.
  timer = setInterval(() => document.hidden || refresh(), REFRESH_MS);
  evacuationState();
}

// --- Look up ---

function dl(pairs) {
  const d = el('dl');
  for (const [k, v] of pairs) {
    d.append(el('dt', k));
    const dd = el('dd');
    if (v instanceof Node) dd.append(v); else dd.textContent = typeof v === 'string' ? v : JSON.stringify(v);
    d.append(dd);
  }
  return d;
}

function perNode(list) {
  return list.map((p) => `${p.node} (${p.inner}): ${p.count}`).join('\n') || 'none';
}

function clientBlock(c) {
  return dl([
    ['client_id', c.client_id], ['node', `${c.node} (${c.inner})`], ['online', String(c.online)],
    ['uid', c.uid === null ? '–' : c.uid], ['groups', c.groups.join(', ') || '–'],
    ['session', el('pre', JSON.stringify(c.session, null, 1))],
  ]);
}

async function lookup(ev) {
  ev.preventDefault();
  const kind = $('lookup-kind').value;
  const value = $('lookup-input').value.trim();
  const out = $('lookup-result');
  out.replaceChildren(el('p', 'looking up…', 'muted'));
  try {
    const r = await call(`/api/dashboard/${kind === 'client_id' ? 'client' : kind}?${new URLSearchParams({ [kind]: value })}`);
    out.replaceChildren();
    if (kind === 'client_id') {
      out.append(clientBlock(r));
    } else if (kind === 'uid') {
      out.append(dl([['uid', r.uid], ['connections', String(r.count)], ['per node', el('pre', perNode(r.per_node))]]));
      for (const c of r.clients) out.append(el('hr'), clientBlock(c));
      if (r.truncated) out.append(el('p', 'only the first connections are detailed', 'muted'));
    } else {
      out.append(dl([
        ['group', r.group], ['members', String(r.count)], ['per node', el('pre', perNode(r.per_node))],
        ['client_ids', el('pre', r.client_ids.join('\n') || 'none')],
        ['uids', `${r.uid_count}: ${r.uids.join(', ')}`],
      ]));
      if (r.truncated) out.append(el('p', 'lists cut at 500', 'muted'));
    }
  } catch (e) {
    if (e instanceof Unauthorized) return showKeyForm(`Refused: ${e.message}`);
    out.replaceChildren(el('p', e.message, 'error'));
  }
}

// --- Live tail (fetch streaming of text/event-stream: headers allowed) ---

let tailAbort = null;

function setTail(s, text, cls) {
  state.tailState = s;
  $('tail-state').textContent = text;
  $('tail-state').className = cls || 'muted';
  $('tail-start').disabled = s === 'watching' || s === 'starting';
  $('tail-stop').disabled = !(s === 'watching' || s === 'starting');
}

function addTailRow(e) {
  state.tail.push(e);
  if (state.tail.length > TAIL_ROWS) state.tail.shift();
  const body = $('tail-entries').tBodies[0];
  const tr = el('tr');
  const payload = (e.binary ? '[binary] ' : '') + e.preview + (e.truncated ? ' …' : '');
  tr.append(
    el('td', new Date(e.at_ms).toLocaleTimeString()),
    el('td', e.bytes),
    el('td', e.origin || '–', 'mono'),
    el('td', payload, 'wrap mono'),
  );
  body.prepend(tr);
  if (e.skipped) {
    const skip = el('tr');
    const td = el('td', `${e.skipped} skipped (sampled: the tail shows at most 50 a second)`, 'muted');
    td.colSpan = 4;
    skip.append(td);
    body.prepend(skip);
  }
  while (body.rows.length > TAIL_ROWS) body.deleteRow(-1);
}

function onEvent(kind, data) {
  if (kind === 'ready') setTail('watching', `watching ${data.target} (on node ${data.node})`, 'ok');
  else if (kind === 'push') addTailRow(data);
  else if (kind === 'end') setTail('ended', `ended: ${data.reason}`);
}

async function watch(ev) {
  ev.preventDefault();
  stopTail();
  const kind = $('tail-kind').value;
  const name = $('tail-input').value.trim();
  $('tail-entries').tBodies[0].replaceChildren();
  state.tail = [];
  setTail('starting', `starting a tail of ${kind} ${name}…`);
  const abort = new AbortController();
  tailAbort = abort;
  try {
    const res = await fetch(`/api/dashboard/tail?${new URLSearchParams({ [kind]: name })}`, {
      headers: headers(), cache: 'no-store', signal: abort.signal,
    });
    if (!res.ok) {
      let msg = `HTTP ${res.status}`;
      try { const j = await res.json(); msg = `${j.error.code}: ${j.error.message}`; } catch { /* keep */ }
      if (res.status === 401) return showKeyForm(`Refused: ${msg}`);
      return setTail('failed', msg, 'error');
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let kind = 'message';
        let data = '';
        for (const line of block.split('\n')) {
          if (line.startsWith('event: ')) kind = line.slice(7);
          else if (line.startsWith('data: ')) data += line.slice(6);
        }
        if (data) onEvent(kind, JSON.parse(data));
      }
    }
    if (state.tailState === 'watching') setTail('ended', 'ended');
  } catch (e) {
    if (abort.signal.aborted) return;
    setTail('failed', `tail failed: ${e.message}`, 'error');
  } finally {
    if (tailAbort === abort) tailAbort = null;
  }
}

function stopTail() {
  if (tailAbort) {
    tailAbort.abort();
    tailAbort = null;
    setTail('idle', 'stopped');
  }
}

// --- Actions: the API's own methods ---

async function push(ev) {
  ev.preventDefault();
  const kind = $('push-kind').value;
  const target = $('push-target').value.trim();
  const data = $('push-data').value;
  const methods = {
    client: ['send_to_client', { client_id: target }],
    uid: ['send_to_uid', { uid: target }],
    group: ['send_to_group', { group: target }],
    all: ['send_to_all', {}],
  };
  const [method, params] = methods[kind];
  const out = $('push-result');
  try {
    await call(`/api/${method}`, { method: 'POST', body: { ...params, data } });
    out.textContent = `sent (${method}) at ${new Date().toLocaleTimeString()}`;
    out.className = 'ok';
  } catch (e) {
    if (e instanceof Unauthorized) return showKeyForm(`Refused: ${e.message}`);
    out.textContent = e.message;
    out.className = 'error';
  }
}

async function closeClient(ev) {
  ev.preventDefault();
  const id = $('close-input').value.trim();
  if (!confirm(`Close ${id}?`)) return;
  const out = $('close-result');
  try {
    await call('/api/close_client', { method: 'POST', body: { client_id: id } });
    out.textContent = `closed ${id}`;
    out.className = 'ok';
  } catch (e) {
    out.textContent = e.message;
    out.className = 'error';
  }
}

async function evacuationState() {
  try {
    const p = await call('/api/evacuate');
    $('evacuate-state').textContent = !p
      ? 'this node is not evacuating'
      : p.done
        ? `evacuated: ${p.closed} of ${p.total} clients closed`
        : `evacuating: ${p.closed} of ${p.total} clients closed, ${p.remaining} left, at ${p.rate} a second`;
  } catch (e) {
    $('evacuate-state').textContent = `evacuation state unknown: ${e.message}`;
  }
}

async function evacuate(node, self) {
  const which = self ? 'this node' : `node ${node}`;
  if (!confirm(`Evacuate ${which}? Its clients are closed at a bounded rate and reconnect elsewhere.`)) return;
  try {
    if (self) {
      await call('/api/evacuate', { method: 'POST' });
    } else {
      // The other node takes the request with its next stats record.
      const r = await call('/api/dashboard/evacuate', { method: 'POST', body: { node } });
      $('evacuate-state').textContent = `asked ${node} to evacuate (within ${r.within_ms / 1000} s)`;
      return;
    }
  } catch (e) {
    $('evacuate-state').textContent = e.message;
    return;
  }
  evacuationState();
}

// --- Wiring ---

document.addEventListener('DOMContentLoaded', () => {
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $('key-input').value);
    $('key-input').value = '';
    start();
  });
  $('forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    stopTail();
    if (timer) clearInterval(timer);
    showKeyForm('');
  });
  $('lookup-form').addEventListener('submit', lookup);
  $('tail-form').addEventListener('submit', watch);
  $('tail-stop').addEventListener('click', stopTail);
  $('push-form').addEventListener('submit', push);
  $('close-form').addEventListener('submit', closeClient);
  start();
});
