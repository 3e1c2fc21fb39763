// Push notifications end to end: a real `herald serve` with `[push]` on, sending to
// `herald-pushmock` (the APNs and FCM HTTP v1 emulators), judged by the official third-party
// clients: `cent.js` 6.1.0 for the server API and the `centrifuge` 5.8.0 SDK (with `ws`) for the
// live side.
//
// cent.js 6.1.0 has typed methods only for the real-time API (publish … info) and no push
// method, and its `pipeline()` posts Centrifugo v4's newline-delimited commands to the bare API
// URL, which Herald (like Centrifugo v5+) does not serve (Herald answers 404 with an `error`
// body, which `pipeline()` turns into `[undefined]` without failing). The push calls go through
// cent.js's one generic request path, the `methodFactory(method)` that every typed method is
// built from (TypeScript-private, plain JS at runtime): same URL scheme, X-API-Key header, JSON
// body, `result` unwrapping and `CentException` on `error` as `cent.publish`.
//
// No test proves an absence by sleeping: "no push to alice" is shown by sending a marker push
// that is queued after the one that must not exist (to an offline user, or due later) and
// waiting until the marker has arrived; the queue's status (`push_status`) confirms it.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, afterEach, before, describe, test } from 'node:test';

import { CentClient, CentException } from 'cent.js';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { startCutProxy } from './cutproxy.mjs';
import { mintToken, startHerald } from './herald.mjs';
import { APNS_TOPIC, apnsToken, startPushMock } from './pushmock.mjs';
import { api, waitFor } from './realtime.mjs';

// `inbox`: live first, push when offline (presence on as well, so the test can see when a
// dropped connection has left). `inbox2`: a subscribed user must ack within 1 s (presence is
// tracked for push_offline alone).
const NAMESPACES = `
[client]
allow_anonymous = true

[[namespaces]]
name = "inbox"
presence = true
history_size = 100
history_ttl = "1h"
push_offline = true
push_title = "{data.title}"
push_body = "{data.from.name}: {data.body}"

[[namespaces]]
name = "inbox2"
history_size = 100
history_ttl = "1h"
push_offline = true
push_ack_timeout = "1s"
push_title = "{data.title}"
push_body = "{data.body}"
`;

const ACK_TIMEOUT_MS = 1000;
const suffix = () => randomUUID().slice(0, 8);

