// The dashboard (/dashboard on node A's API listener) in a real browser:
// it asks for the API key once and keeps it for the tab (a reload does not
// ask again), shows both nodes with node B's real connection count, finds
// a uid connected to B, tails it, and a test push sent from its form
// reaches that client. Screenshots at 1280x800 and at a phone's size.
import { config, run, until, assert, log, screenshot } from './common.mjs';

run('dashboard', async (page, browser) => {
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.goto(`${config.page}/dashboard`);

  // Asked for the key (the page itself carries none).
  await until(page, 'the key form', () => !document.getElementById('key-box').hidden);
  await screenshot(page, 'dashboard-key');
  await page.fill('#key-input', 'a-wrong-key-a-wrong-key');
  await page.click('#key-form button');
  await until(page, 'the wrong key refused', () =>
    document.getElementById('key-error').textContent.includes('Refused'));
  await page.fill('#key-input', config.key);
  await page.click('#key-form button');

  // Both nodes, B with its real connections.
  const rowOf = (node) => `#nodes tr[data-node="${node}"]`;
  await until(page, 'both nodes listed', (n) =>
    n.every((id) => document.querySelector(`#nodes tr[data-node="${id}"]`)), [config.node_a, config.node_b]);
  const bCount = await until(page, "node B's connection count", (sel) => {
    const td = document.querySelector(`${sel} td.connections`);
    return td && td.textContent;
  }, rowOf(config.node_b));
  assert(bCount === String(config.b_connections), `node B shows ${bCount} connections`);
  const selfRow = await page.getAttribute(rowOf(config.node_a), 'class');
  assert(selfRow === 'self', `node A is marked as this node (${selfRow})`);
  await screenshot(page, 'dashboard-cluster');

  // The key is kept for the tab: a reload shows the data straight away.
  await page.reload();
  await until(page, 'the nodes after a reload, without asking', (id) =>
    document.getElementById('key-box').hidden && document.querySelector(`#nodes tr[data-node="${id}"]`), config.node_b);
  const stored = await page.evaluate(() => Object.keys(sessionStorage));
  assert(stored.length === 1, `one sessionStorage entry: ${stored}`);

  // A client on node B, bound to a uid (a second page plays the user).
  const user = await browser.newPage();
  await user.goto(`${config.public_b}/healthz`);
  const clientId = await user.evaluate((url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    window.got = [];
    ws.onmessage = (m) => {
      const text = String(m.data);
      if (!window.welcomed) { window.welcomed = true; resolve(JSON.parse(text).client_id); } else window.got.push(text);
    };
    ws.onerror = () => reject(new Error('websocket failed'));
    ws.onclose = (e) => { window.closedWith = e.code; };
  }), config.ws_b);
  log('client on B', clientId);
  const bind = await fetch(`${config.api_b}/api/bind_uid`, {
    method: 'POST',
    headers: { authorization: `Bearer ${config.key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ client_id: clientId, uid: 'dash-user' }),
  });
  assert(bind.status === 200, `bind_uid ${bind.status}`);

  // Look it up from node A: it is on node B.
  await page.selectOption('#lookup-kind', 'uid');
  await page.fill('#lookup-input', 'dash-user');
  await page.click('#lookup-form button');
  const found = await until(page, 'the uid lookup', (id) => {
    const text = document.getElementById('lookup-result').textContent;
    return text.includes(id) && text;
  }, clientId);
  assert(found.includes(config.node_b), `the lookup names node B: ${found}`);

  // Tail the uid, then push to it from the form.
  await page.selectOption('#tail-kind', 'uid');
  await page.fill('#tail-input', 'dash-user');
  await page.click('#tail-start');
  await until(page, 'the tail started', () => window.dashboard.tailState === 'watching');
  await page.selectOption('#push-kind', 'uid');
  await page.fill('#push-target', 'dash-user');
  await page.fill('#push-data', 'hello from the dashboard');
  await page.click('#push-form button');
  await until(user, 'the push reached the client on B', () => window.got.includes('hello from the dashboard'));
  await until(page, 'the tail shows the push', () =>
    window.dashboard.tail.some((e) => e.preview === 'hello from the dashboard'));
  await screenshot(page, 'dashboard-actions');

  // Close that client from the form (after the confirmation).
  page.on('dialog', (d) => d.accept());
  await page.fill('#close-input', clientId);
  await page.click('#close-form button');
  await until(user, 'the client on B closed with 1000', () => window.closedWith === 1000);

  // Evacuate node B from its row (a request B takes with its next
  // record), then this node: the page shows each.
  await page.click(`${rowOf(config.node_b)} button`);
  await until(page, 'the request to B shown', () =>
    document.getElementById('evacuate-state').textContent.startsWith('asked'));
  await until(page, 'B shown as draining', (sel) =>
    document.querySelector(sel)?.textContent.includes('draining'), rowOf(config.node_b));
  await page.click(`${rowOf(config.node_a)} button`);
  await until(page, 'the evacuation shown', () =>
    document.getElementById('evacuate-state').textContent.startsWith('evacuating'));

  // Usable on a phone: nothing wider than the screen but the tables' own scroll.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `the page fits a phone's width (overflow ${overflow}px)`);
  await screenshot(page, 'dashboard-phone');
  await page.click('#tail-stop');
  await user.close();
});
