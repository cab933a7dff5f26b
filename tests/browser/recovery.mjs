// Recovery (docs/recovery.md) in a browser: pushes sent while the client
// was away (its node drained; the page closed or reloaded) arrive exactly
// once and in order, then live ones; `recovered` says so.
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

const OPTIONS = { recover: true, minDelay: 200, maxDelay: 2000 };
const push = (data) => api(config.api, 'send_to_group', { group: 'room-1', data, ...config.push_extra });

run('recovery', async (page) => {
  await libraryPage(page, config.page, config.ws, OPTIONS);
  const first = await newClientId(page);
  await api(config.api, 'bind_uid', { client_id: first, uid: 'alice' });
  await api(config.api, 'join_group', { client_id: first, group: 'room-1' });
  await push('p0');
  await until(page, 'p0', () => window.t.messages.includes('p0'));

  // Drain its node while pushes keep coming: some before the close, some
  // while away, some during the replay, some live after it.
  const sent = ['p0'];
  let drained = false;
  for (let i = 1; i <= 30; i++) {
    if (i === 5) {
      log('SIGTERM', config.drain_pid);
      process.kill(config.drain_pid, 'SIGTERM');
      drained = true;
    }
    await push(`p${i}`);
    sent.push(`p${i}`);
    await new Promise((r) => setTimeout(r, 40));
  }
  assert(drained, 'drained');
  const second = await newClientId(page, [first]);
  log('resumed as', second);
  await until(page, 'every push across the drain', (n) => window.t.messages.length >= n, sent.length);
  await new Promise((r) => setTimeout(r, 300)); // a duplicate would arrive now
  let got = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(got) === JSON.stringify(sent), `exactly once, in order: ${JSON.stringify(got)}`);
  let events = await page.evaluate(() => window.t.events);
  assert(events.some(([e, v]) => e === 'recovered' && v.resumed === true && v.streams['g:room-1'] === true),
    `recovered: ${JSON.stringify(events)}`);
  assert(!events.some(([e]) => e === 'discontinuity'), `no discontinuity: ${JSON.stringify(events)}`);

  // The page goes away; pushes come; the page comes back (sessionStorage).
  await page.goto('about:blank');
  await push('q1');
  await push('q2');
  await libraryPage(page, config.page, config.ws, OPTIONS);
  await newClientId(page, [first, second]);
  await until(page, 'q1 and q2 after coming back', () => window.t.messages.length >= 2);
  await push('q3');
  await until(page, 'q3 live', () => window.t.messages.includes('q3'));
  got = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(got) === '["q1","q2","q3"]', `after coming back: ${JSON.stringify(got)}`);

  // A reload, with a push in between.
  await page.reload();
  await push('r1');
  await libraryPage(page, config.page, config.ws, OPTIONS, false);
  await until(page, 'r1 after the reload', () => window.t.messages.includes('r1'));
  await push('r2');
  await until(page, 'r2 live', () => window.t.messages.includes('r2'));
  got = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(got) === '["r1","r2"]', `after the reload: ${JSON.stringify(got)}`);
  events = await page.evaluate(() => window.t.events);
  assert(!events.some(([e]) => e === 'discontinuity'), `no discontinuity: ${JSON.stringify(events)}`);
});