describe('push: cent.js and centrifuge-js against herald serve with herald-pushmock', { timeout: 60_000 }, () => {
  let mock;
  let server;
  let cent;
  let clients = [];
  let proxies = [];

  before(async () => {
    mock = await startPushMock();
    server = await startHerald({ extraConfig: NAMESPACES + mock.pushConfig() });
    cent = new CentClient({ url: server.apiUrl, apiKey: server.apiKey });
  });

  afterEach(async () => {
    for (const client of clients) client.disconnect();
    clients = [];
    for (const proxy of proxies) await proxy.close();
    proxies = [];
  });

  after(async () => {
    try {
      if (server) assert.equal(await server.stop(), 0);
    } finally {
      if (mock) await mock.stop();
    }
  });

  /** cent.js's generic request path (see the header): `call('device_list', {...})`. */
  const call = (method, params) => cent.methodFactory(method)(params);
  /** The server API's `error` of a call that must fail (plain fetch: cent.js hides it). */
  async function apiError(method, body) {
    const response = await fetch(`${server.apiUrl}/${method}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-api-key': server.apiKey },
      body: JSON.stringify(body),
    });
    const reply = await response.json();
    assert.ok(reply.error, `${method} should fail: ${JSON.stringify(reply)}`);
    return reply.error;
  }

  const details = () => `${server.diagnostics()}${mock.diagnostics()}`;
  const recordsFor = async (token) => (await mock.apnsRecords()).filter((r) => r.token === token);
  /** Waits until the APNs emulator has accepted a notification for `token` matching `match`. */
  async function apnsArrival(what, token, match = () => true, timeoutMs = 10_000) {
    let seen = [];
    return waitFor(what, async () => {
      seen = await mock.apnsRecords();
      return seen.filter((r) => r.token === token).find(match);
    }, {
      timeoutMs,
      details: () => `APNs emulator records (${token}): ${JSON.stringify(seen.map((r) => [r.token.slice(0, 8), r.payload]))}${details()}`,
    });
  }
  const registerApns = async (user) => {
    const token = apnsToken();
    const { id } = await call('device_register', { provider: 'apns', token, platform: 'ios', user });
    return { id, token, user };
  };
  const statusOf = async (uid) => (await call('push_status', { uid })).items;

  function connect(user, { url = server.wsUrl, channels } = {}) {
    const client = new Centrifuge(url, {
      websocket: WebSocket,
      ...(user === undefined ? {} : { token: mintToken(server.hmacSecret, { sub: user, ttlSeconds: 3600, channels }) }),
    });
    clients.push(client);
    const events = [];
    for (const name of ['connecting', 'connected', 'disconnected', 'error']) client.on(name, (ctx) => events.push({ name, ctx }));
    return { client, events };
  }

  function subscribe(client, channel) {
    const sub = client.newSubscription(channel);
    const log = { pubs: [], subscribed: [] };
    sub.on('publication', (ctx) => log.pubs.push(ctx));
    sub.on('subscribed', (ctx) => log.subscribed.push(ctx));
    sub.subscribe();
    return { sub, log };
  }

  test('cent.js: register, list, topics, send (exactly once), cancel a scheduled push, push status', async () => {
    const user = `carol-${suffix()}`;
    const token = apnsToken();
    const registration = { provider: 'apns', token, platform: 'ios', user, topics: ['news'], meta: { model: 'iPhone15,2' } };
    const { id } = await call('device_register', registration);
    assert.equal(typeof id, 'string');
    assert.ok(id.length > 0);
    // The same (provider, token) again is the same device.
    assert.deepEqual(await call('device_register', { ...registration, locale: 'de-DE' }), { id });

    const listed = await call('device_list', { filter: { users: [user] }, include_topics: true, include_meta: true, include_total_count: true });
    assert.equal(listed.total_count, 1);
    assert.equal(listed.items.length, 1);
    const [device] = listed.items;
    assert.equal(device.id, id);
    assert.equal(device.provider, 'apns');
    assert.equal(device.token, token);
    assert.equal(device.platform, 'ios');
    assert.equal(device.user, user);
    assert.equal(device.locale, 'de-DE');
    assert.deepEqual(device.meta, { model: 'iPhone15,2' });
    assert.deepEqual(device.topics, ['news']);
    const now = Math.floor(Date.now() / 1000);
    assert.ok(Math.abs(device.created_at - now) < 60 && device.updated_at >= device.created_at, JSON.stringify(device));

    // Topics: add one to the device, then replace the set through device_update.
    assert.deepEqual(await call('device_topic_update', { device_id: id, op: 'add', topics: ['sports'] }), {});
    let topics = (await call('device_list', { filter: { ids: [id] }, include_topics: true })).items[0].topics;
    assert.deepEqual([...topics].sort(), ['news', 'sports']);
    assert.deepEqual(await call('device_update', { ids: [id], topics_update: { op: 'set', topics: ['sports', 'weather'] } }), {});
    topics = (await call('device_list', { filter: { ids: [id] }, include_topics: true })).items[0].topics;
    assert.deepEqual([...topics].sort(), ['sports', 'weather']);
    const byTopic = await call('device_topic_list', { filter: { topics: ['weather'], device_users: [user] }, include_device: true });
    assert.deepEqual(byTopic.items.map((i) => [i.topic, i.device?.id]), [['weather', id]]);
    assert.deepEqual((await call('device_list', { filter: { topics: ['news'], users: [user] } })).items, [], 'news was replaced');

    // Send to the topic; the APNs emulator gets it, signed with the configured key.
    const uid = `cent-${suffix()}`;
    const payload = { aps: { alert: { title: 'Kick-off', body: 'in 5 minutes' } }, match: 42 };
    assert.deepEqual(await call('send_push_notification', {
      recipient: { filter: { topics: ['sports'], users: [user] } },
      notification: { apns: { payload } },
      uid,
    }), { uid });
    const record = await apnsArrival('the push at the APNs emulator', token);
    assert.deepEqual(record.payload, payload);
    assert.equal(record.headers['apns-topic'], APNS_TOPIC);
    assert.equal(record.key_id, mock.info.apns_keys[0].key_id);
    assert.equal(record.http_version, 'HTTP/2.0');
    // Repeating the uid sends nothing again; a marker push queued after it shows when the
    // queue has moved past it.
    assert.deepEqual(await call('send_push_notification', { recipient: { filter: { users: [user] } }, notification: { apns: { payload } }, uid }), { uid });
    const markerUid = `marker-${suffix()}`;
    await call('send_push_notification', { recipient: { filter: { users: [user] } }, notification: { apns: { payload: { aps: { alert: 'marker' } } } }, uid: markerUid });
    await apnsArrival('the marker push', token, (r) => r.payload.aps.alert === 'marker');
    assert.equal((await recordsFor(token)).filter((r) => r.payload.match === 42).length, 1, 'exactly once');
    const delivery = (await statusOf(uid)).find((s) => s.kind === 'push.apns');
    assert.ok(delivery, JSON.stringify(await statusOf(uid)));
    assert.equal(delivery.state, 'sent');
    assert.equal(delivery.recipient, id);
    assert.equal(delivery.attempts, 1);

    // The app reports the notification delivered, then opened.
    assert.deepEqual(await call('update_push_status', { analytics_uid: uid, status: 'delivered', device_id: id }), {});
    assert.equal((await statusOf(uid)).find((s) => s.kind === 'push.apns').state, 'delivered');
    assert.deepEqual(await call('update_push_status', { analytics_uid: uid, status: 'interacted', device_id: id }), {});
    assert.equal((await statusOf(uid)).find((s) => s.kind === 'push.apns').state, 'interacted');

    // A push scheduled an hour ahead, cancelled: its queued parts are cancelled.
    const later = `later-${suffix()}`;
    await call('send_push_notification', {
      recipient: { filter: { users: [user] } },
      notification: { apns: { payload: { aps: { alert: 'later' } } } },
      uid: later,
      send_at: now + 3600,
    });
    assert.ok((await statusOf(later)).every((s) => s.state === 'queued'), JSON.stringify(await statusOf(later)));
    assert.deepEqual(await call('cancel_push', { uid: later }), {});
    const cancelled = await statusOf(later);
    assert.ok(cancelled.length > 0 && cancelled.every((s) => s.state === 'cancelled'), JSON.stringify(cancelled));

    // FCM through the same path: the FCM emulator gets the message for the token.
    const fcmToken = `fcm-${suffix()}-${suffix()}`;
    const fcm = await call('device_register', { provider: 'fcm', token: fcmToken, platform: 'android', user });
    const fcmUid = `fcm-${suffix()}`;
    await call('send_push_notification', {
      recipient: { filter: { ids: [fcm.id] } },
      notification: { fcm: { message: { notification: { title: 'Hello', body: 'Android' } } } },
      uid: fcmUid,
    });
    const fcmRecord = await waitFor('the push at the FCM emulator', async () => (await mock.fcmRecords()).find((r) => r.message.token === fcmToken), { details });
    assert.deepEqual(fcmRecord.message.notification, { title: 'Hello', body: 'Android' });

    // Removal: gone from the list, recorded with reason `api`.
    assert.deepEqual(await call('device_remove', { ids: [id, fcm.id] }), {});
    assert.deepEqual((await call('device_list', { filter: { users: [user] } })).items, []);
    // A removal carries the device as it was (the wire device object).
    const removals = (await call('device_removals', { limit: 1000 })).items.filter((r) => [id, fcm.id].includes(r.device.id));
    assert.deepEqual(removals.map((r) => r.reason), ['api', 'api']);
    assert.equal(removals.find((r) => r.device.id === id).device.token, token);

    // Bad input is CentException (code 107 on the wire).
    await assert.rejects(call('device_register', { provider: 'pigeon', token: 'x', platform: 'ios', user }), CentException);
    assert.equal((await apiError('device_register', { provider: 'pigeon', token: 'x', platform: 'ios', user })).code, 107);
  });

  test('live first (centrifuge-js): live → no push; offline → push from the template; recovery; push.always', async () => {
    const alice = `alice-${suffix()}`;
    const bob = `bob-${suffix()}`; // never connected: his pushes are the markers
    const aliceDevice = await registerApns(alice);
    const bobDevice = await registerApns(bob);
    const channel = `inbox:#${alice}`;

    const proxy = await startCutProxy(server.url);
    proxies.push(proxy);
    const { client, events } = connect(alice, { url: proxy.wsUrl });
    const { sub, log } = subscribe(client, channel);
    client.connect();
    await sub.ready(5000);
    const wire = () => `${proxy.wire()}${details()}`;

    // 1. Alice is subscribed: the publication reaches her over the WebSocket, and no push.
    const first = await api(server, 'publish', { channel, data: { title: 'Lunch?', body: 'at noon', from: { name: 'Bob' } } });
    await waitFor('the live publication', () => log.pubs.length >= 1, { details: wire });
    assert.deepEqual(log.pubs[0].data, { title: 'Lunch?', body: 'at noon', from: { name: 'Bob' } });
    assert.equal(log.pubs[0].offset, first.offset);
    // Marker: bob is offline, so his publication (made after alice's) is pushed. Once it has
    // arrived, alice's would have been queued before it (routing happens inside publish).
    const marker = await api(server, 'publish', { channel: `inbox:#${bob}`, data: { title: 'marker', body: '1', from: { name: 'x' } } });
    await apnsArrival('bob\'s marker push', bobDevice.token);
    assert.deepEqual(await recordsFor(aliceDevice.token), [], 'no push for a publication alice got live');
    assert.deepEqual(await statusOf(`live:${channel}:${first.epoch}:${first.offset}`), [], 'nothing was queued for alice');
    assert.ok((await statusOf(`live:inbox:#${bob}:${marker.epoch}:${marker.offset}`)).length > 0);

    // 2. Alice's connection drops (no close frame); once the server has seen it, the next
    //    publication becomes an APNs push with the namespace's template.
    proxy.cut({ hold: true });
    await waitFor('the SDK to notice the drop', () => events.some((e) => e.name === 'connecting' && e.ctx.code === 1), { details: wire });
    await waitFor('alice to leave the channel\'s presence', async () => {
      const { presence } = await api(server, 'presence', { channel });
      return !Object.values(presence).some((info) => info.user === alice);
    }, { details: wire });
    const missed = await api(server, 'publish', { channel, data: { title: 'You missed', body: 'a call', from: { name: 'Dave' } } });
    assert.equal(missed.offset, first.offset + 1);
    const pushed = await apnsArrival('alice\'s offline push', aliceDevice.token);
    assert.deepEqual(pushed.payload, {
      aps: { alert: { title: 'You missed', body: 'Dave: a call' } },
      channel,
      offset: missed.offset,
    });
    assert.equal(pushed.headers['apns-topic'], APNS_TOPIC);

    // 3. The SDK reconnects and recovers the missed publication from history, as usual.
    await waitFor('the SDK to reconnect (held at the proxy)', () => proxy.held > 0, { details: wire });
    proxy.resume();
    await waitFor('the resubscribe', () => log.subscribed.length >= 2, { details: wire });
    assert.equal(log.subscribed[1].wasRecovering, true, wire());
    assert.equal(log.subscribed[1].recovered, true, wire());
    await waitFor('the recovered publication', () => log.pubs.length >= 2, { details: wire });
    assert.deepEqual(log.pubs.map((p) => p.offset), [first.offset, missed.offset]);
    assert.deepEqual(log.pubs[1].data, { title: 'You missed', body: 'a call', from: { name: 'Dave' } });

    // 4. A `push` section with always: pushed although alice is live again (and delivered live).
    const always = await api(server, 'publish', {
      channel,
      data: { title: 'Urgent', body: 'server down', from: { name: 'Ops' } },
      push: { users: [alice], always: true },
    });
    await waitFor('the live publication', () => log.pubs.length >= 3, { details: wire });
    assert.equal(log.pubs[2].offset, always.offset);
    const urgent = await apnsArrival('the always push', aliceDevice.token, (r) => r.payload.offset === always.offset);
    assert.deepEqual(urgent.payload.aps.alert, { title: 'Urgent', body: 'Ops: server down' });
    assert.equal((await recordsFor(aliceDevice.token)).length, 2, 'the offline push and the always push, each once');
  });

  test('push_ack_timeout (centrifuge-js, server-side subscription): acked → no push; not acked → push after ~1 s', async () => {
    const alice = `alice-${suffix()}`;
    const device = await registerApns(alice);
    const channel = `inbox2:#${alice}`;
    const { client } = connect(alice, { channels: [channel] });
    const pubs = [];
    const acks = [];
    client.on('publication', (ctx) => {
      pubs.push(ctx);
      // The app acknowledges what it shows; `ack: false` marks one it leaves alone.
      if (ctx.data.ack !== false) {
        acks.push(client.rpc('herald.ack', { channel: ctx.channel, offset: ctx.offset }).then((r) => r.data, (e) => ({ error: e })));
      }
    });
    const subscribed = new Promise((resolve) => client.on('subscribed', resolve));
    client.connect();
    const ctx = await subscribed;
    assert.equal(ctx.channel, channel, 'the token\'s channel is subscribed server-side');

    const acked = await api(server, 'publish', { channel, data: { title: 'seen', body: 'acked' } });
    await waitFor('the live publication and its ack', () => acks.length >= 1, { details });
    assert.deepEqual(await acks[0], { cancelled: true }, 'herald.ack cancelled the pending push');
    assert.equal(pubs[0].offset, acked.offset);

    // Not acknowledged: pushed once the timeout has passed. It is due after the acked one would
    // have been, so its arrival is the marker for "the acked one was never sent".
    const publishedAt = Date.now();
    const ignored = await api(server, 'publish', { channel, data: { title: 'unseen', body: 'not acked', ack: false } });
    await waitFor('the live publication', () => pubs.length >= 2, { details });
    const record = await apnsArrival('the push after the ack timeout', device.token, () => true, 10_000);
    const after = record.time_ms ? record.time_ms - publishedAt : Date.now() - publishedAt;
    assert.ok(after >= ACK_TIMEOUT_MS - 100, `pushed ${after} ms after the publish, before the ack timeout`);
    assert.ok(Date.now() - publishedAt < ACK_TIMEOUT_MS + 5000, 'pushed soon after the timeout');
    assert.deepEqual(record.payload, { aps: { alert: { title: 'unseen', body: 'not acked' } }, channel, offset: ignored.offset });
    assert.deepEqual((await recordsFor(device.token)).map((r) => r.payload.offset), [ignored.offset], 'the acked publication was not pushed');
    const cancelled = await statusOf(`live:${channel}:${acked.epoch}:${acked.offset}:${alice}`);
    assert.ok(cancelled.length > 0 && cancelled.every((s) => s.state === 'cancelled'), JSON.stringify(cancelled));
    // A second ack of the same publication cancels nothing more.
    assert.deepEqual((await client.rpc('herald.ack', { channel, offset: acked.offset })).data, { cancelled: false });
  });

  test('self-registration over the WebSocket (centrifuge-js rpc): own devices only, no topics, not anonymous', async () => {
    const alice = `alice-${suffix()}`;
    const bob = `bob-${suffix()}`;
    const bobDevice = await registerApns(bob);
    const { client } = connect(alice);
    client.connect();
    await client.ready(5000);

    const token = apnsToken();
    const { data } = await client.rpc('herald.device_register', { provider: 'apns', token, platform: 'ios', locale: 'en-GB' });
    assert.equal(typeof data.id, 'string');
    const listed = await call('device_list', { filter: { ids: [data.id] } });
    assert.equal(listed.items.length, 1);
    assert.equal(listed.items[0].user, alice, 'the device belongs to the token\'s user');
    assert.equal(listed.items[0].token, token);
    assert.equal(listed.items[0].provider, 'apns');
    assert.equal(listed.items[0].platform, 'ios');
    assert.equal(listed.items[0].locale, 'en-GB');

    // The registered device receives pushes sent to alice.
    const uid = `self-${suffix()}`;
    await call('send_push_notification', { recipient: { filter: { users: [alice] } }, notification: { apns: { payload: { aps: { alert: 'hi alice' } } } }, uid });
    await apnsArrival('the push to the self-registered device', token);
    assert.deepEqual((await client.rpc('herald.update_push_status', { analytics_uid: uid, status: 'delivered', device_id: data.id })).data, {});
    assert.equal((await statusOf(uid)).find((s) => s.kind === 'push.apns').state, 'delivered');

    const refused = (promise) => assert.rejects(promise, (err) => err.code === 103 || assert.fail(JSON.stringify(err)));
    // Not hers: bob's device cannot be removed, updated or reported on by alice.
    await refused(client.rpc('herald.device_remove', { id: bobDevice.id }));
    await refused(client.rpc('herald.device_update', { id: bobDevice.id, locale: 'fr-FR' }));
    assert.equal((await call('device_list', { filter: { ids: [bobDevice.id] } })).items.length, 1, 'bob\'s device is still there');
    // Registering for another user, or with topics: refused, nothing registered.
    const other = apnsToken();
    await refused(client.rpc('herald.device_register', { provider: 'apns', token: other, platform: 'ios', user: bob }));
    await refused(client.rpc('herald.device_register', { provider: 'apns', token: other, platform: 'ios', topics: ['vip'] }));
    const all = await call('device_list', { filter: { users: [alice, bob] }, limit: 100 });
    assert.ok(!all.items.some((d) => d.token === other), JSON.stringify(all.items));

    // Her own device: removed, recorded with reason `client`.
    assert.deepEqual((await client.rpc('herald.device_remove', { id: data.id })).data, {});
    assert.deepEqual((await call('device_list', { filter: { users: [alice] } })).items, []);
    const removal = (await call('device_removals', { limit: 1000 })).items.find((r) => r.device.id === data.id);
    assert.equal(removal?.reason, 'client');

    // An anonymous connection (allow_anonymous) can do none of it.
    const anonymous = connect(undefined);
    anonymous.client.connect();
    await anonymous.client.ready(5000);
    await refused(anonymous.client.rpc('herald.device_register', { provider: 'apns', token: apnsToken(), platform: 'ios' }));
  });
});
