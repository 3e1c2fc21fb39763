// A redis-server owned by one test file, for the cluster (storage.engine = "redis") tests: its
// own process on a free 127.0.0.1 port with a temp dir and no persistence, killed on stop() and
// when the test process exits. The binary is $REDIS_SERVER_BIN or `redis-server` from PATH
// (Debian: `apt-get install redis-server`); a missing binary fails the test, naming it.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const STARTUP_TIMEOUT_MS = 15_000;

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Sends one command (RESP) to 127.0.0.1:port; resolves to the raw reply text, or null on error. */
export function redisCommand(port, args, timeoutMs = 2000) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let reply = '';
    const done = (value) => {
      socket.destroy();
      resolve(value);
    };
    socket.setTimeout(timeoutMs, () => done(null));
    socket.on('error', () => done(null));
    socket.on('connect', () => {
      socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`);
    });
    socket.on('data', (chunk) => {
      reply += chunk.toString('utf8');
      // Simple, error and integer replies end with their line; bulk replies with their length.
      const bulk = /^\$(-?\d+)\r\n/.exec(reply);
      const complete = bulk
        ? Buffer.byteLength(reply) >= bulk[0].length + (Number(bulk[1]) < 0 ? 0 : Number(bulk[1]) + 2)
        : reply.endsWith('\r\n');
      if (complete) done(reply);
    });
  });
}

/** Starts redis-server; resolves to {url, port, command(args), stop()}. */
export async function startRedis() {
  const bin = process.env.REDIS_SERVER_BIN || 'redis-server';
  const dir = mkdtempSync(path.join(tmpdir(), 'herald-redis-'));
  const log = path.join(dir, 'redis.log');
  const port = await freePort();
  const child = spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--logfile', log], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  running.add(child);
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  let exit = null;
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => {
    running.delete(child);
    exit = { code, signal };
    resolve(exit);
  }));
  const spawnError = new Promise((resolve) => child.on('error', resolve));
  const diagnostics = () => {
    let text = '';
    try { text = readFileSync(log, 'utf8').slice(-4000); } catch { /* not written */ }
    return `\n--- redis-server stderr ---\n${stderr}\n--- ${log} ---\n${text}`;
  };

  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (;;) {
    const error = await Promise.race([spawnError, sleep(50).then(() => null)]);
    if (error) {
      throw new Error(`cannot run ${bin} (${error.code || error.message}): the cluster tests start their own Redis; install it (Debian: apt-get install redis-server) or set REDIS_SERVER_BIN`);
    }
    if (exit) throw new Error(`redis-server exited (${JSON.stringify(exit)}) before answering on port ${port}${diagnostics()}`);
    // Ours (not another test's server that took the port first) and done loading.
    const info = await redisCommand(port, ['INFO', 'server']);
    if (info && info.includes(`process_id:${child.pid}\r\n`) && (await redisCommand(port, ['PING'])) === '+PONG\r\n') break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`redis-server did not answer on port ${port} within ${STARTUP_TIMEOUT_MS} ms${diagnostics()}`);
    }
  }

  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    command: (args) => redisCommand(port, args),
    diagnostics,
    async stop() {
      if (!exit) child.kill('SIGKILL');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
