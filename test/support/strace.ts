// strace -f attached to a running daemon: the syscalls it makes while a test
// drives it, as strace's output lines, for tests that judge what the daemon
// does at the system level (which thread, in which order, how long).
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Trace {
  /** Detach and return every line strace wrote. */
  stop(): Promise<string[]>;
}

/** Attach to `pid` (all its threads) tracing `syscalls`; `flags` are extra strace options (-tt, -T). */
export async function strace(pid: number, syscalls: string[], flags: string[] = []): Promise<Trace> {
  const dir = mkdtempSync(join(tmpdir(), 'vhostd-strace-'));
  const out = join(dir, 'trace');
  const child = spawn('strace', ['-f', ...flags, '-e', `trace=${syscalls.join(',')}`, '-o', out, '-p', String(pid)], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, TZ: 'UTC' },
  });
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const deadline = Date.now() + 10_000;
  while (!/attached/.test(err)) {
    if (child.exitCode !== null) throw new Error(`strace exited: ${err}`);
    if (Date.now() > deadline) throw new Error(`strace did not attach within 10 s: ${err}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  // Attach messages come per thread; give the last ones a moment.
  await new Promise((r) => setTimeout(r, 200));
  return {
    async stop() {
      const closed = new Promise((r) => child.once('close', r));
      child.kill('SIGINT');
      await closed;
      const lines = readFileSync(out, 'utf8').split('\n');
      rmSync(dir, { recursive: true, force: true });
      return lines;
    },
  };
}
