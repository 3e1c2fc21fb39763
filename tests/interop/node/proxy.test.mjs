// The backend proxy judged by the official SDK: `centrifuge` (npm) calls `rpc`, subscribes to
// a channel its backend must approve, and publishes through a backend that rewrites the data.
// The backend is a plain Node HTTP server answering in Centrifugo's proxy format.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, describe, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { mintToken, startHerald } from './herald.mjs';
import { waitFor } from './realtime.mjs';

async function startBackend() {
  const seen = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      const request = JSON.parse(body);
      seen.push({ path: req.url, request });
      let answer;
      if (req.url === '/rpc') {
        answer = request.method === 'sum'
          ? { result: { data: { sum: request.data.a + request.data.b } } }
          : { error: { code: 4040, message: 'no such method' } };
      } else if (req.url === '/subscribe') {
        answer = request.channel === 'app:allowed'
          ? { result: { info: { seat: 3 } } }
          : { error: { code: 4003, message: 'not yours' } };
      } else if (req.url === '/publish') {
        answer = { result: { data: { ...request.data, approved: true } } };
      } else {
        answer = { error: { code: 4000, message: 'unknown' } };
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, seen, close: () => new Promise((r) => server.close(r)) };
}

describe('centrifuge-js through the backend proxy', { timeout: 60_000 }, () => {
  let backend;
  let server;
  let client;

  before(async () => {
    backend = await startBackend();
    server = await startHerald({
      extraConfig: `
[proxy]
rpc_endpoint = "${backend.url}/rpc"
subscribe_endpoint = "${backend.url}/subscribe"
publish_endpoint = "${backend.url}/publish"

[[namespaces]]
name = "app"
proxy_subscribe = true
proxy_publish = true
history_size = 10
history_ttl = "1h"
`,
    });
    client = new Centrifuge(server.wsUrl, { websocket: WebSocket, token: mintToken(server.hmacSecret, { sub: 'carol', ttlSeconds: 600 }) });
    client.connect();
    await client.ready(5000);
  });

  after(async () => {
    if (client) client.disconnect();
    if (server) assert.equal(await server.stop(), 0);
    if (backend) await backend.close();
  });

  test('rpc is answered by the backend, errors keep its code', async () => {
    const reply = await client.rpc('sum', { a: 20, b: 22 });
    assert.deepEqual(reply.data, { sum: 42 });
    await assert.rejects(client.rpc('nope', {}), (err) => err.code === 4040 && err.message === 'no such method');
    const rpc = backend.seen.find((s) => s.path === '/rpc');
    assert.equal(rpc.request.user, 'carol');
    assert.equal(rpc.request.transport, 'websocket');
  });

  test('subscribe and publish decided and rewritten by the backend', async () => {
    const refused = client.newSubscription('app:other');
    const errors = [];
    refused.on('error', (ctx) => errors.push(ctx.error));
    refused.on('unsubscribed', (ctx) => errors.push(ctx));
    refused.subscribe();
    await waitFor('the refusal', () => errors.length > 0);
    assert.equal(errors[0].code, 4003, JSON.stringify(errors));
    refused.unsubscribe();

    const sub = client.newSubscription('app:allowed');
    const pubs = [];
    sub.on('publication', (ctx) => pubs.push(ctx));
    sub.subscribe();
    await sub.ready(5000);
    await sub.publish({ text: 'hi' });
    await waitFor('the rewritten publication', () => pubs.length >= 1);
    assert.deepEqual(pubs[0].data, { text: 'hi', approved: true });
    assert.equal(pubs[0].info.user, 'carol');
    assert.deepEqual(pubs[0].info.chanInfo, { seat: 3 });
  });
});
