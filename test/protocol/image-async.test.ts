// Nothing that can block for long runs on the daemon's main thread, which
// serves every blk queue and the socket: strace -f on the running daemon shows
// which thread made each fallocate (DISCARD, WRITE_ZEROES) and that a
// write-through write opens nothing in the middle of the request.
import { describe, expect, it } from 'vitest';
import { randomBytes, S, SECTOR } from '../driver/blk.js';
import { strace } from '../support/strace.js';
import { expectBytes, isZero, useBackend, withSession } from './helpers.js';

interface Call {
  /** The thread that made the call (strace -f prints its tid first). */
  tid: number;
  name: string;
  args: string;
}

/** strace -f on a running daemon for the given syscalls; stop() returns the calls that started. */
async function trace(pid: number, syscalls: string[]): Promise<{ stop(): Promise<Call[]> }> {
  const t = await strace(pid, syscalls);
  return {
    async stop() {
      const calls: Call[] = [];
      for (const line of await t.stop()) {
        // "tid name(args) = ret" or, interleaved with other threads, "tid name(args <unfinished ...>".
        const m = /^(\d+)\s+(\w+)\((.*?)(?:\)\s+=|\s*<unfinished)/.exec(line);
        if (m) calls.push({ tid: Number(m[1]), name: m[2]!, args: m[3]! });
      }
      return calls;
    },
  };
}

describe('blocking syscalls stay off the main thread (vhostd, seen through strace)', { timeout: 60_000 }, () => {
  const be = useBackend('vhostd');

  // First in the file: the daemon has served no write-through request yet.
  it('a write-through write opens no descriptor while the request is served', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      expect(await s.fe.setConfig(32, Uint8Array.of(0))).toBe(0n); // writeback off: writes go through O_DSYNC
      const tr = await trace(be().proc.pid!, ['openat', 'open']);
      const data = randomBytes(8 * SECTOR);
      expect((await s.blk[0]!.write(64, data)).status).toBe(S.OK);
      const calls = await tr.stop();
      expect(calls.filter((c) => c.args.includes(be().image)), 'opens of the image during the request').toEqual([]);
      expectBytes(be().readImage(64 * SECTOR, data.length), data, 'image after the write-through write');
      expect(await s.fe.setConfig(32, Uint8Array.of(1))).toBe(0n);
    });
  });

  it.each([
    ['writeback on', 1],
    ['write through', 0],
  ])('DISCARD and WRITE_ZEROES (%s): fallocate runs on pool threads, never the main thread, and the ranges read back as zeros', async (_mode, wce) => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      expect(await s.fe.setConfig(32, Uint8Array.of(wce))).toBe(0n);
      const b = s.blk[0]!;
      const base = 4096;
      const data = randomBytes(256 * SECTOR);
      expect((await b.write(base, data)).status).toBe(S.OK);
      const pid = be().proc.pid!;
      const tr = await trace(pid, ['fallocate']);
      const results = await Promise.all([
        b.discard([{ sector: base, sectors: 32 }]),
        b.writeZeroes([{ sector: base + 64, sectors: 32 }]),
        b.writeZeroes([{ sector: base + 128, sectors: 32, flags: 1 }]), // UNMAP: may punch a hole
        b.discard([{ sector: base + 200, sectors: 8 }]),
      ]);
      const calls = await tr.stop();
      expect(results.map((r) => r.status)).toEqual([S.OK, S.OK, S.OK, S.OK]);
      const fallocates = calls.filter((c) => c.name === 'fallocate');
      expect(fallocates.length, 'a fallocate per segment at least').toBeGreaterThanOrEqual(4);
      // The main thread's tid is the pid; every other tid is a pool (or worker) thread.
      expect(fallocates.filter((c) => c.tid === pid), 'fallocate calls made on the main thread').toEqual([]);
      const expected = data.slice();
      for (const [from, n] of [[0, 32], [64, 32], [128, 32], [200, 8]] as const) expected.fill(0, from * SECTOR, (from + n) * SECTOR);
      expectBytes((await b.read(base, data.length)).data, expected, 'read after discard/write-zeroes');
      expectBytes(be().readImage(base * SECTOR, data.length), expected, 'image after discard/write-zeroes');
      expect(isZero(be().readImage((base + 64) * SECTOR, 32 * SECTOR))).toBe(true);
      expect(await s.fe.setConfig(32, Uint8Array.of(1))).toBe(0n);
    });
  });
});
