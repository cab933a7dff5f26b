// Shared by the browser scenarios that tests/browser.rs runs: a headless
// Debian chromium driven by playwright-core (nothing downloads a browser),
// bounded waits, API calls, screenshots.
//
//   node tests/browser/<scenario>.mjs '<JSON config>'
//
// A scenario prints `ok <name>` and exits 0 when everything held; any
// failure prints why, saves a screenshot and exits 1.
import { existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

const require = createRequire(new URL('../../clients/js/package.json', import.meta.url));

export const config = JSON.parse(process.argv[2] || '{}');
const WAIT = config.wait_ms || 15000;

export function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

/** Launches headless chromium, or fails saying what is missing. */
export async function launch() {
  const executablePath = config.chromium || '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`chromium not found at ${executablePath}: install it (apt-get install chromium; scripts/test does)`);
  }
  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (e) {
    throw new Error(`playwright-core is missing: run npm ci in clients/js (scripts/test does): ${e.message}`);
  }
  return chromium.launch({
    executablePath,
    headless: true,
    // CI runs as root, where chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    timeout: WAIT,
  });
}

/** Calls the gatecast API at `api` (http://host:port); returns the result. */
export async function api(base, method, params) {
  const res = await fetch(`${base}/api/${method}`, {
    method: 'POST',
    body: JSON.stringify(params),
    signal: AbortSignal.timeout(WAIT),
  });
  const body = await res.json();
  if (res.status !== 200) throw new Error(`${method}: HTTP ${res.status} ${JSON.stringify(body)}`);
  return body.result;
}

/** Waits (bounded) until `fn(arg)` is truthy in the page; returns its value. */
export async function until(page, what, fn, arg, timeout = WAIT) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout, polling: 50 });
    return await handle.jsonValue();
  } catch (e) {
    throw new Error(`timed out after ${timeout} ms waiting for ${what}: ${e.message.split('\n')[0]}`);
  }
}

/** Saves a screenshot as <shots>/<name>.png. */
export async function screenshot(page, name) {
  if (!page || !config.shots) return;
  mkdirSync(config.shots, { recursive: true });
  const path = join(config.shots, `${name}.png`);
  await page.screenshot({ path, fullPage: true, timeout: WAIT }).catch((e) => log('screenshot failed:', e.message));
  log('screenshot', path);
}

/** Runs a scenario: a browser, a page, `body(page, browser)`, a screenshot, an exit code. */
export async function run(name, body) {
  let browser;
  let page;
  const watchdog = setTimeout(() => {
    console.error(`FAILED ${name}: the scenario ran past ${config.deadline_ms || 60000} ms`);
    process.exit(1);
  }, config.deadline_ms || 60000);
  try {
    browser = await launch();
    page = await browser.newPage();
    page.on('console', (m) => log('page:', m.text()));
    page.on('pageerror', (e) => log('page error:', e.message));
    await body(page, browser);
    await screenshot(page, name);
    console.log(`ok ${name}`);
    process.exitCode = 0;
  } catch (e) {
    console.error(`FAILED ${name}: ${e.stack || e}`);
    await screenshot(page, `${name}-failed`);
    process.exitCode = 1;
  } finally {
    clearTimeout(watchdog);
    if (browser) await browser.close().catch(() => {});
  }
}

/**
 * Opens a page served by a node (`origin`) that loads the library it
 * serves and records everything the client reports in `window.t`.
 * `options` are connect()'s options; `urls` the /ws URLs tried in turn.
 * `navigate: false` uses the page as it is (after a reload).
 */
export async function libraryPage(page, origin, urls, options = {}, navigate = true) {
  if (navigate) await page.goto(`${origin}/healthz`, { timeout: WAIT });
  await page.evaluate(
    async ({ urls, options }) => {
      const { connect } = await import('/gatecast.js');
      document.body.style.font = '14px monospace';
      document.body.textContent = '';
      const t = { states: [], messages: [], ids: [], events: [], tokens: 0 };
      window.t = t;
      let i = 0;
      const show = (line) => {
        const div = document.createElement('div');
        div.textContent = `${new Date().toISOString().slice(11, 23)} ${line}`;
        document.body.appendChild(div);
      };
      if (options.getToken) options.getToken = () => window.mintToken().then((tok) => (t.tokens++, tok));
      t.client = connect(() => urls[i++ % urls.length], options);
      t.client.on('state', (s) => {
        t.states.push({ ...s, at: performance.now() });
        show('state ' + JSON.stringify(s));
      });
      t.client.on('clientId', (id) => {
        t.ids.push(id);
        show('client_id ' + id);
      });
      t.client.on('message', (d, p) => {
        const m = typeof d === 'string' ? d : 'bytes:' + [...new Uint8Array(d)].join(',');
        t.messages.push(m);
        show('message ' + m + (p ? ' ' + JSON.stringify(p) : ''));
      });
      for (const ev of ['recovered', 'discontinuity']) {
        t.client.on(ev, (e) => {
          t.events.push([ev, e]);
          show(ev + ' ' + JSON.stringify(e));
        });
      }
    },
    { urls, options },
  );
}

/** Waits for a client_id other than those in `seen`; returns it. */
export function newClientId(page, seen = []) {
  return until(page, `a client_id other than ${JSON.stringify(seen)}`, (seen) => {
    const id = window.t.client.clientId;
    return window.t.client.state === 'connected' && id && !seen.includes(id) ? id : null;
  }, seen);
}

export function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}
