// Herald's Server-Sent Events endpoint (`/connection/sse`) read by the browser's own
// `EventSource` in headless Chromium (same browser and launch flags as chromium.test.mjs): no
// SDK, no library, the token in `?token=`.
//
// The page and the stream share one origin (as behind a reverse proxy): a small HTTP server in
// the test serves the page at `/` and forwards `/connection/*` to Herald unchanged (streaming
// the response as it arrives). It records the headers of every forwarded request, can `cut()` the
// browser's connections at the TCP level, and can hold new stream requests until `resume()`,
// so the test decides when the browser's own automatic reconnect reaches Herald.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { mintToken, startHerald } from '../node/herald.mjs';
import { REALTIME_CONFIG, api, sleep, waitFor } from '../node/realtime.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>herald EventSource</title></head>
<body><pre id="log"></pre>
<script>
  const params = new URLSearchParams(location.search);
  window.events = [];
  window.errors = [];
  window.opens = 0;
  const query = new URLSearchParams();
  for (const ch of params.getAll('channel')) query.append('channel', ch);
  query.set('token', params.get('token'));
  const source = new EventSource('/connection/sse?' + query);
  for (const type of ['connected', 'publication', 'disconnect']) {
    source.addEventListener(type, (e) => {
      window.events.push({ type, id: e.lastEventId, data: JSON.parse(e.data) });
      document.getElementById('log').textContent += type + ' ' + e.data + '\\n';
    });
  }
  source.onopen = () => { window.opens += 1; };
  source.onerror = () => { window.errors.push(source.readyState); };
  window.source = source;
