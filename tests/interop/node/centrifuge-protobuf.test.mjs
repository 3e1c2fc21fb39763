// Herald's bidirectional WebSocket endpoint in the Protobuf encoding of the Centrifugo client
// protocol v2, driven by the official JavaScript SDK's Protobuf build
// (`centrifuge/build/protobuf`, npm, pinned in ../package.json) on Node with `ws`.
//
// The SDK selects Protobuf with the WebSocket subprotocol `centrifuge-protobuf`; the server
// must echo it and then speak length-delimited Protobuf in binary frames (pings are a single
// zero byte). Data travels as bytes: JSON published over the HTTP API arrives as its UTF-8
// text, and JSON bytes published by a Protobuf client reach JSON clients as JSON.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, afterEach, before, describe, test } from 'node:test';

import { Centrifuge as JsonCentrifuge } from 'centrifuge';
import { Centrifuge } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';

import { startCutProxy } from './cutproxy.mjs';
import { mintToken, startHerald } from './herald.mjs';
import { REALTIME_CONFIG, publishNumbers, range, sleep, waitFor } from './realtime.mjs';

const channel = (prefix = '') => `${prefix}pb-${randomUUID().slice(0, 12)}`;
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const json = (bytes) => JSON.parse(decoder.decode(bytes));

describe('centrifuge-js Protobuf (Node) against herald serve', { timeout: 120_000 }, () => {
  let server;
  let clients = [];
  let proxies = [];

  before(async () => {
    server = await startHerald({ extraConfig: REALTIME_CONFIG });
  });

  afterEach(async () => {
    for (const client of clients) client.disconnect();
    clients = [];
    for (const proxy of proxies) await proxy.close();
    proxies = [];
  });

  after(async () => {
    if (server) assert.equal(await server.stop(), 0);
  });

  const token = (sub) => mintToken(server.hmacSecret, { sub, ttlSeconds: 3600, info: { name: sub.toUpperCase() } });

  async function newClient(user, { Sdk = Centrifuge } = {}) {
    const proxy = await startCutProxy(server.url);
    proxies.push(proxy);
    const client = new Sdk(proxy.wsUrl, { websocket: WebSocket, token: token(user) });
    clients.push(client);
    const events = [];
    for (const name of ['connecting', 'connected', 'disconnected', 'error']) {
      client.on(name, (ctx) => events.push({ name, ctx }));
    }
    return { client, proxy, events, wire: () => proxy.wire() };
  }

  function newSub(client, ch, options = {}) {
    const sub = client.newSubscription(ch, options);
    const log = { pubs: [], subscribed: [], joins: [] };
    sub.on('publication', (ctx) => log.pubs.push(ctx));
    sub.on('subscribed', (ctx) => log.subscribed.push(ctx));
    sub.on('join', (ctx) => log.joins.push(ctx));
    return { sub, log, offsets: () => log.pubs.map((p) => p.offset) };
  }

  test('negotiates centrifuge-protobuf, receives publications in binary frames, answers pings', async () => {
    const { client, proxy, events, wire } = await newClient('alice');
    const ch = channel();
    const { sub, log, offsets } = newSub(client, ch);
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    assert.equal(log.subscribed[0].recoverable, true);
    assert.ok(log.subscribed[0].streamPosition.epoch.length > 0);

    const upgrade = proxy.frames.find((f) => f.dir === 'S>C' && f.kind === 'http');
    assert.match(upgrade.headers, /^sec-websocket-protocol: centrifuge-protobuf$/im, 'the subprotocol is echoed');

    await publishNumbers(server, ch, range(1, 10));
    await waitFor('10 publications', () => log.pubs.length >= 10, { details: wire });
    assert.deepEqual(offsets(), range(1, 10));
    assert.ok(log.pubs[0].data instanceof Uint8Array, 'Protobuf data is bytes');
    assert.deepEqual(log.pubs.map((p) => json(p.data).n), range(1, 10));

    const serverFrames = proxy.frames.filter((f) => f.dir === 'S>C' && (f.kind === 'text' || f.kind === 'binary'));
    assert.ok(serverFrames.length > 0);
    assert.deepEqual([...new Set(serverFrames.map((f) => f.kind))], ['binary'], 'no text frames in Protobuf mode');

    // ping_interval is 3 s with a 3 s pong timeout: outlive two pings, then still receive.
    await sleep(7000);
    assert.ok(proxy.frames.some((f) => f.dir === 'S>C' && f.kind === 'binary' && f.text === '00'), 'a ping is one zero byte');
    await publishNumbers(server, ch, [11]);
    await waitFor('the 11th publication', () => log.pubs.length >= 11, { details: wire });
    assert.deepEqual(events.map((e) => e.name), ['connecting', 'connected'], wire());
  });

  test('client publish in Protobuf reaches Protobuf and JSON subscribers; history and presence', async () => {
    const ch = channel('chat:');
    const alice = await newClient('alice');
    const bob = await newClient('bob', { Sdk: JsonCentrifuge });
    const a = newSub(alice.client, ch, { joinLeave: true });
    const b = newSub(bob.client, ch);
    a.sub.subscribe();
    alice.client.connect();
    await a.sub.ready(5000);
    b.sub.subscribe();
    bob.client.connect();
    await b.sub.ready(5000);
    await waitFor('alice sees bob join', () => a.log.joins.find((j) => j.info.user === 'bob'), { details: alice.wire });
    assert.deepEqual(json(a.log.joins.find((j) => j.info.user === 'bob').info.connInfo), { name: 'BOB' });

    await a.sub.publish(encoder.encode(JSON.stringify({ text: 'hi from protobuf' })));
    await waitFor('bob (JSON) gets it', () => b.log.pubs.length >= 1, { details: bob.wire });
    assert.deepEqual(b.log.pubs[0].data, { text: 'hi from protobuf' }, 'JSON bytes stay JSON');
    assert.equal(b.log.pubs[0].info.user, 'alice');
    await waitFor('alice gets her own', () => a.log.pubs.length >= 1, { details: alice.wire });
    assert.equal(a.log.pubs[0].info.user, 'alice');
    assert.deepEqual(json(a.log.pubs[0].info.connInfo), { name: 'ALICE' });

    await b.sub.publish({ text: 'hi from json' });
    await waitFor('alice (Protobuf) gets bob\'s', () => a.log.pubs.length >= 2, { details: alice.wire });
    assert.deepEqual(json(a.log.pubs[1].data), { text: 'hi from json' });

    const history = await a.sub.history({ limit: 10 });
    assert.deepEqual(history.publications.map((p) => p.offset), [1, 2]);
    assert.deepEqual(json(history.publications[1].data), { text: 'hi from json' });
    const since = await a.sub.history({ limit: 10, since: { offset: 1, epoch: history.epoch } });
    assert.deepEqual(since.publications.map((p) => p.offset), [2]);

    const presence = await a.sub.presence();
    assert.deepEqual(Object.values(presence.clients).map((i) => i.user).sort(), ['alice', 'bob']);
    assert.deepEqual(await a.sub.presenceStats(), { numClients: 2, numUsers: 2 });

    // Errors are Protobuf errors with the protocol's codes: the default namespace forbids
    // client publishing (103).
    const news = newSub(alice.client, channel());
    news.sub.subscribe();
    await news.sub.ready(5000);
    await assert.rejects(news.sub.publish(encoder.encode('{}')), (err) => err.code === 103);
  });

  test('recovers exactly the missed publications after a forced disconnect', async () => {
    const { client, proxy, events, wire } = await newClient('alice');
    const ch = channel();
    const { sub, log, offsets } = newSub(client, ch);
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    await publishNumbers(server, ch, range(1, 3));
    await waitFor('live 1..3', () => log.pubs.length >= 3, { details: wire });

    proxy.cut({ hold: true });
    await waitFor('the SDK to notice the drop', () => events.some((e) => e.name === 'connecting' && e.ctx.code === 1), { details: wire });
    await publishNumbers(server, ch, range(4, 9));
    await waitFor('the SDK to reconnect (held at the proxy)', () => proxy.held > 0, { details: wire });
    proxy.resume();

    await waitFor('the resubscribe', () => log.subscribed.length >= 2, { details: wire });
    assert.equal(log.subscribed[1].wasRecovering, true);
    assert.equal(log.subscribed[1].recovered, true, wire());
    await waitFor('the missed publications', () => log.pubs.length >= 9, { details: wire });
    await publishNumbers(server, ch, [10]);
    await waitFor('the next live one', () => log.pubs.length >= 10, { details: wire });
    await sleep(200);
    assert.deepEqual(offsets(), range(1, 10), `no gap, no duplicate\n${wire()}`);
    assert.deepEqual(log.pubs.map((p) => json(p.data).n), range(1, 10));
  });
});
