// The network side of reconnecting, in a browser against real nodes:
// - a node that stops answering (SIGSTOP: the TCP connection stays open)
//   is noticed by the application ping, and the client moves to another;
// - the `online` event cuts a long backoff short.
import { config, run, api, until, assert, log, libraryPage, newClientId } from './common.mjs';

run('network', async (page) => {
  await libraryPage(page, config.page, config.ws, {
    minDelay: 5000,
    maxDelay: 20000,
    pingInterval: 500,
    pongTimeout: 1000,
  });
  const first = await newClientId(page);
  log('SIGSTOP', config.stall_pid, '(its connections stay open, silent)');
  process.kill(config.stall_pid, 'SIGSTOP');
  try {
    const lost = await until(page, 'the silent connection given up', () =>
      window.t.states.find((s) => s.state === 'disconnected'));
    assert(lost.reason === 'no pong', `replaced for want of a pong: ${JSON.stringify(lost)}`);
    assert(lost.delay >= 5000, `a long backoff is planned: ${lost.delay}`);
    // The network comes back: no waiting out the backoff.
    const context = page.context();
    await context.setOffline(true);
    await context.setOffline(false);
    const second = await newClientId(page, [first]);
    const back = await page.evaluate(() => window.t.states.find((s) => s.state === 'connected' && s.clientId !== window.t.ids[0]));
    const early = Math.round(lost.at + lost.delay - back.at);
    log('reconnected as', second, early, 'ms before the backoff would have ended');
    assert(early > 1000, `reconnected on online, ${early} ms before the backoff's end`);
    await api(config.api, 'send_to_client', { client_id: second, data: 'after' });
    await until(page, 'a push on the new connection', () => window.t.messages.includes('after'));
  } finally {
    process.kill(config.stall_pid, 'SIGCONT');
  }
});
