// A TCP proxy in front of Herald that a test can cut: the SDK under test connects through it,
// and `cut()` destroys every proxied connection at the TCP level (no close frame: the client
// sees an abnormal closure, 1006, exactly as on a dropped network), out of the SDK's control.
// While `hold` is on, new connections are accepted but not forwarded until `resume()`, so the
// test decides when the SDK's reconnect goes through.
//
// It also records the WebSocket frames in both directions (text and binary payloads, close frames,
// decoded from the RFC 6455 framing) so a failing test can print the wire.

import net from 'node:net';

/** Decodes RFC 6455 frames from a byte stream; calls onFrame({opcode, payload}). */
class FrameDecoder {
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.buffer = Buffer.alloc(0);
    this.upgraded = false;
  }

  push(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    if (!this.upgraded) {
      // Skip the HTTP upgrade request/response.
      const end = this.buffer.indexOf('\r\n\r\n');
      if (end < 0) return;
      this.onFrame({ opcode: 'http', payload: this.buffer.subarray(0, end) });
      this.buffer = this.buffer.subarray(end + 4);
      this.upgraded = true;
    }
    for (;;) {
      const b = this.buffer;
      if (b.length < 2) return;
      const opcode = b[0] & 0x0f;
      const masked = (b[1] & 0x80) !== 0;
      let length = b[1] & 0x7f;
      let at = 2;
      if (length === 126) {
        if (b.length < 4) return;
        length = b.readUInt16BE(2);
        at = 4;
      } else if (length === 127) {
        if (b.length < 10) return;
        length = Number(b.readBigUInt64BE(2));
        at = 10;
      }
      const maskAt = at;
      if (masked) at += 4;
      if (b.length < at + length) return;
      const payload = Buffer.from(b.subarray(at, at + length));
      if (masked) for (let i = 0; i < payload.length; i++) payload[i] ^= b[maskAt + (i % 4)];
      this.buffer = b.subarray(at + length);
      this.onFrame({ opcode, payload });
    }
  }
}

/**
 * Starts a proxy on 127.0.0.1 (random port) to `target` (an http:// URL of herald).
 * Resolves to {wsUrl, frames, connections, cut(), hold, resume(), retarget(), upstreams, wire(),
 * close()}.
 */
export async function startCutProxy(target) {
  let upstreamUrl = target;
  const upstreams = [];
  const pairs = new Set();
  const held = [];
  const frames = [];
  let connections = 0;
  let holding = false;
  const started = Date.now();

  const record = (conn, dir) => {
    const decoder = new FrameDecoder(({ opcode, payload }) => {
      const t = Date.now() - started;
      if (opcode === 'http') {
        const headers = payload.toString('latin1');
        frames.push({ conn, dir, t, kind: 'http', text: headers.split('\r\n')[0], headers });
      } else if (opcode === 1 || opcode === 0) {
        frames.push({ conn, dir, t, kind: 'text', text: payload.toString('utf8') });
      } else if (opcode === 2) {
        frames.push({ conn, dir, t, kind: 'binary', payload, text: payload.toString('hex') });
      } else if (opcode === 8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : undefined;
        frames.push({ conn, dir, t, kind: 'close', code, text: payload.subarray(2).toString('utf8') });
      }
    });
    return (chunk) => {
      try {
        decoder.push(chunk);
      } catch (err) {
        frames.push({ conn, dir, t: Date.now() - started, kind: 'decode-error', text: String(err) });
      }
    };
  };

  const forward = (client) => {
    const conn = ++connections;
    const { hostname, port } = new URL(upstreamUrl);
    upstreams.push(upstreamUrl);
    frames.push({ conn, dir: '--', t: Date.now() - started, kind: 'upstream', text: upstreamUrl });
    const upstream = net.connect({ host: hostname, port: Number(port) });
    const pair = { client, upstream, conn };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    client.on('data', record(conn, 'C>S'));
    upstream.on('data', record(conn, 'S>C'));
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  };

  const server = net.createServer({ pauseOnConnect: true }, (client) => {
    if (holding) {
      held.push(client);
      client.on('error', () => {});
    } else {
      forward(client);
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const proxyPort = server.address().port;

  return {
    wsUrl: `ws://127.0.0.1:${proxyPort}/connection/websocket`,
    url: `http://127.0.0.1:${proxyPort}`,
    frames,
    /** Connections forwarded so far. */
    get connections() { return connections; },
    /** Connections open right now. */
    get open() { return pairs.size; },
    /**
     * Destroys every forwarded connection (both TCP sides, no WebSocket close frame). With
     * {hold: true}, connections made afterwards wait until resume().
     */
    cut({ hold = false } = {}) {
      holding = hold;
      for (const pair of [...pairs]) {
        pairs.delete(pair);
        frames.push({ conn: pair.conn, dir: '--', t: Date.now() - started, kind: 'cut', text: 'proxy cut the TCP connection' });
        pair.client.destroy();
        pair.upstream.destroy();
      }
    },
    /**
     * Forwards connections made from now on to `newTarget` (another herald node, as a load
     * balancer would after a node died). With {hold: true} they wait for resume() first.
     * Open connections are left alone.
     */
    retarget(newTarget, { hold = false } = {}) {
      upstreamUrl = newTarget;
      if (hold) holding = true;
    },
    /** The upstream URL of each forwarded connection, in order. */
    get upstreams() { return [...upstreams]; },
    /** How many connections are waiting for resume(). */
    get held() { return held.length; },
    /** Forwards the held connections and stops holding. */
    resume() {
      holding = false;
      for (const client of held.splice(0)) if (!client.destroyed) forward(client);
    },
    /** The recorded frames, one per line (for assertion messages). */
    wire(last = 80) {
      return frames.slice(-last).map((f) => `#${f.conn} ${String(f.t).padStart(6)}ms ${f.dir} ${f.kind}${f.code ? ` ${f.code}` : ''} ${f.text}`).join('\n');
    },
    async close() {
      holding = false;
      for (const client of held.splice(0)) client.destroy();
      for (const pair of [...pairs]) {
        pair.client.destroy();
        pair.upstream.destroy();
      }
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