</script></body></html>`;

/** The same-origin server: the page, and /connection/* forwarded to Herald. */
async function startOrigin(heraldUrl) {
  const target = new URL(heraldUrl);
  const forwarded = []; // {url, headers}
  const live = new Set(); // {req, upstream}
  const held = [];
  let holding = false;

  const forward = (req, res) => {
    forwarded.push({ url: req.url, headers: { ...req.headers } });
    const upstream = httpRequest({
      host: target.hostname, port: target.port, method: req.method, path: req.url,
      headers: { ...req.headers, host: target.host },
    }, (upRes) => {
      res.writeHead(upRes.statusCode, upRes.headers);
      res.flushHeaders();
      upRes.on('data', (chunk) => res.write(chunk));
      upRes.on('end', () => res.end());
      upRes.on('error', () => res.destroy());
    });
    const entry = { req, upstream };
    live.add(entry);
    const drop = () => {
      live.delete(entry);
      upstream.destroy();
    };
    // Not req's 'close': it fires once a GET's (empty) body is read.
    res.on('close', drop);
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  };

  const server = createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://localhost');
    if (pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' }).end(PAGE);
    } else if (pathname.startsWith('/connection/')) {
      if (holding) held.push([req, res]);
      else forward(req, res);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    forwarded,
    get held() { return held.length; },
    /** Destroys the browser's forwarded connections (TCP, no end of stream) and their upstreams. */
    cut({ hold = false } = {}) {
      holding = hold;
      for (const entry of [...live]) {
        live.delete(entry);
        entry.req.socket.destroy();
        entry.upstream.destroy();
      }
    },
    resume() {
      holding = false;
      for (const [req, res] of held.splice(0)) if (!req.socket.destroyed) forward(req, res);
    },
    async close() {
      for (const [req] of held.splice(0)) req.socket.destroy();
      for (const entry of [...live]) {
        entry.req.socket.destroy();
        entry.upstream.destroy();
      }
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

const perChannel = (pubs, ch) => pubs.filter((p) => p.channel === ch).map((p) => [p.offset, p.data.n]);

async function publish(server, items) {
  for (const [channel, n] of items) await api(server, 'publish', { channel, data: { n } });
}

describe('the browser EventSource in headless Chromium against herald serve', { timeout: 120_000 }, () => {
  let server;
  let origin;
  let page;
  let context;
  let userDataDir;
  const consoleLines = [];

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/test installs Debian's chromium; or set CHROMIUM)`);
    server = await startHerald({ extraConfig: REALTIME_CONFIG });
    origin = await startOrigin(server.url);
    userDataDir = mkdtempSync(path.join(tmpdir(), 'herald-chromium-es-'));
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
    if (origin) await origin.close();
    if (server) assert.equal(await server.stop(), 0);
  });

  const state = () => page.evaluate(() => ({ events: window.events, errors: window.errors, opens: window.opens, readyState: window.source.readyState }));

  test('EventSource reconnects by itself with Last-Event-ID and receives exactly the missed publications', async () => {
    const tag = randomUUID().slice(0, 10);
    const a = `bes-a-${tag}`;
    const b = `bes-b-${tag}`;
    const token = mintToken(server.hmacSecret, { sub: 'browser-es', ttlSeconds: 3600 });
    const sseRequests = () => origin.forwarded.filter((r) => r.url.startsWith('/connection/sse'));
    let last = null;
    const details = () => `--- forwarded requests ---\n${JSON.stringify(sseRequests().map((r) => ({ url: r.url.replace(/token=[^&]+/, 'token=…'), lastEventId: r.headers['last-event-id'] })), null, 1)}\n--- page ---\n${JSON.stringify(last, null, 1)}\n--- console ---\n${consoleLines.join('\n')}`;
    const pubs = async () => { last = await state(); return last.events.filter((e) => e.type === 'publication'); };
    const connecteds = async () => { last = await state(); return last.events.filter((e) => e.type === 'connected'); };

    const query = new URLSearchParams([['channel', a], ['channel', b], ['token', token]]);
    await page.goto(`${origin.url}/?${query}`);
    assert.match(await page.evaluate(() => navigator.userAgent), /Chrome\//);

    await waitFor('the connected event', async () => (await connecteds()).length === 1, { details });
    assert.equal(sseRequests()[0].headers['last-event-id'], undefined);
    await publish(server, [[a, 1], [b, 101], [a, 2], [b, 102], [a, 3]]);
    await waitFor('5 publications in the page', async () => (await pubs()).length >= 5, { details });
    const first = (await pubs()).map((e) => e.data);
    assert.deepEqual(perChannel(first, a), [[1, 1], [2, 2], [3, 3]], details());
    assert.deepEqual(perChannel(first, b), [[1, 101], [2, 102]], details());
    const lastId = (await pubs()).at(-1).id;
    assert.deepEqual(lastId.split(',').map((p) => p.split(':')[0]), ['3', '2'], lastId);

    // Drop the browser's connection; its own reconnect waits at the origin server.
    origin.cut({ hold: true });
    await waitFor('the page to notice the drop', async () => (await state()).errors.length >= 1, { details });
    await publish(server, [[b, 103], [a, 4], [b, 104], [a, 5], [a, 6]]);
    await waitFor('the browser to reconnect by itself (held)', () => origin.held > 0, { details });
    origin.resume();

    await waitFor('the connected event after the reconnect', async () => (await connecteds()).length === 2, { details });
    assert.equal(sseRequests().length, 2, details());
    assert.equal(sseRequests()[1].headers['last-event-id'], lastId, `the browser sends the last id\n${details()}`);
    const resumed = (await connecteds())[1].data;
    for (const ch of [a, b]) assert.equal(resumed.channels[ch].recovered, true, details());

    await waitFor('the 5 missed publications', async () => (await pubs()).length >= 10, { details });
    await publish(server, [[b, 105]]);
    await waitFor('the live publication', async () => (await pubs()).length >= 11, { details });
    await sleep(200);
    const all = await pubs();
    const after = all.slice(5).map((e) => e.data);
    assert.deepEqual(perChannel(after, a), [[4, 4], [5, 5], [6, 6]], `exactly the missed ones, no duplicate\n${details()}`);
    assert.deepEqual(perChannel(after, b), [[3, 103], [4, 104], [5, 105]], `exactly the missed ones, then live\n${details()}`);
    assert.equal(all.length, 11, details());
    const final = await state();
    assert.equal(final.opens, 2, details());
    assert.equal(final.readyState, 1, 'OPEN');
    await page.evaluate(() => window.source.close());
  });
});
