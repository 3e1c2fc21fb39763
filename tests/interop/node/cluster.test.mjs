// Two herald nodes on one Redis (storage.engine = "redis", same API key and HMAC secret), driven
// by the official JavaScript SDK `centrifuge` (npm, pinned in ../package.json) on Node with `ws`.
//
// The SDK connects through a TCP proxy (cutproxy.mjs) standing for a load balancer in front of
// the two nodes. Node A is SIGKILLed under the client; the proxy then sends new connections to
// node B (held until the test has published what the client must recover). The SDK's own
// reconnect must resubscribe on B with recovery from the position A gave it, and get every
// publication made meanwhile through B, in order, exactly once.
//
// The test starts its own redis-server (redis.mjs) on a free port.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { startCutProxy } from './cutproxy.mjs';
import { mintToken, randomToken, startHerald } from './herald.mjs';
import { REALTIME_CONFIG, api, publishNumbers, range, sleep, waitFor } from './realtime.mjs';
import { startRedis } from './redis.mjs';

describe('centrifuge-js across two herald nodes sharing Redis', { timeout: 120_000 }, () => {
  let redis;
  let nodeA;
  let nodeB;
  let proxy;
  let client;

  before(async () => {
    redis = await startRedis();
    const shared = {
      engine: 'redis',
      apiKey: randomToken(32),
      hmacSecret: randomToken(48),
      extraConfig: `${REALTIME_CONFIG}
[redis]
addresses = ["${redis.url}"]
prefix = "herald-node-interop-${randomUUID().slice(0, 8)}"
`,
    };
    nodeA = await startHerald({ ...shared, name: 'node-a' });
    nodeB = await startHerald({ ...shared, name: 'node-b' });
  });

  after(async () => {
    client?.disconnect();
    await proxy?.close();
    // Node A was SIGKILLed by the test (stop() is then a no-op); B must stop cleanly.
    if (nodeB) assert.equal(await nodeB.stop(), 0);
    if (nodeA) await nodeA.stop();
    await redis?.stop();
  });

  test('both nodes list each other in info', async () => {
    for (const node of [nodeA, nodeB]) {
      const names = await waitFor(`both nodes in ${node.url}'s info`, async () => {
        const { nodes } = await api(node, 'info', {});
        const names = nodes.map((n) => n.name).sort();
        return names.length === 2 ? names : null;
      });
      assert.deepEqual(names, ['node-a', 'node-b']);
    }
  });

  test('a client of a SIGKILLed node reconnects to the other and recovers what was published there', async () => {
    proxy = await startCutProxy(nodeA.url);
    client = new Centrifuge(proxy.wsUrl, {
      websocket: WebSocket,
      token: mintToken(nodeA.hmacSecret, { sub: 'alice', ttlSeconds: 3600 }),
      minReconnectDelay: 100,
      maxReconnectDelay: 1000,
    });
    const events = [];
    for (const name of ['connecting', 'connected', 'disconnected', 'error']) {
      client.on(name, (ctx) => events.push({ name, ctx }));
    }
    const wire = () => `${proxy.wire()}\n--- node A ---${nodeA.diagnostics()}\n--- node B ---${nodeB.diagnostics()}`;
    const ch = `cluster-${randomUUID().slice(0, 12)}`;
    const sub = client.newSubscription(ch);
    const pubs = [];
    const subscribed = [];
    sub.on('publication', (ctx) => pubs.push(ctx));
    sub.on('subscribed', (ctx) => subscribed.push(ctx));
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    assert.equal(subscribed[0].recoverable, true, 'history is on in the default namespace');
    const { epoch } = subscribed[0].streamPosition;

    // Publications through either node reach the client on A, in one order.
    await publishNumbers(nodeA, ch, range(1, 3));
    await publishNumbers(nodeB, ch, range(4, 5));
    await waitFor('publications 1..5 on node A', () => pubs.length >= 5, { details: wire });
    assert.deepEqual(pubs.map((p) => p.offset), range(1, 5));

    // Node A dies; the balancer sends the SDK's reconnect to B, held until we have published.
    proxy.retarget(nodeB.url, { hold: true });
    await nodeA.kill();
    await waitFor('the SDK to notice the lost connection', () => events.filter((e) => e.name === 'connecting').length >= 2, { details: wire });
    const missed = await publishNumbers(nodeB, ch, range(6, 15));
    assert.deepEqual(missed.map((r) => r.offset), range(6, 15), 'B continues the channel\'s offsets');
    assert.ok(missed.every((r) => r.epoch === epoch), 'same epoch on both nodes');
    await waitFor('the SDK to reconnect (held at the proxy)', () => proxy.held > 0, { details: wire });
    proxy.resume();

    await waitFor('the resubscribe on node B', () => subscribed.length >= 2, { timeoutMs: 15_000, details: wire });
    const ctx = subscribed[1];
    assert.equal(ctx.wasRecovering, true, wire());
    assert.equal(ctx.recovered, true, wire());
    assert.equal(ctx.streamPosition.epoch, epoch);
    await waitFor('the publications made while reconnecting', () => pubs.length >= 15, { details: wire });
    await publishNumbers(nodeB, ch, [16]);
    await waitFor('the next live publication', () => pubs.length >= 16, { details: wire });
    await sleep(300); // a duplicate would arrive now
    assert.deepEqual(pubs.map((p) => p.offset), range(1, 16), `in order, no gap, no duplicate\n${wire()}`);
    assert.deepEqual(pubs.map((p) => p.data.n), range(1, 16));
    assert.equal(proxy.upstreams.at(-1), nodeB.url, 'the client is now on node B');
    assert.deepEqual(events.map((e) => e.name), ['connecting', 'connected', 'connecting', 'connected'], wire());
  });
});
