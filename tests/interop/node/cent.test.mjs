// Herald's server HTTP API driven by the npm client `cent.js` (pinned in ../package.json).
//
// Only cent.js's public API is used. Note: cent.js does not check HTTP status; it parses every
// body as JSON and throws `CentException` when the body has `error` (the exception's message is
// not the server's, so only the type can be checked).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { CentClient, CentException } from 'cent.js';

import { startHerald } from './herald.mjs';

const channel = (prefix = '') => `${prefix}it-${randomUUID().slice(0, 12)}`;

describe('cent.js against herald serve', { timeout: 120_000 }, () => {
  let server;
  let cent;

  before(async () => {
    server = await startHerald();
    cent = new CentClient({ url: server.apiUrl, apiKey: server.apiKey });
  });

  after(async () => {
    // Graceful shutdown: SIGTERM → exit code 0 within 10 s.
    if (server) assert.equal(await server.stop(), 0);
  });

  test('publish returns offset and epoch; offsets grow by one', async () => {
    const ch = channel();
    const first = await cent.publish({ channel: ch, data: { text: 'hello' } });
    assert.equal(first.offset, 1);
    assert.equal(typeof first.epoch, 'string');
    assert.ok(first.epoch.length > 0);
    for (let n = 2; n <= 4; n++) {
      const result = await cent.publish({ channel: ch, data: { n } });
      assert.deepEqual(result, { offset: n, epoch: first.epoch });
    }
  });

  test('getHistory with limit, since and reverse', async () => {
    const ch = channel();
    let epoch;
    for (let n = 1; n <= 5; n++) {
      const result = await cent.publish({ channel: ch, data: { n }, tags: { n: String(n) } });
      assert.equal(result.offset, n);
      epoch ??= result.epoch;
    }

    const all = await cent.getHistory({ channel: ch, limit: -1 });
    assert.deepEqual(all.publications.map((p) => p.offset), [1, 2, 3, 4, 5]);
    assert.deepEqual(all.publications.map((p) => p.data), [1, 2, 3, 4, 5].map((n) => ({ n })));
    assert.deepEqual(all.publications.map((p) => p.tags), [1, 2, 3, 4, 5].map((n) => ({ n: String(n) })));
    assert.equal(all.offset, 5);
    assert.equal(all.epoch, epoch);

    const firstTwo = await cent.getHistory({ channel: ch, limit: 2 });
    assert.deepEqual(firstTwo.publications.map((p) => p.offset), [1, 2]);

    const positionOnly = await cent.getHistory({ channel: ch });
    assert.deepEqual(positionOnly.publications, []);
    assert.equal(positionOnly.offset, 5);
    assert.equal(positionOnly.epoch, epoch);

    const page = await cent.getHistory({ channel: ch, limit: 2, since: { offset: 2, epoch } });
    assert.deepEqual(page.publications.map((p) => p.offset), [3, 4]);
    assert.deepEqual(page.publications.map((p) => p.data), [{ n: 3 }, { n: 4 }]);

    const back = await cent.getHistory({ channel: ch, limit: 2, reverse: true, since: { offset: 4, epoch } });
    assert.deepEqual(back.publications.map((p) => p.offset), [3, 2]);

    const caughtUp = await cent.getHistory({ channel: ch, limit: -1, since: { offset: 5, epoch } });
    assert.deepEqual(caughtUp.publications, []);
  });

  test('broadcast to several channels', async () => {
    const channels = [channel(), channel(), channel('room:')];
    const result = await cent.broadcast({ channels, data: { text: 'to all' } });
    // The server answers {responses: [...]} (cent.js's typing says an array; the wire is what counts).
    assert.equal(result.responses.length, channels.length);
    for (const [i, ch] of channels.entries()) {
      const reply = result.responses[i];
      assert.equal(reply.error, undefined);
      assert.equal(reply.result.offset, 1);
      const history = await cent.getHistory({ channel: ch, limit: -1 });
      assert.deepEqual(history.publications.map((p) => p.data), [{ text: 'to all' }]);
      assert.equal(history.epoch, reply.result.epoch);
    }
  });

  test('getInfo lists this node', async () => {
    const info = await cent.getInfo();
    assert.ok(Array.isArray(info.nodes) && info.nodes.length >= 1);
    const [node] = info.nodes;
    assert.equal(typeof node.uid, 'string');
    assert.ok(node.uid.length > 0);
    assert.ok(node.name.length > 0);
    assert.equal(typeof node.num_clients, 'number');
  });

  test('presence, presence stats and channels on the presence namespace', async () => {
    const ch = channel('room:');
    assert.deepEqual(await cent.getPresence({ channel: ch }), { presence: {} });
    assert.deepEqual(await cent.getPresenceStats({ channel: ch }), { num_clients: 0, num_users: 0 });
    const channels = await cent.getChannels({ pattern: 'room:*' });
    assert.equal(typeof channels.channels, 'object');
  });

  test('removeHistory keeps the stream position', async () => {
    const ch = channel();
    const { epoch } = await cent.publish({ channel: ch, data: { n: 1 } });
    await cent.publish({ channel: ch, data: { n: 2 } });
    await cent.removeHistory({ channel: ch });
    const history = await cent.getHistory({ channel: ch, limit: -1 });
    assert.deepEqual(history.publications, []);
    assert.equal(history.offset, 2);
    assert.equal(history.epoch, epoch);
  });

  test('unknown namespace rejects with CentException', async () => {
    await assert.rejects(cent.publish({ channel: 'nosuchns:x', data: { x: 1 } }), CentException);
    await assert.rejects(cent.getHistory({ channel: 'nosuchns:x', limit: -1 }), CentException);
  });

  test('stale epoch rejects with CentException', async () => {
    const ch = channel();
    await cent.publish({ channel: ch, data: { n: 1 } });
    await assert.rejects(cent.getHistory({ channel: ch, limit: -1, since: { offset: 1, epoch: 'stale-epoch' } }), CentException);
  });

  test('wrong API key is refused', async () => {
    // The server answers 401 with an empty body; cent.js then fails parsing it as JSON.
    const wrong = new CentClient({ url: server.apiUrl, apiKey: 'x'.repeat(32) });
    await assert.rejects(wrong.publish({ channel: channel(), data: { x: 1 } }));
  });
});
