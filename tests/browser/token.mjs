// The server closes with 4001 when the client's token expires
// (--client-jwt-enforce-exp): the library asks getToken for a fresh one,
// reconnects, and keeps receiving.
import { createHmac } from 'node:crypto';
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

function jwt(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', config.secret).update(body).digest('base64url')}`;
}

run('token', async (page) => {
  let minted = 0;
  // The app's backend, minting short-lived tokens.
  await page.exposeFunction('mintToken', () => {
    minted++;
    return jwt({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + config.token_secs });
  });
  await libraryPage(page, config.page, config.ws, { getToken: true, minDelay: 200, maxDelay: 2000 });
  const first = await newClientId(page);
  log('connected as', first, 'with token', minted);
  await api(config.api, 'send_to_uid', { uid: 'alice', data: 'one' });
  await until(page, 'the first push', () => window.t.messages.includes('one'));

  const second = await newClientId(page, [first]);
  const states = await page.evaluate(() => window.t.states.filter((s) => s.state === 'disconnected'));
  log('reconnected as', second, 'after', JSON.stringify(states));
  assert(states.length >= 1 && states[0].code === 4001, `closed with 4001: ${JSON.stringify(states)}`);
  const tokens = await page.evaluate(() => window.t.tokens);
  assert(tokens >= 2, `getToken called again (${tokens} calls)`);
  // The uid comes from the fresh token's sub.
  await api(config.api, 'send_to_uid', { uid: 'alice', data: 'two' });
  await until(page, 'the push after the refresh', () => window.t.messages.includes('two'));
  const messages = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(messages) === '["one","two"]', `messages ${JSON.stringify(messages)}`);
});
