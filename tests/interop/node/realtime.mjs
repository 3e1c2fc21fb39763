// Shared by the WebSocket (client protocol) suites: the server config they run with, the
// server API calls they publish through, and bounded waits.

import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

/**
 * Appended to the base test config (see herald.mjs): short pings so every test also exercises
 * ping/pong, a low recovery limit so "recovery impossible" is cheap to reach, and a `chat`
 * namespace where clients may publish, read history and presence, with join/leave events.
 */
export const RECOVERY_MAX = 20;
export const REALTIME_CONFIG = `
[client]
ping_interval = "3s"
pong_timeout = "3s"
recovery_max_publications = ${RECOVERY_MAX}

[[namespaces]]
name = "chat"
presence = true
join_leave = true
allow_publish_for_client = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
history_size = 100
history_ttl = "1h"

[[namespaces]]
name = "private"
require_subscription_token = true
presence = true
allow_presence_for_subscriber = true
`;

/** POST /api/<method> with the server's API key; resolves to `result`, throws on `error`. */
export async function api(server, method, body) {
  const response = await fetch(`${server.apiUrl}/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': server.apiKey },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (response.status !== 200) throw new Error(`${method}: HTTP ${response.status}: ${text}`);
  const reply = JSON.parse(text);
  if (reply.error) throw new Error(`${method}: ${JSON.stringify(reply.error)}`);
  return reply.result;
}

/** Publishes {n} for each n in `numbers` (one request each, in order); returns the results. */
export async function publishNumbers(server, channel, numbers) {
  const results = [];
  for (const n of numbers) results.push(await api(server, 'publish', { channel, data: { n } }));
  return results;
}

export const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/**
 * Polls `predicate` every 20 ms until it returns a truthy value; rejects after `timeoutMs`
 * with `what` and, if given, `details()` (e.g. the recorded wire).
 */
export async function waitFor(what, predicate, { timeoutMs = 10_000, details } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${details ? `\n${details()}` : ''}`);
    }
    await sleep(20);
  }
}
