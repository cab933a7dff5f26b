// A stream the page has received nothing on yet (docs/recovery.md, the
// `position` frame): bound to uid alice, whose history already has a push,
// the page is told where alice stands and keeps it; while the page is away
// a push to alice is kept; when it comes back, that push is replayed.
// Without the told position the page could not name alice, and the push
// was lost without a word.
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

const OPTIONS = { recover: true, minDelay: 200, maxDelay: 2000 };
const push = (data) => api(config.api, 'send_to_uid', { uid: 'alice', data, history: true });

run('position', async (page) => {
  await push('before the page');
  await libraryPage(page, config.page, config.ws, OPTIONS);
  const first = await newClientId(page);
  await api(config.api, 'bind_uid', { client_id: first, uid: 'alice' });
  const told = await until(page, 'the position of u:alice kept', () => {
    for (let i = 0; i < sessionStorage.length; i++) {
      const v = JSON.parse(sessionStorage.getItem(sessionStorage.key(i)) || 'null');
      if (v && v.pos && v.pos['u:alice']) return v.pos['u:alice'];
    }
    return null;
  });
  log('told', JSON.stringify(told));
  assert(told[1] === 1, `alice stands at 1: ${JSON.stringify(told)}`);

  await page.goto('about:blank');
  await push('while away');
  await libraryPage(page, config.page, config.ws, OPTIONS);
  await newClientId(page, [first]);
  await until(page, 'the push missed while away', () => window.t.messages.includes('while away'));
  const events = await page.evaluate(() => window.t.events);
  assert(events.some(([e, v]) => e === 'recovered' && v.streams['u:alice'] === true), `recovered: ${JSON.stringify(events)}`);
  assert(!events.some(([e]) => e === 'discontinuity'), `no discontinuity: ${JSON.stringify(events)}`);
  const got = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(got) === '["while away"]', `exactly the missed push: ${JSON.stringify(got)}`);
});
