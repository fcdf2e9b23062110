// Durability as the kernel shows it: a FLUSH completes only after an fdatasync
// of the image returned, and with writeback off a write is synced before it
// completes. Both I/O engines: with io_uring the syncs run in io-wq kernel
// threads, which strace cannot see, so ext4's own tracepoints are read (the
// test images live on ext4), bracketed by markers written around the request.
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { S, T } from '../driver/blk.js';
import { ftrace, type TraceEvent } from '../support/ftrace.js';
import { useBackend, waitFor, withSession } from './helpers.js';

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

/** Run `request` between two markers; the ext4 sync events of `ino` between them. */
async function syncsDuring(ino: number, request: () => Promise<void>): Promise<TraceEvent[]> {
  const tr = ftrace(['ext4/ext4_sync_file_enter', 'ext4/ext4_sync_file_exit']);
  try {
    tr.mark('vhostd-test: request sent');
    await request();
    tr.mark('vhostd-test: completion seen');
    const all = tr.read();
    const from = all.findIndex((e) => e.text.includes('vhostd-test: request sent'));
    const to = all.findIndex((e) => e.text.includes('vhostd-test: completion seen'));
    expect(from, 'both markers in the trace').toBeGreaterThanOrEqual(0);
    expect(to).toBeGreaterThan(from);
    return all.slice(from + 1, to).filter((e) => new RegExp(`\\bino ${ino}\\b`).test(e.text));
  } finally {
    tr.close();
  }
}

/** A datasync of the image that ran to completion (enter with datasync 1, then exit with ret 0). */
function completedDatasync(events: TraceEvent[]): boolean {
  const enter = events.findIndex((e) => e.event === 'ext4_sync_file_enter' && /datasync 1/.test(e.text));
  return enter >= 0 && events.slice(enter + 1).some((e) => e.event === 'ext4_sync_file_exit' && /ret 0/.test(e.text));
}

// Both engines on the daemon's thread, and io_uring on a queue thread (the cache mode is shared memory there).
describe.each([
  ['io_uring', ''],
  ['threads', ''],
  ['io_uring', ' on a queue thread'],
] as const)('durability with --aio %s%s (ext4 tracepoints)', (aio, where) => {
  const be = useBackend('vhostd', { numQueues: 1, extraArgs: ['--aio', aio, ...(where ? ['--threads', '1'] : [])] });

  it('runs on the engine asked for', async () => {
    const re = new RegExp(`"aio":"${aio}"`);
    // The start-up waited only for the QEMU line; the log comes through another pipe and may trail it.
    await waitFor(() => re.test(be().output()), `"aio":"${aio}" in the log`);
    expect(be().output()).toMatch(re);
  });

  it('completes FLUSH only after an fdatasync of the image has returned', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const q = s.blk[0]!;
      expect((await q.run({ type: T.OUT, sector: 8, out: new Uint8Array(4096).fill(7) })).status).toBe(S.OK);
      const events = await syncsDuring(statSync(be().image).ino, async () => {
        expect((await q.run({ type: T.FLUSH })).status).toBe(S.OK);
      });
      expect(completedDatasync(events), `a datasync of the image inside the FLUSH; saw ${JSON.stringify(events)}`).toBe(true);
    });
  });

  it('with writeback off, syncs each write before completing it', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      expect(await s.fe.setConfig(32, Uint8Array.of(0))).toBe(0n); // writeback byte: write through
      try {
        const events = await syncsDuring(statSync(be().image).ino, async () => {
          expect((await s.blk[0]!.run({ type: T.OUT, sector: 16, out: new Uint8Array(4096).fill(9) })).status).toBe(S.OK);
        });
        expect(completedDatasync(events), `a datasync of the image inside the write; saw ${JSON.stringify(events)}`).toBe(true);
        if (aio === 'threads') {
          // The O_DSYNC descriptor is opened with the image, not in the middle of a request.
          expect(dsyncFd(be().proc.pid!, be().image), 'an O_DSYNC descriptor on the image').toBeDefined();
        }
      } finally {
        expect(await s.fe.setConfig(32, Uint8Array.of(1))).toBe(0n); // back to writeback
      }
    });
  });

  it('with writeback on, a plain write completes without a sync', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const events = await syncsDuring(statSync(be().image).ino, async () => {
        expect((await s.blk[0]!.run({ type: T.OUT, sector: 24, out: new Uint8Array(4096).fill(3) })).status).toBe(S.OK);
      });
      expect(events, 'no sync of the image for a cached write').toEqual([]);
    });
  });
});
