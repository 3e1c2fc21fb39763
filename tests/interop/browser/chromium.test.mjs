// Herald's WebSocket endpoint driven by the browser build of `centrifuge`
// (node_modules/centrifuge/dist/centrifuge.js, the file a web page loads) in headless Chromium:
// Debian's /usr/bin/chromium (scripts/test installs it), automated with `playwright-core`
// (pinned in ../package.json; it downloads no browser).
//
// The test serves a tiny page and the SDK bundle from a local HTTP server; the page connects to
// Herald through a cutting TCP proxy (../node/cutproxy.mjs), subscribes, and keeps what it receives in
// `window.received`, which the test polls. CHROMIUM overrides the browser path.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { startCutProxy } from '../node/cutproxy.mjs';
import { mintToken, startHerald } from '../node/herald.mjs';
import { REALTIME_CONFIG, publishNumbers, range, sleep, waitFor } from '../node/realtime.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const require = createRequire(import.meta.url);
// The package's main is build/index.js; the browser bundle is dist/centrifuge.js beside it.
const SDK_BUNDLE = path.join(path.dirname(require.resolve('centrifuge')), '..', 'dist', 'centrifuge.js');

// The page: its settings come in the query string (none: it only loads); everything it sees
// goes to window.* arrays.
const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>herald centrifuge-js</title>
<script src="/centrifuge.js"></script></head>
<body><pre id="log"></pre>
<script>
  const params = new URLSearchParams(location.search);
  window.received = [];
  window.subscribed = [];
  window.clientEvents = [];
  window.errors = [];
  if (params.get('ws')) start();
  function start() {
  const client = new Centrifuge(params.get('ws'), { token: params.get('token') });
  for (const name of ['connecting', 'connected', 'disconnected']) {
    client.on(name, (ctx) => window.clientEvents.push({ name, code: ctx.code, reason: ctx.reason, transport: ctx.transport }));
  }
  client.on('error', (ctx) => window.errors.push(String(ctx.error && ctx.error.message)));
  const sub = client.newSubscription(params.get('channel'));
  sub.on('publication', (ctx) => {
    window.received.push({ offset: ctx.offset, data: ctx.data });
    document.getElementById('log').textContent += JSON.stringify(ctx.data) + '\\n';
  });
  sub.on('subscribed', (ctx) => window.subscribed.push({
    wasRecovering: ctx.wasRecovering, recovered: ctx.recovered, recoverable: ctx.recoverable,
    offset: ctx.streamPosition && ctx.streamPosition.offset, epoch: ctx.streamPosition && ctx.streamPosition.epoch,
  }));
  sub.subscribe();
  client.connect();
  window.centrifuge = client;
  }
