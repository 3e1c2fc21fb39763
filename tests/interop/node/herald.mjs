// Runs a real `herald serve` process for the Node interop tests.
//
// The binary is $HERALD_BIN, or <repo>/target/debug/herald ($CARGO_TARGET_DIR/debug/herald when
// set); the push emulator's (pushmock.mjs) is $HERALD_PUSHMOCK_BIN, found the same way. Each
// server gets a temp config with a random API key, SQLite storage in a temp data dir and
// `--listen 127.0.0.1:0`; the URL comes from the stdout line
// `Herald <version> listening on http://127.0.0.1:PORT`. stop() sends SIGTERM and requires a
// graceful exit (code 0) within 10 seconds.

import { spawn } from 'node:child_process';
import { createHmac, randomInt } from 'node:crypto';
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const STARTUP_TIMEOUT_MS = 30_000;
const SHUTDOWN_TIMEOUT_MS = 10_000;

// Never leave a server behind if the test process exits early.
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

function targetBin(name) {
  const target = path.resolve(REPO, process.env.CARGO_TARGET_DIR || 'target');
  return path.join(target, 'debug', name);
}

export function heraldBin() {
  return process.env.HERALD_BIN || targetBin('herald');
}

/**
 * The APNs + FCM emulator binary (pushmock.mjs starts it): $HERALD_PUSHMOCK_BIN, or
 * <repo>/target/debug/herald-pushmock ($CARGO_TARGET_DIR/debug/herald-pushmock when set).
 */
export function pushmockBin() {
  return process.env.HERALD_PUSHMOCK_BIN || targetBin('herald-pushmock');
}

// The test environment minus HERALD_* variables: herald reads every HERALD_* variable as a
// config key and refuses unknown ones (HERALD_BIN would stop it from starting), and the config
// file alone should decide how the server under test runs.
function serverEnv() {
  const env = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('HERALD_')));
  env.NO_COLOR = '1'; // plain-text logs in the captured stderr
  return env;
}

export function randomToken(length) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  let out = '';
  for (let i = 0; i < length; i++) out += alphabet[randomInt(alphabet.length)];
  return out;
}

function configText(apiKey, hmacSecret, dataDir, extraConfig, { engine, name }) {
  return `${name ? `[server]\nname = ${JSON.stringify(name)}\n\n` : ''}[api]
keys = ["${apiKey}"]

[token]
hmac_secret = "${hmacSecret}"

[storage]
engine = "${engine}"
data_dir = ${JSON.stringify(dataDir)}

[namespace]
history_size = 1000
history_ttl = "1h"

[[namespaces]]
name = "room"
presence = true
history_size = 100
history_ttl = "1h"
${extraConfig}`;
}

const b64url = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/**
 * An HS256 connection JWT (Centrifugo claims: sub, exp, info, channels), signed with node's
 * crypto. `ttlSeconds` sets `exp` relative to now; omit it for a token without `exp`.
 */
/** An HS256 JWT: a connection token, or with `channel` a subscription token for it. */
export function mintToken(secret, { sub, ttlSeconds, info, channels, channel } = {}) {
  const claims = { sub: sub ?? '' };
  if (channel !== undefined) claims.channel = channel;
  if (ttlSeconds !== undefined) claims.exp = Math.floor(Date.now() / 1000) + ttlSeconds;
  if (info !== undefined) claims.info = info;
  if (channels !== undefined) claims.channels = channels;
  const unsigned = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

/**
 * Starts a server on a fresh temp dir; resolves to {url, apiUrl, wsUrl, apiKey, hmacSecret,
 * stop(), kill()}. `extraConfig` is TOML appended to the config (e.g. a `[client]` table or more
 * `[[namespaces]]`). For several nodes of one cluster: `engine: 'redis'` with a `[redis]` table
 * in `extraConfig`, the same `apiKey` and `hmacSecret` for each (random when omitted), and a
 * `name` per node (`server.name`).
 */
export async function startHerald({ extraConfig = '', engine = 'sqlite', apiKey = randomToken(32), hmacSecret = randomToken(48), name } = {}) {
  const bin = heraldBin();
  if (!existsSync(bin)) {
    throw new Error(`herald binary not found at ${bin}: run \`cargo build -p herald-server --bin herald\` or set HERALD_BIN`);
  }
  const root = mkdtempSync(path.join(tmpdir(), 'herald-node-'));
  const config = path.join(root, 'herald.toml');
  writeFileSync(config, configText(apiKey, hmacSecret, path.join(root, 'data'), extraConfig, { engine, name }));
  const logPath = path.join(root, 'herald.log');
  const logFd = openSync(logPath, 'a');

  const child = spawn(bin, ['serve', '--config', config, '--listen', '127.0.0.1:0'], {
    cwd: root,
    env: serverEnv(),
    stdio: ['ignore', 'pipe', logFd],
  });
  closeSync(logFd);
  running.add(child);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    running.delete(child);
    resolve({ code, signal });
  }));
  const stdout = [];
  const diagnostics = () => {
    let stderr = '';
    try { stderr = readFileSync(logPath, 'utf8').slice(-8000); } catch { /* gone */ }
    return `\n--- herald stdout ---\n${stdout.join('\n')}\n--- herald stderr (${logPath}) ---\n${stderr}`;
  };

  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`herald did not print its URL within ${STARTUP_TIMEOUT_MS} ms${diagnostics()}`));
    }, STARTUP_TIMEOUT_MS);
    const lines = createInterface({ input: child.stdout });
    let found = false;
    lines.on('line', (line) => {
      stdout.push(line);
      const match = /listening on (http:\/\/\S+)/.exec(line);
      if (match && !found) {
        found = true;
        clearTimeout(timer);
        resolve(match[1].replace(/\/$/, ''));
      }
    });
    exited.then(({ code, signal }) => {
      if (!found) {
        clearTimeout(timer);
        reject(new Error(`herald exited (code ${code}, signal ${signal}) before listening${diagnostics()}`));
      }
    });
  });

  let stopped = false;
  let killed = false;
  return {
    url,
    apiUrl: `${url}/api`,
    wsUrl: `${url.replace(/^http/, 'ws')}/connection/websocket`,
    apiKey,
    hmacSecret,
    /** The tail of the server's stderr log (for failure messages). */
    diagnostics,
    /** SIGKILL (a crashed node); resolves once the process is gone. stop() is a no-op after it. */
    async kill() {
      stopped = true;
      killed = true;
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
    /** SIGTERM; resolves to the exit code, rejects unless it is 0 within 10 s. */
    async stop() {
      if (stopped) {
        // After kill(): nothing left to stop; its files were kept for diagnostics until now.
        if (killed) rmSync(root, { recursive: true, force: true });
        return 0;
      }
      stopped = true;
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      let timer;
      const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(null), SHUTDOWN_TIMEOUT_MS); });
      const result = await Promise.race([exited, timeout]);
      clearTimeout(timer);
      if (result === null) {
        child.kill('SIGKILL');
        await exited;
        throw new Error(`herald did not exit within ${SHUTDOWN_TIMEOUT_MS} ms of SIGTERM${diagnostics()}`);
      }
      if (result.code !== 0) {
        throw new Error(`herald exited with code ${result.code} (signal ${result.signal}) after SIGTERM, expected 0${diagnostics()}`);
      }
      rmSync(root, { recursive: true, force: true });
      return result.code;
    },
  };
}
