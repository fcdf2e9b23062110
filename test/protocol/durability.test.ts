// Durability as the syscalls show it: strace on the daemon proves that a
// FLUSH completes only after fdatasync returned, and that with writeback off a
// write goes through an O_DSYNC descriptor (opened when the image is) before it completes.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { S, T } from '../driver/blk.js';
import { strace } from '../support/strace.js';
import { useBackend, withSession } from './helpers.js';

interface Syscall {
  /** Seconds since midnight (UTC), when the call started and ended. */
  start: number;
  end: number;
  name: string;
  args: string;
  ret: string;
}

function secondsOfDay(ms: number): number {
  const d = new Date(ms);
  return d.getUTCHours() * 3600 + d.getUTCMinutes() * 60 + d.getUTCSeconds() + d.getUTCMilliseconds() / 1000;
}

/** strace -f on a running daemon, recording I/O syscalls with start times and durations. */
async function trace(pid: number): Promise<{ stop(): Promise<Syscall[]> }> {
  const t = await strace(pid, ['openat', 'pwritev', 'pwritev2', 'pwrite64', 'fdatasync', 'fsync'], ['-tt', '-T']);
  return {
    async stop() {
      const calls: Syscall[] = [];
      for (const line of await t.stop()) {
        const m = /^\d+\s+(\d+):(\d+):(\d+\.\d+) (\w+)\((.*)\)\s+= (\S+).*<(\d+\.\d+)>$/.exec(line);
        if (!m) continue;
        const start = Number(m[1]) * 3600 + Number(m[2]) * 60 + Number(m[3]);
        calls.push({ start, end: start + Number(m[7]), name: m[4]!, args: m[5]!, ret: m[6]! });
      }
      return calls;
    },
  };
}

const O_DSYNC = 0o10000;

/** The daemon's descriptor on `path` opened with O_DSYNC, from /proc/<pid>/fdinfo. */
function dsyncFd(pid: number, path: string): string | undefined {
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target !== path) continue;
    const flags = /^flags:\s+([0-7]+)/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
    if (flags && (parseInt(flags[1]!, 8) & O_DSYNC) !== 0) return fd;
  }
  return undefined;
}

describe('durability (vhostd, seen through strace)', () => {
  const be = useBackend('vhostd');

  it('completes FLUSH only after fdatasync has returned', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const q = s.blk[0]!;
      expect((await q.run({ type: T.OUT, sector: 8, out: new Uint8Array(4096).fill(7) })).status).toBe(S.OK);
      const tr = await trace(be().proc.pid!);
      const before = secondsOfDay(Date.now());
      const r = await q.run({ type: T.FLUSH });
      const after = secondsOfDay(Date.now());
      const calls = await tr.stop();
      expect(r.status).toBe(S.OK);
      const syncs = calls.filter((c) => c.name === 'fdatasync' && c.ret === '0');
      expect(syncs.length, 'an fdatasync during the FLUSH').toBeGreaterThan(0);
      // It started after the request was sent and returned before the completion was seen.
      expect(syncs.some((c) => c.start >= before - 0.001 && c.end <= after + 0.001)).toBe(true);
    });
  });

  it('with writeback off, writes go through O_DSYNC before they complete', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const tr = await trace(be().proc.pid!);
      expect(await s.fe.setConfig(32, Uint8Array.of(0))).toBe(0n); // writeback byte: write through
      const before = secondsOfDay(Date.now());
      const r = await s.blk[0]!.run({ type: T.OUT, sector: 16, out: new Uint8Array(4096).fill(9) });
      const after = secondsOfDay(Date.now());
      const calls = await tr.stop();
      expect(r.status).toBe(S.OK);
      // The image opens its O_DSYNC descriptor at start (not in the middle of a request): find it in /proc.
      const fd = dsyncFd(be().proc.pid!, be().image);
      expect(fd, 'an O_DSYNC descriptor on the image').toBeDefined();
      const write = calls.find((c) => c.name.startsWith('pwrite') && c.args.startsWith(`${fd},`));
      expect(write, `a write through fd ${fd}`).toBeDefined();
      expect(write!.start).toBeGreaterThanOrEqual(before - 0.001);
      expect(write!.end).toBeLessThanOrEqual(after + 0.001);
      // Back to writeback for the tests after this one.
      expect(await s.fe.setConfig(32, Uint8Array.of(1))).toBe(0n);
    });
  });
});