</script></body></html>`;

async function servePage() {
  const bundle = readFileSync(SDK_BUNDLE);
  const server = createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://localhost');
    if (pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(PAGE);
    } else if (pathname === '/centrifuge.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' }).end(bundle);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((resolve) => server.close(resolve)) };
}

describe('centrifuge-js in headless Chromium against herald serve', { timeout: 120_000 }, () => {
  let server;
  let page;
  let pages;
  let otherSite;
  let context;
  let userDataDir;
  const consoleLines = [];

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/test installs Debian's chromium; or set CHROMIUM)`);
    // The page's origin is allowed to connect; the "other site" serves the same page from an
    // origin that is not (the cross-site WebSocket hijacking test).
    pages = await servePage();
    otherSite = await servePage();
    const allowed = REALTIME_CONFIG.replace('[client]\n', `[client]\nallowed_origins = ["${pages.url}"]\n`);
    assert.notEqual(allowed, REALTIME_CONFIG);
    server = await startHerald({ extraConfig: allowed });
    userDataDir = mkdtempSync(path.join(tmpdir(), 'herald-chromium-'));
    // launchPersistentContext: Playwright refuses --user-data-dir in `args` for launch().
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      timeout: 60_000,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
    page = context.pages()[0] ?? await context.newPage();
    page.on('console', (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on('pageerror', (error) => consoleLines.push(`pageerror: ${error.message}`));
  });

  after(async () => {
    if (context) await context.close();
    if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
    if (pages) await pages.close();
    if (otherSite) await otherSite.close();
    if (server) assert.equal(await server.stop(), 0);
  });

  const pageState = () => page.evaluate(() => ({
    received: window.received,
    subscribed: window.subscribed,
    clientEvents: window.clientEvents,
    errors: window.errors,
  }));

  test('cross-site WebSocket hijacking: a page from another origin cannot connect, the allowed one can', async () => {
    const attempt = (wsUrl) => page.evaluate((url) => new Promise((resolve) => {
      const ws = new WebSocket(url);
      ws.onopen = () => { ws.close(); resolve('open'); };
      ws.onerror = () => resolve('refused');
      setTimeout(() => resolve('timeout'), 5000);
    }), wsUrl);
    await page.goto(`${otherSite.url}/?blank=1`);
    assert.equal(await attempt(server.wsUrl), 'refused', 'the other site is refused at the handshake');
    await page.goto(`${pages.url}/?blank=1`);
    assert.equal(await attempt(server.wsUrl), 'open', 'the allowed page connects');
  });

  test('the browser SDK receives publications, and recovers exactly the missed ones after a forced disconnect', async () => {
    const proxy = await startCutProxy(server.url);
    const details = () => `--- wire ---\n${proxy.wire()}\n--- console ---\n${consoleLines.join('\n')}`;
    try {
      const ch = `browser-${randomUUID().slice(0, 12)}`;
      const token = mintToken(server.hmacSecret, { sub: 'browser-user', ttlSeconds: 3600 });
      const query = new URLSearchParams({ ws: proxy.wsUrl, token, channel: ch });
      await page.goto(`${pages.url}/?${query}`);
      const version = await page.evaluate(() => navigator.userAgent);
      assert.match(version, /Chrome\//);

      await waitFor('the page to subscribe', async () => (await pageState()).subscribed.length >= 1, { details });
      const first = (await pageState()).subscribed[0];
      assert.equal(first.recoverable, true);
      assert.equal(first.wasRecovering, false);

      await publishNumbers(server, ch, range(1, 10));
      await waitFor('10 publications in the page', async () => (await pageState()).received.length >= 10, { details });
      assert.deepEqual((await pageState()).received.map((p) => p.offset), range(1, 10));
      assert.deepEqual((await pageState()).received.map((p) => p.data), range(1, 10).map((n) => ({ n })));

      // Drop the connection under the browser; its reconnect waits at the proxy.
      proxy.cut({ hold: true });
      await waitFor('the page to notice the drop', async () => (await pageState()).clientEvents.some((e) => e.name === 'connecting' && e.code === 1), { details });
      await publishNumbers(server, ch, range(11, 17));
      await waitFor('the browser to reconnect (held at the proxy)', () => proxy.held > 0, { details });
      proxy.resume();

      await waitFor('the resubscribe', async () => (await pageState()).subscribed.length >= 2, { details });
      const again = (await pageState()).subscribed[1];
      assert.equal(again.wasRecovering, true, details());
      assert.equal(again.recovered, true, details());
      await publishNumbers(server, ch, [18]);
      await waitFor('18 publications in the page', async () => (await pageState()).received.length >= 18, { details });
      await sleep(200);
      const state = await pageState();
      assert.deepEqual(state.received.map((p) => p.offset), range(1, 18), `no gap, no duplicate\n${details()}`);
      assert.deepEqual(state.clientEvents.map((e) => e.name), ['connecting', 'connected', 'connecting', 'connected'], details());
      assert.equal(state.clientEvents[1].transport, 'websocket');
      assert.deepEqual(state.errors, []);
    } finally {
      await proxy.close();
    }
  });
});
