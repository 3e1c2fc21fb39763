// Runs `herald-pushmock` (the APNs and FCM HTTP v1 emulators, crates/herald-pushmock) for the
// push tests, and writes the `[push]` config that points a herald at it.
//
// The binary is $HERALD_PUSHMOCK_BIN, or <repo>/target/debug/herald-pushmock (see
// pushmockBin() in herald.mjs); `scripts/test build` builds it. It is started with one
// generated APNs key and one FCM service account (written to a temp dir) and prints one JSON
// line with its URLs and the key files; the tests read what the emulators accepted through the
// control API (`GET /apns/records`, …; crates/herald-pushmock/src/control.rs).

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { pushmockBin } from './herald.mjs';

export const APNS_KEY_ID = 'KEYID12345';
export const APNS_TEAM_ID = 'TEAMID1234';
export const APNS_TOPIC = 'com.example.app';
export const FCM_PROJECT = 'proj-1';

const STARTUP_TIMEOUT_MS = 15_000;
const SHUTDOWN_TIMEOUT_MS = 10_000;

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * Starts the emulators; resolves to {apnsUrl, fcmUrl, controlUrl, info (the printed line),
 * pushConfig(extra), apnsRecords(), fcmRecords(), control(method, path, body), stop()}.
 */
export async function startPushMock() {
  const bin = pushmockBin();
  if (!existsSync(bin)) {
    throw new Error(`herald-pushmock binary not found at ${bin}: run \`cargo build -p herald-pushmock --bin herald-pushmock\` (scripts/test build) or set HERALD_PUSHMOCK_BIN`);
  }
  const root = mkdtempSync(path.join(tmpdir(), 'herald-pushmock-'));
  const logPath = path.join(root, 'pushmock.log');
  const logFd = openSync(logPath, 'a');
  const child = spawn(bin, [
    '--generate-apns', `${APNS_KEY_ID}:${APNS_TEAM_ID}:${APNS_TOPIC}`,
    '--generate-fcm', FCM_PROJECT,
    '--out-dir', root,
  ], { cwd: root, stdio: ['ignore', 'pipe', logFd] });
  closeSync(logFd);
  running.add(child);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    running.delete(child);
    resolve({ code, signal });
  }));
  const diagnostics = () => {
    try { return `\n--- herald-pushmock stderr (${logPath}) ---\n${readFileSync(logPath, 'utf8').slice(-4000)}`; } catch { return ''; }
  };

  const info = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`herald-pushmock printed no JSON line within ${STARTUP_TIMEOUT_MS} ms${diagnostics()}`));
    }, STARTUP_TIMEOUT_MS);
    let found = false;
    createInterface({ input: child.stdout }).on('line', (line) => {
      if (found) return;
      found = true;
      clearTimeout(timer);
      try {
        resolve(JSON.parse(line));
      } catch (e) {
        child.kill('SIGKILL');
        reject(new Error(`herald-pushmock printed ${JSON.stringify(line)}: ${e.message}${diagnostics()}`));
      }
    });
    exited.then(({ code, signal }) => {
      if (!found) {
        clearTimeout(timer);
        reject(new Error(`herald-pushmock exited (code ${code}, signal ${signal}) before printing its addresses${diagnostics()}`));
      }
    });
  });
  const [apnsKey] = info.apns_keys;
  const [fcmAccount] = info.fcm_accounts;
  if (!apnsKey?.key_file || !fcmAccount?.credentials_file) {
    throw new Error(`herald-pushmock did not write the generated keys: ${JSON.stringify(info)}`);
  }

  const strip = (url) => url.replace(/\/$/, '');
  const controlUrl = strip(info.control);

  async function control(method, route, body) {
    const response = await fetch(`${controlUrl}${route}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    if (response.status !== 200) throw new Error(`pushmock ${method} ${route}: HTTP ${response.status}: ${text}`);
    return JSON.parse(text);
  }

  return {
    apnsUrl: strip(info.apns),
    fcmUrl: strip(info.fcm),
    controlUrl,
    info,
    diagnostics,
    /** TOML: `[push]` on, quick polling, the emulators as APNs and FCM; `extra` is appended. */
    pushConfig(extra = '') {
      return `
[push]
enabled = true
poll_interval = "50ms"
retry_base = "200ms"
max_attempts = 3

[[push.apns.apps]]
key_file = ${JSON.stringify(apnsKey.key_file)}
key_id = ${JSON.stringify(apnsKey.key_id)}
team_id = ${JSON.stringify(apnsKey.team_id)}
topic = ${JSON.stringify(APNS_TOPIC)}
base_url = ${JSON.stringify(strip(info.apns))}

[[push.fcm.apps]]
credentials_file = ${JSON.stringify(fcmAccount.credentials_file)}
base_url = ${JSON.stringify(strip(info.fcm))}
${extra}`;
    },
    control,
    /** What the APNs emulator accepted, oldest first: [{token, headers, payload, apns_id, …}]. */
    async apnsRecords() { return (await control('GET', '/apns/records')).records; },
    async fcmRecords() { return (await control('GET', '/fcm/records')).records; },
    /** SIGTERM; resolves once the process is gone. */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      let timer;
      const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(null), SHUTDOWN_TIMEOUT_MS); });
      const result = await Promise.race([exited, timeout]);
      clearTimeout(timer);
      if (result === null) {
        child.kill('SIGKILL');
        await exited;
        throw new Error(`herald-pushmock did not exit within ${SHUTDOWN_TIMEOUT_MS} ms of SIGTERM${diagnostics()}`);
      }
      rmSync(root, { recursive: true, force: true });
    },
  };
}

/** A random APNs device token (64 hex characters, as the emulator requires). */
export function apnsToken() {
  return Array.from(crypto.getRandomValues(new Uint8Array(32)), (b) => b.toString(16).padStart(2, '0')).join('');
}
