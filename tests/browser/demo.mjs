// The demo page (--demo) on one node receives pushes sent through ANOTHER
// node's API: text and binary, exact, after crossing Redis.
import { config, run, api, until, assert, log } from './common.mjs';

run('demo', async (page) => {
  await page.goto(`${config.page}/demo`);
  const id = await until(page, 'the demo connected', () =>
    window.demo && window.demo.client.state === 'connected' && window.demo.client.clientId);
  log('client_id', id);
  const shown = await page.textContent('#client-id');
  assert(shown === id, `the page shows the client_id (${shown})`);
  const curl = await page.textContent('#curl');
  assert(curl.includes(`"client_id":"${id}"`) && curl.includes(`${config.page_api}/api`), `curl lines name the id and this node's API: ${curl}`);

  // Through the other node: bind, join, push (text, JSON, binary).
  await api(config.api, 'bind_uid', { client_id: id, uid: 'alice' });
  await api(config.api, 'join_group', { client_id: id, group: 'room-1' });
  await api(config.api, 'send_to_uid', { uid: 'alice', data: 'hi alice' });
  await api(config.api, 'send_to_group', { group: 'room-1', data: { type: 'news', n: 1 } });
  await api(config.api, 'send_to_client', { client_id: id, data_base64: 'AAEK/w==' });
  const got = await until(page, 'three messages', () => window.demo.messages.length >= 3 && window.demo.messages);
  const want = [
    { binary: false, text: 'hi alice' },
    { binary: false, text: '{"type":"news","n":1}' },
    { binary: true, text: '00 01 0a ff' },
  ];
  assert(JSON.stringify(got) === JSON.stringify(want), `messages ${JSON.stringify(got)}`);
  const rows = await page.locator('#messages tr').count();
  assert(rows === 3, `the page lists 3 messages (${rows})`);
});
