// Every node is down: the library keeps trying, never faster than its
// smallest delay, never slower than its largest, growing in between.
// CI runs a short window with small delays; GATECAST_BROWSER_BACKOFF=full
// (tests/browser.rs) runs the defaults (0.5 s -> 20 s) over 30 s.
import { config, run, until, assert, log, libraryPage, newClientId } from './common.mjs';

run('backoff', async (page) => {
  const { min_ms: min, max_ms: max, window_ms: span } = config;
  await libraryPage(page, config.page, config.ws, { minDelay: min, maxDelay: max });
  await newClientId(page);
  for (const pid of config.kill_pids) process.kill(pid, 'SIGKILL');
  log("killed every node; counting attempts for", span, "ms");
  await until(page, 'the connection lost', () => window.t.states.some((s) => s.state === 'disconnected'));
  const start = await page.evaluate(() => performance.now());
  await page.waitForTimeout(span);
  const attempts = await page.evaluate(
    (start) => window.t.states.filter((s) => s.state === 'connecting' && s.at >= start).map((s) => s.at),
    start,
  );
  const delays = await page.evaluate(() => window.t.states.filter((s) => s.state === 'disconnected').map((s) => s.delay));
  const gaps = attempts.slice(1).map((a, i) => Math.round(a - attempts[i]));
  log('attempts', attempts.length, 'gaps', JSON.stringify(gaps), 'delays', JSON.stringify(delays));
  // Each planned delay within [min, max]; it doubles its cap per attempt.
  for (const [i, d] of delays.entries()) {
    assert(d >= min && d <= Math.min(max, min * 2 ** (i + 1)), `delay ${i} = ${d} within [${min}, min(${max}, ${min}*2^${i + 1})]`);
  }
  // Measured between attempts: never a tight loop, never a stall (a failed
  // attempt on loopback takes a few ms; the slack is for a loaded machine).
  const slack = 1500;
  for (const g of gaps) assert(g >= min - 20 && g <= max + slack, `gap ${g} within [${min}, ${max} + ${slack}]`);
  const most = Math.floor(span / min) + 1;
  const least = Math.floor(span / (max + slack));
  assert(attempts.length <= most && attempts.length >= least, `${attempts.length} attempts in ${span} ms, within [${least}, ${most}]`);
  assert(new Set(delays).size > 1, `jittered delays ${JSON.stringify(delays)}`);
  const state = await page.evaluate(() => window.t.client.state);
  assert(state !== 'closed', 'never gives up');
});
