// Herald's bidirectional WebSocket endpoint (`/connection/websocket`, Centrifugo client
// protocol v2, JSON) driven by the official JavaScript SDK `centrifuge` (npm, pinned in
// ../package.json), on Node with the `ws` WebSocket implementation.
//
// Only the SDK's public API is used: connect with a JWT, subscriptions, publish, history,
// presence, join/leave, automatic reconnect with recovery, token refresh. Forced disconnects go
// through a TCP proxy (cutproxy.mjs) that drops the connection without a close frame, out of
// the SDK's control; it also records the frames, which failing assertions print.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, afterEach, before, describe, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { startCutProxy } from './cutproxy.mjs';
import { mintToken, startHerald } from './herald.mjs';
import { REALTIME_CONFIG, RECOVERY_MAX, publishNumbers, range, sleep, waitFor } from './realtime.mjs';

const channel = (prefix = '') => `${prefix}js-${randomUUID().slice(0, 12)}`;

describe('centrifuge-js (Node) against herald serve', { timeout: 240_000 }, () => {
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

  const token = (sub, ttlSeconds = 3600) => mintToken(server.hmacSecret, { sub, ttlSeconds, info: { name: sub.toUpperCase() } });

  /** A client through its own cutting proxy; records client-level events. */
  async function newClient(user, options = {}) {
    const proxy = await startCutProxy(server.url);
    proxies.push(proxy);
    const client = new Centrifuge(proxy.wsUrl, {
      websocket: WebSocket,
      ...(user === undefined ? {} : { token: token(user) }),
      ...options,
    });
    clients.push(client);
    const events = [];
    for (const name of ['connecting', 'connected', 'disconnected', 'error']) {
      client.on(name, (ctx) => events.push({ name, ctx }));
    }
    return { client, proxy, events, wire: () => proxy.wire() };
  }

  /** A subscription that records its publications and subscribed/unsubscribed/… contexts. */
  function newSub(client, ch, options = {}) {
    const sub = client.newSubscription(ch, options);
    const log = { pubs: [], subscribed: [], events: [], joins: [], leaves: [] };
    sub.on('publication', (ctx) => log.pubs.push(ctx));
    sub.on('subscribed', (ctx) => log.subscribed.push(ctx));
    sub.on('join', (ctx) => log.joins.push(ctx));
    sub.on('leave', (ctx) => log.leaves.push(ctx));
    for (const name of ['subscribing', 'unsubscribed', 'error']) sub.on(name, (ctx) => log.events.push({ name, ctx }));
    return { sub, log, offsets: () => log.pubs.map((p) => p.offset), numbers: () => log.pubs.map((p) => p.data.n) };
  }

  test('connects with a token, subscribes, receives API publications in order', async () => {
    const { client, events, wire } = await newClient('alice');
    const ch = channel();
    const { sub, log, offsets, numbers } = newSub(client, ch);
    sub.subscribe();
    client.connect();
    await client.ready(5000);
    const connected = events.find((e) => e.name === 'connected').ctx;
    assert.equal(connected.transport, 'websocket');
    assert.ok(connected.client.length > 0);
    await sub.ready(5000);
    assert.equal(log.subscribed.length, 1);
    const ctx = log.subscribed[0];
    assert.equal(ctx.recoverable, true, 'history is on in the default namespace');
    assert.equal(ctx.wasRecovering, false);
    assert.equal(ctx.streamPosition.offset, 0);
    assert.ok(ctx.streamPosition.epoch.length > 0);

    const results = await publishNumbers(server, ch, range(1, 30));
    assert.equal(results.at(-1).offset, 30);
    await waitFor('30 publications', () => log.pubs.length >= 30, { details: wire });
    assert.deepEqual(numbers(), range(1, 30));
    assert.deepEqual(offsets(), range(1, 30));
    assert.equal(log.pubs[0].channel, ch);
    assert.equal(log.pubs[0].info, undefined, 'server-API publications carry no client info');
    assert.deepEqual(events.map((e) => e.name), ['connecting', 'connected'], wire());
  });

  test('client-side publish (allowed namespace) reaches another client with info', async () => {
    const ch = channel('chat:');
    const alice = await newClient('alice');
    const bob = await newClient('bob');
    const a = newSub(alice.client, ch);
    const b = newSub(bob.client, ch);
    a.sub.subscribe();
    b.sub.subscribe();
    alice.client.connect();
    bob.client.connect();
    await Promise.all([a.sub.ready(5000), b.sub.ready(5000)]);
    const bobClientId = bob.events.find((e) => e.name === 'connected').ctx.client;

    await b.sub.publish({ text: 'hi from bob' });
    await waitFor('alice gets bob\'s publication', () => a.log.pubs.length >= 1, { details: alice.wire });
    const pub = a.log.pubs[0];
    assert.deepEqual(pub.data, { text: 'hi from bob' });
    assert.equal(pub.offset, 1);
    assert.equal(pub.info.user, 'bob');
    assert.equal(pub.info.client, bobClientId);
    assert.deepEqual(pub.info.connInfo, { name: 'BOB' });
    // Bob gets his own publication too.
    await waitFor('bob gets his own publication', () => b.log.pubs.length >= 1, { details: bob.wire });

    // The default namespace does not allow client publishing: 103 permission denied.
    const news = newSub(alice.client, channel());
    news.sub.subscribe();
    await news.sub.ready(5000);
    await assert.rejects(news.sub.publish({ x: 1 }), (err) => err.code === 103);
  });

  test('sub.history({limit, since}), presence() and presenceStats()', async () => {
    const ch = channel('chat:');
    const alice = await newClient('alice');
    const bob = await newClient('bob');
    const a = newSub(alice.client, ch);
    const b = newSub(bob.client, ch);
    a.sub.subscribe();
    b.sub.subscribe();
    alice.client.connect();
    bob.client.connect();
    await Promise.all([a.sub.ready(5000), b.sub.ready(5000)]);

    const results = await publishNumbers(server, ch, range(1, 5));
    const { epoch } = results[0];
    const firstThree = await a.sub.history({ limit: 3 });
    assert.deepEqual(firstThree.publications.map((p) => p.offset), [1, 2, 3]);
    assert.deepEqual(firstThree.publications.map((p) => p.data), [{ n: 1 }, { n: 2 }, { n: 3 }]);
    assert.equal(firstThree.offset, 5);
    assert.equal(firstThree.epoch, epoch);
    const rest = await a.sub.history({ limit: 10, since: { offset: 3, epoch } });
    assert.deepEqual(rest.publications.map((p) => p.offset), [4, 5]);
    const top = await a.sub.history({});
    assert.deepEqual(top.publications, []);
    assert.equal(top.offset, 5);
    assert.equal(top.epoch, epoch);

    const presence = await a.sub.presence();
    const infos = Object.values(presence.clients);
    assert.deepEqual(infos.map((i) => i.user).sort(), ['alice', 'bob']);
    const bobInfo = infos.find((i) => i.user === 'bob');
    assert.equal(bobInfo.client, bob.events.find((e) => e.name === 'connected').ctx.client);
    assert.deepEqual(bobInfo.connInfo, { name: 'BOB' });
    assert.deepEqual(await a.sub.presenceStats(), { numClients: 2, numUsers: 2 });

    // History needs a namespace that allows it to subscribers: the default one does not (103).
    const news = newSub(alice.client, channel());
    news.sub.subscribe();
    await news.sub.ready(5000);
    await assert.rejects(news.sub.history({ limit: 1 }), (err) => err.code === 103);
  });

  test('join and leave events', async () => {
    const ch = channel('chat:');
    const alice = await newClient('alice');
    const a = newSub(alice.client, ch, { joinLeave: true });
    a.sub.subscribe();
    alice.client.connect();
    await a.sub.ready(5000);

    const bob = await newClient('bob');
    const b = newSub(bob.client, ch, { joinLeave: true });
    b.sub.subscribe();
    bob.client.connect();
    await b.sub.ready(5000);
    const bobClientId = bob.events.find((e) => e.name === 'connected').ctx.client;
    await waitFor('alice sees bob join', () => a.log.joins.find((j) => j.info.user === 'bob'), { details: alice.wire });
    const join = a.log.joins.find((j) => j.info.user === 'bob');
    assert.equal(join.channel, ch);
    assert.equal(join.info.client, bobClientId);
    assert.deepEqual(join.info.connInfo, { name: 'BOB' });

    b.sub.unsubscribe();
    await waitFor('alice sees bob leave', () => a.log.leaves.find((l) => l.info.user === 'bob'), { details: alice.wire });
    assert.equal(a.log.leaves.find((l) => l.info.user === 'bob').info.client, bobClientId);
    assert.deepEqual(await a.sub.presenceStats(), { numClients: 1, numUsers: 1 });
  });

  test('recovers exactly the missed publications after a forced disconnect', async () => {
    const { client, proxy, events, wire } = await newClient('alice');
    const ch = channel();
    await publishNumbers(server, ch, [1]); // published before the subscribe: not delivered
    const { sub, log, offsets, numbers } = newSub(client, ch);
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    assert.equal(log.subscribed[0].streamPosition.offset, 1);
    await publishNumbers(server, ch, range(2, 4));
    await waitFor('live publications 2..4', () => log.pubs.length >= 3, { details: wire });
    assert.deepEqual(offsets(), [2, 3, 4]);

    // Cut the TCP connection under the SDK; its reconnect waits at the proxy.
    proxy.cut({ hold: true });
    await waitFor('the SDK to notice the drop', () => events.some((e) => e.name === 'connecting' && e.ctx.code === 1), { details: wire });
    const missed = await publishNumbers(server, ch, range(5, 12));
    assert.equal(missed.at(-1).offset, 12);
    await waitFor('the SDK to reconnect (held at the proxy)', () => proxy.held > 0, { details: wire });
    proxy.resume();

    await waitFor('the resubscribe', () => log.subscribed.length >= 2, { details: wire });
    const ctx = log.subscribed[1];
    assert.equal(ctx.wasRecovering, true, wire());
    assert.equal(ctx.recovered, true, wire());
    assert.equal(ctx.hasRecoveredPublications, true);
    await waitFor('the missed publications', () => log.pubs.length >= 11, { details: wire });
    await publishNumbers(server, ch, [13]);
    await waitFor('the next live publication', () => log.pubs.length >= 12, { details: wire });
    await sleep(200); // a duplicate would arrive now
    assert.deepEqual(offsets(), range(2, 13), `no gap, no duplicate\n${wire()}`);
    assert.deepEqual(numbers(), range(2, 13));

    // On the wire: the SDK asked to recover from offset 4 with the epoch it was given.
    const resubscribe = proxy.frames.find((f) => f.dir === 'C>S' && f.conn === 2 && f.text.includes('"subscribe"'));
    const command = resubscribe.text.split('\n').map((line) => JSON.parse(line)).find((c) => c.subscribe);
    assert.equal(command.subscribe.recover, true);
    assert.equal(command.subscribe.offset, 4);
    assert.equal(command.subscribe.epoch, log.subscribed[0].streamPosition.epoch);
    assert.deepEqual(events.map((e) => e.name), ['connecting', 'connected', 'connecting', 'connected'], wire());
  });

  test(`recovery impossible (more than recovery_max_publications = ${RECOVERY_MAX} missed): recovered false`, async () => {
    const { client, proxy, events, wire } = await newClient('alice');
    const ch = channel();
    const { sub, log, offsets } = newSub(client, ch);
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    await publishNumbers(server, ch, range(1, 3));
    await waitFor('live publications 1..3', () => log.pubs.length >= 3, { details: wire });

    proxy.cut({ hold: true });
    await waitFor('the SDK to notice the drop', () => events.some((e) => e.name === 'connecting' && e.ctx.code === 1), { details: wire });
    const missed = RECOVERY_MAX + 5;
    await publishNumbers(server, ch, range(4, 3 + missed));
    proxy.resume();

    await waitFor('the resubscribe', () => log.subscribed.length >= 2, { details: wire });
    const ctx = log.subscribed[1];
    assert.equal(ctx.wasRecovering, true, wire());
    assert.equal(ctx.recovered, false, wire());
    assert.equal(ctx.hasRecoveredPublications, false);
    assert.equal(ctx.streamPosition.offset, 3 + missed, 'the position jumps to the stream top');
    await publishNumbers(server, ch, [4 + missed]);
    await waitFor('the next live publication', () => log.pubs.length >= 4, { details: wire });
    await sleep(200);
    assert.deepEqual(offsets(), [1, 2, 3, 4 + missed], `nothing of the gap is delivered\n${wire()}`);
  });

  test('subscription tokens: private channel needs one; a 3-second token is refreshed by the SDK', async () => {
    const { client, proxy, wire } = await newClient('alice');
    client.connect();
    await client.ready(5000);

    // Without a token the private namespace refuses the subscription (103).
    const refused = newSub(client, channel('private:'));
    refused.sub.subscribe();
    await waitFor('the refusal', () => refused.log.events.some((e) => e.name === 'error' || e.name === 'unsubscribed'), { details: wire });
    const failure = refused.log.events.find((e) => e.name === 'error' || e.name === 'unsubscribed');
    assert.equal(failure.ctx.error?.code ?? failure.ctx.code, 103, JSON.stringify(failure.ctx));
    refused.sub.unsubscribe();

    // With getToken the SDK fetches a subscription token for the channel, and a new one
    // (sent as sub_refresh) before each expires: the subscription lives on past 3 s.
    const ch = channel('private:');
    const asked = [];
    const { sub, log } = newSub(client, ch, {
      getToken: async (ctx) => {
        asked.push(ctx.channel);
        return mintToken(server.hmacSecret, { sub: 'alice', channel: ctx.channel, ttlSeconds: 3, info: { seat: 7 } });
      },
    });
    sub.subscribe();
    await sub.ready(5000);
    const presence = await sub.presence();
    assert.deepEqual(Object.values(presence.clients)[0].chanInfo, { seat: 7 }, 'chan_info from the token');
    let n = 0;
    const started = Date.now();
    while (Date.now() - started < 8000) {
      await publishNumbers(server, ch, [++n]);
      await sleep(250);
    }
    await waitFor('every publication', () => log.pubs.length >= n, { details: wire });
    assert.deepEqual(log.pubs.map((p) => p.data.n), range(1, n), wire());
    assert.ok(asked.length >= 3, `the SDK refreshed its subscription token (${asked.length} tokens)`);
    assert.ok(asked.every((c) => c === ch));
    assert.equal(log.subscribed.length, 1, 'never resubscribed: sub_refresh kept it alive');
    const refreshes = proxy.frames.filter((f) => f.dir === 'C>S' && f.text.includes('"sub_refresh"'));
    assert.ok(refreshes.length >= 2, wire());
  });

  test('token refresh: a 5-second token with getToken keeps the connection past expiry', async () => {
    // No initial token: the SDK gets every token (the first one and the refreshes) from getToken.
    let tokens = 0;
    const { client, proxy, events, wire } = await newClient(undefined, {
      getToken: async () => {
        tokens++;
        return token('alice', 5);
      },
    });
    const ch = channel('chat:');
    const { sub, log, offsets } = newSub(client, ch);
    sub.subscribe();
    // Connect half-way through a wall-clock second. The server's ConnectResult says
    // `expires: true, ttl: exp - now` in whole seconds, and the SDK sends `refresh` ttl seconds
    // after the reply: about 0.5 s after `exp` has passed. A server must accept that (the
    // reference server closes an unrefreshed connection only 25 s after `exp`).
    await sleep((1500 - (Date.now() % 1000)) % 1000);
    client.connect();
    const tokenWire = () => `--- connect/refresh replies and close frames ---\n${proxy.frames
      .filter((f) => /"(connect|refresh)"/.test(f.text) || f.kind === 'close')
      .map((f) => `#${f.conn} ${f.t}ms ${f.dir} ${f.kind}${f.code ? ` ${f.code}` : ''} ${f.text.replace(/"token":"[^"]+"/, '"token":"…"')}`)
      .join('\n')}\n--- last frames ---\n${wire()}`;
    await sub.ready(5000);
    // Traffic throughout, as a real app would have: publications from the server API and
    // presence_stats calls from the client, for 12 s (two refreshes).
    const started = Date.now();
    let n = 0;
    let calls = 0;
    while (Date.now() - started < 12_000 && events.length === 2) {
      await publishNumbers(server, ch, [++n]);
      try {
        await sub.presenceStats();
        calls++;
      } catch {
        // reported below through the events
      }
      await sleep(100);
    }
    await waitFor(`all ${n} publications`, () => log.pubs.length >= n || events.length > 2, { details: tokenWire });
    const refreshes = proxy.frames.filter((f) => f.dir === 'C>S' && f.text.includes('"refresh"'));
    assert.deepEqual(events.map((e) => `${e.name}${e.ctx.code ? ` ${e.ctx.code} ${e.ctx.reason}` : ''}`), ['connecting', 'connected'],
      `the connection stays up across token expiry\n${tokenWire()}`);
    assert.ok(tokens >= 3, `getToken called ${tokens} times in 12 s with 5 s tokens`);
    assert.ok(refreshes.length >= 2, `refresh commands on the wire: ${refreshes.length}`);
    assert.equal(proxy.connections, 1, 'one connection, never re-established');
    assert.ok(calls > 20, `${calls} client calls`);
    assert.deepEqual(offsets(), range(1, n));
  });

  test('an expired token at connect: 109, getToken, then connected', async () => {
    let tokens = 0;
    const { client, events, wire } = await newClient(undefined, {
      token: token('alice', -10),
      getToken: async () => {
        tokens++;
        return token('alice', 3600);
      },
    });
    client.connect();
    await client.ready(10_000);
    assert.equal(tokens, 1);
    assert.ok(wire().includes('"code":109'), wire());
    assert.equal(events.at(-1).name, 'connected');
  });

  test('a forged token: disconnected with 3500, no reconnect', async () => {
    const { client, proxy, events, wire } = await newClient(undefined, { token: mintToken('wrong-secret-'.repeat(4), { sub: 'mallory', ttlSeconds: 60 }) });
    client.connect();
    await waitFor('disconnected', () => events.find((e) => e.name === 'disconnected'), { details: wire });
    const { ctx } = events.find((e) => e.name === 'disconnected');
    assert.equal(ctx.code, 3500, wire());
    await sleep(1000);
    assert.equal(proxy.connections, 1, 'no reconnect after 3500');
    assert.equal(client.state, 'disconnected');
  });
});
