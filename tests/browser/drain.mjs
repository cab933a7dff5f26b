// The library's node drains (SIGTERM): the client reconnects to another
// node and receives pushes there (sent through a third node's API). Then
// the backend kicks it (close_client): it stays closed.
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

run('drain', async (page) => {
  // The page comes from the API node, so the drained one serves only /ws.
  await libraryPage(page, config.page, config.ws, { minDelay: 200, maxDelay: 2000 });
  const first = await newClientId(page);
  await api(config.api, 'send_to_client', { client_id: first, data: 'before' });
  await until(page, 'the first push', () => window.t.messages.includes('before'));

  log('SIGTERM', config.drain_pid);
  process.kill(config.drain_pid, 'SIGTERM');
  const second = await newClientId(page, [first]);
  log('reconnected as', second);
  assert(second.slice(8, 12) !== first.slice(8, 12), `a different node (${first} -> ${second})`);
  const states = await page.evaluate(() => window.t.states);
  const lost = states.find((s) => s.state === 'disconnected');
  assert(lost && lost.code === 1001, `closed with 1001 by the drain: ${JSON.stringify(lost)}`);
  if (lost.retryMs !== undefined) {
    // The drain said when to come back ({"reason":"drain","retry_ms":N}):
    // that long, plus the client's own jitter (at most minDelay).
    assert(lost.delay >= lost.retryMs && lost.delay <= lost.retryMs + 200, `the server's delay honoured: ${JSON.stringify(lost)}`);
  } else {
    assert(lost.delay <= 2000, `reconnect delay within maxDelay: ${lost.delay}`);
  }

  await api(config.api, 'send_to_client', { client_id: second, data: 'after' });
  await api(config.api, 'send_to_client', { client_id: second, data_base64: 'AQID' });
  const got = await until(page, 'the pushes after the drain', () =>
    window.t.messages.length >= 3 && window.t.messages);
  assert(JSON.stringify(got) === JSON.stringify(['before', 'after', 'bytes:1,2,3']), `messages ${JSON.stringify(got)}`);

  await api(config.api, 'close_client', { client_id: second });
  const closed = await until(page, 'closed for good', () => window.t.client.state === 'closed' && window.t.states.at(-1));
  assert(closed.code === 1000 && closed.reason === 'closed by server', `kicked: ${JSON.stringify(closed)}`);
  // A retry would come within maxDelay.
  await page.waitForTimeout(2500);
  const after = await page.evaluate((at) => window.t.states.filter((s) => s.at > at).length, closed.at);
  assert(after === 0, `no attempt after the kick (${after} state changes)`);
});
