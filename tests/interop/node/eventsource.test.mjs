// Herald's Server-Sent Events endpoint (`/connection/sse`) read with the npm `eventsource`
// package (pinned in ../package.json), the WHATWG EventSource for Node: no Herald or Centrifugo
// SDK. The token goes in `?token=` (an EventSource cannot set headers).
//
// The EventSource connects through the cutting TCP proxy (cutproxy.mjs). After it has received
// publications the proxy drops the TCP connection and holds the library's own automatic
// reconnect while the test publishes; then the reconnect goes through and must carry the last
// `id:` as `Last-Event-ID` and receive exactly the missed publications. The library's requests
// are observed with a `fetch` wrapper (the option the library offers for this) that records the
// headers it sends and passes everything on to Node's fetch unchanged.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { EventSource } from 'eventsource';

import { startCutProxy } from './cutproxy.mjs';
import { mintToken, startHerald } from './herald.mjs';
import { REALTIME_CONFIG, api, sleep, waitFor } from './realtime.mjs';

async function publish(server, items) {
  for (const [channel, n] of items) await api(server, 'publish', { channel, data: { n } });
}

const perChannel = (pubs, ch) => pubs.filter((p) => p.channel === ch).map((p) => [p.offset, p.data.n]);

describe('npm eventsource against herald serve (/connection/sse)', { timeout: 60_000 }, () => {
  let server;

  before(async () => {
    server = await startHerald({ extraConfig: REALTIME_CONFIG });
  });

  after(async () => {
    if (server) assert.equal(await server.stop(), 0);
  });

  test('the automatic reconnect sends Last-Event-ID and receives exactly the missed publications', async () => {
    const proxy = await startCutProxy(server.url);
    const tag = randomUUID().slice(0, 10);
    const a = `es-a-${tag}`;
    const b = `es-b-${tag}`;
    const token = mintToken(server.hmacSecret, { sub: 'es-user', ttlSeconds: 3600 });
    const url = `${proxy.url}/connection/sse?${new URLSearchParams([['channel', a], ['channel', b], ['token', token]])}`;

    const requests = []; // headers of every request the library made
    const events = []; // {type, id, data}
    const errors = [];
    const opens = [];
    const source = new EventSource(url, {
      fetch: (input, init) => {
        requests.push({ ...(init?.headers ?? {}) });
        return fetch(input, init);
      },
    });
    const details = () => `--- requests ---\n${JSON.stringify(requests, null, 1)}\n--- events ---\n${events.map((e) => JSON.stringify(e)).join('\n')}\n--- errors ---\n${errors.join('\n')}\n--- herald ---${server.diagnostics()}`;
    for (const type of ['connected', 'publication', 'disconnect']) {
      source.addEventListener(type, (e) => events.push({ type, id: e.lastEventId, data: JSON.parse(e.data) }));
    }
    source.addEventListener('open', () => opens.push(Date.now()));
    source.addEventListener('error', (e) => errors.push(String(e.message ?? e.type)));
    const publications = () => events.filter((e) => e.type === 'publication');
    const connecteds = () => events.filter((e) => e.type === 'connected');

    try {
      await waitFor('the connected event', () => connecteds().length === 1, { details });
      assert.deepEqual(Object.keys(connecteds()[0].data.channels).sort(), [a, b].sort());
      assert.equal(requests[0]['Last-Event-ID'], undefined, 'the first request has no Last-Event-ID');

      await publish(server, [[a, 1], [b, 101], [a, 2], [b, 102], [a, 3]]);
      await waitFor('5 publications', () => publications().length >= 5, { details });
      const first = publications().map((e) => e.data);
      assert.deepEqual(perChannel(first, a), [[1, 1], [2, 2], [3, 3]], details());
      assert.deepEqual(perChannel(first, b), [[1, 101], [2, 102]], details());
      const lastId = publications().at(-1).id;
      assert.deepEqual(lastId.split(',').map((p) => p.split(':')[0]), ['3', '2'], `the cursor is offset:epoch per channel in URL order: ${lastId}`);
      assert.equal(source.readyState, EventSource.OPEN);

      // Drop the TCP connection; hold the library's reconnect until the missed ones exist.
      proxy.cut({ hold: true });
      await waitFor('the library to notice the drop', () => errors.length >= 1, { details });
      await publish(server, [[b, 103], [a, 4], [b, 104], [a, 5], [a, 6]]);
      await waitFor('the library to reconnect by itself (held at the proxy)', () => proxy.held > 0, { details });
      proxy.resume();

      await waitFor('the connected event after the reconnect', () => connecteds().length === 2, { details });
      assert.equal(requests.length, 2, details());
      assert.equal(requests[1]['Last-Event-ID'], lastId, `the reconnect sends the last id\n${details()}`);
      const resumed = connecteds()[1].data;
      for (const ch of [a, b]) assert.equal(resumed.channels[ch].recovered, true, details());

      await waitFor('the 5 missed publications', () => publications().length >= 10, { details });
      await publish(server, [[b, 105]]);
      await waitFor('the live publication', () => publications().length >= 11, { details });
      await sleep(200);
      const after = publications().slice(5).map((e) => e.data);
      assert.deepEqual(perChannel(after, a), [[4, 4], [5, 5], [6, 6]], `exactly the missed ones, no duplicate\n${details()}`);
      assert.deepEqual(perChannel(after, b), [[3, 103], [4, 104], [5, 105]], `exactly the missed ones, then live\n${details()}`);
      assert.equal(publications().length, 11, details());
      assert.deepEqual(publications().at(-1).id.split(',').map((p) => p.split(':')[0]), ['6', '5']);
      assert.equal(opens.length, 2, details());
    } finally {
      source.close();
      await proxy.close();
    }
  });
});
