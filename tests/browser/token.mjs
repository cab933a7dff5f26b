// Token refresh with getToken against a node with client auth:
// - a token the node refuses (401 before the upgrade, which a browser hides
//   from JavaScript) is replaced before the next attempt;
// - the server closes with 4001 when the token expires
//   (--client-jwt-enforce-exp): the library asks getToken for a fresh one,
//   reconnects, and keeps receiving.
import { createHmac } from 'node:crypto';
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

function jwt(claims, secret = config.secret) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

run('token', async (page) => {
  let minted = 0;
  // The app's backend, minting short-lived tokens.
  // The app's backend, minting short-lived tokens; the first one is signed
  // with the wrong key, so the node refuses it with 401.
  await page.exposeFunction('mintToken', () => {
    minted++;
    const now = Math.floor(Date.now() / 1000);
    // Valid for an hour, so only the refusal can make the client ask again.
    if (minted === 1) return jwt({ sub: 'alice', exp: now + 3600 }, 'not-the-node-secret-0123456789');
    return jwt({ sub: 'alice', exp: now + config.token_secs });
  });
  await libraryPage(page, config.page, config.ws, { getToken: true, minDelay: 200, maxDelay: 2000 });
  const first = await newClientId(page);
  log('connected as', first, 'with token', minted);
  const refused = await page.evaluate(() => window.t.states.filter((s) => s.state === 'disconnected'));
  assert(refused.length === 1 && refused[0].code === 1006, `the refused handshake: ${JSON.stringify(refused)}`);
  assert(minted === 2, `a fresh token after the refused handshake (${minted} minted)`);
  await api(config.api, 'send_to_uid', { uid: 'alice', data: 'one' });
  await until(page, 'the first push', () => window.t.messages.includes('one'));

  const second = await newClientId(page, [first]);
  const states = await page.evaluate(() => window.t.states.filter((s) => s.state === 'disconnected'));
  log('reconnected as', second, 'after', JSON.stringify(states));
  assert(states.length >= 2 && states[1].code === 4001, `closed with 4001: ${JSON.stringify(states)}`);
  assert(minted >= 3, `getToken called again (${minted} calls)`);
  // The uid comes from the fresh token's sub.
  await api(config.api, 'send_to_uid', { uid: 'alice', data: 'two' });
  await until(page, 'the push after the refresh', () => window.t.messages.includes('two'));
  const messages = await page.evaluate(() => window.t.messages);
  assert(JSON.stringify(messages) === '["one","two"]', `messages ${JSON.stringify(messages)}`);
});
