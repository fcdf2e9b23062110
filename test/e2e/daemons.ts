// Back-end processes for end-to-end tests: vhostd itself (built dist/) and
// qemu-storage-daemon as the peer. Both are always stopped, even on failure.
import type { NetStats } from '../../src/backends/net/queue-pair.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { VHOSTD_BIN } from '../support/children.js';
import { waitForPath } from './guest.js';

/** The built daemon (VHOSTD_BIN overrides it, as for the protocol tests). */
export const DAEMON = VHOSTD_BIN;

export interface Backend {
  socket: string;
  pid: number;
  /** Everything the process wrote so far (pino JSON lines for vhostd). */
  output(): string;
  /** SIGTERM, then SIGKILL after a grace period; resolves to the exit code. */
  stop(): Promise<number | null>;
  exited: Promise<number | null>;
}

/** Spawn a back-end; resolves once `ready` shows in its output, or its socket exists. It is stopped if it fails to come up. */
export function launch(cmd: string, args: string[], socket: string, ready?: RegExp): Promise<Backend> {
  const child: ChildProcess = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  const stop = async (): Promise<number | null> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const code = await exited;
      clearTimeout(t);
      return code;
    }
    return exited;
  };
  const early = exited.then((code) => {
    throw new Error(`${cmd} exited early (${code}):\n${out}`);
  });
  const up = ready ? waitForOutput(() => out, ready, 30_000) : waitForPath(socket, 30_000);
  return Promise.race([up, early]).then(
    () => ({ socket, pid: child.pid!, output: () => out, stop, exited }),
    async (e: unknown) => {
      await stop();
      throw e;
    },
  );
}

async function waitForOutput(out: () => string, re: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(out())) {
    if (Date.now() > deadline) throw new Error(`no ${re} within ${timeoutMs} ms:\n${out()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Starts `vhostd blk`; resolves once it prints how to attach, i.e. listens (a stale socket file may predate it). */
export function startVhostd(args: string[], socket: string): Promise<Backend> {
  return launch(process.execPath, [DAEMON, 'blk', '--socket', socket, ...args], socket, /# attach with:/);
}

/** Starts `vhostd net` inside a network namespace, where its tap is created. */
export function startVhostdNet(netns: string, args: string[], socket: string): Promise<Backend> {
  return launch(
    'ip',
    ['netns', 'exec', netns, process.execPath, DAEMON, 'net', '--socket', socket, ...args],
    socket,
    /# attach with:/,
  );
}

/** The per-queue-pair totals vhostd logs when it stops. */
export function netTotals(output: string): NetStats[] {
  const line = output.split('\n').reverse().find((l) => l.includes('"msg":"traffic totals"'));
  if (!line) throw new Error(`no traffic totals in vhostd output:\n${output}`);
  return JSON.parse(line).stats;
}

export function startStorageDaemon(image: string, socket: string, numQueues = 1): Promise<Backend> {
  return launch(
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=f0,filename=${image},cache.direct=off`,
      '--export',
      `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${numQueues}`,
    ],
    socket,
  );
}
