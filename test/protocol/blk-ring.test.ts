// A blk queue against the worst chains a guest can post, each tested
// directly: oversized and endless indirect tables across the whole ring,
// chains past seg_max and size_max, buffers outside memory, short headers,
// chains with no status byte. vhostd must stay small and responsive, and no
// failed request may read as success. Also the notification rules a guest
// relies on: a late call fd, and NOTIFY_ON_EMPTY under EVENT_IDX.
import { beforeEach, describe, expect, it } from 'vitest';
import { native, EFD_CLOEXEC, EFD_NONBLOCK } from '../../src/native/index.js';
import type { Backend } from './backends.js';
import { processUsage as usage, useBackend, waitFor, withSession } from './helpers.js';
import { S, T } from '../driver/blk.js';
import type { GuestMemory } from '../driver/guest.js';
import { DRIVER_FEATURES, type Session } from '../driver/session.js';
import { bit, VF } from '../driver/wire.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, type RawDesc } from '../driver/virtqueue.js';

const SEG_MAX = 126;
const SIZE_MAX = 1 << 20;

function table(mem: GuestMemory, descs: RawDesc[]): number {
  const gpa = mem.alloc(16 * descs.length, 16);
  const v = mem.view(gpa, 16 * descs.length);
  const dv = new DataView(v.buffer, v.byteOffset, v.byteLength);
  descs.forEach((d, i) => {
    dv.setBigUint64(i * 16, BigInt(d.addr), true);
    dv.setUint32(i * 16 + 8, d.len, true);
    dv.setUint16(i * 16 + 12, d.flags, true);
    dv.setUint16(i * 16 + 14, d.next, true);
  });
  return gpa;
}

function header(mem: GuestMemory, type: number, sector = 0): number {
  const gpa = mem.alloc(16);
  const v = mem.view(gpa, 16);
  const dv = new DataView(v.buffer, v.byteOffset, 16);
  dv.setUint32(0, type, true);
  dv.setBigUint64(8, BigInt(sector), true);
  return gpa;
}

/** A status byte preset to S_OK, as a stale buffer in a Linux guest usually is. */
function statusByte(mem: GuestMemory): number {
  const gpa = mem.alloc(1);
  mem.write(gpa, Uint8Array.of(S.OK));
  return gpa;
}

/** A chained list: header, data descriptors, status (all readable up to the header, then writable for IN). */
function chainDescs(hdr: number, data: { addr: number; len: number }[], status: number, write = true): RawDesc[] {
  const all = [{ addr: hdr, len: 16, write: false }, ...data.map((d) => ({ ...d, write })), { addr: status, len: 1, write: true }];
  return all.map((d, i) => ({
    addr: d.addr,
    len: d.len,
    flags: (d.write ? DESC_F_WRITE : 0) | (i < all.length - 1 ? DESC_F_NEXT : 0),
    next: i + 1,
  }));
}

/** Publish an indirect chain at `slot` of queue 0. */
function submitIndirect(s: Session, slot: number, tableGpa: number, entries: number): void {
  s.queues[0]!.submitRaw([{ slot, desc: { addr: tableGpa, len: 16 * entries, flags: DESC_F_INDIRECT, next: 0 } }], slot);
}

describe('hostile chains on a blk queue', { timeout: 180_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('one indirect table of 65,536 chained 512-byte descriptors behind all 1024 avail entries: every request fails with IOERR, memory stays bounded, the socket answers', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 2, queueSize: 1024 });
      const q = s.queues[0]!;
      q.poll = true;
      const n = 65536;
      const buf = s.mem.alloc(512);
      const status = statusByte(s.mem);
      const data = Array.from({ length: n - 2 }, () => ({ addr: buf, len: 512 }));
      const t = table(s.mem, chainDescs(header(s.mem, T.IN), data, status));
      const before = usage(be.proc.pid!);
      for (let slot = 0; slot < 1024; slot++) submitIndirect(s, slot, t, n);
      q.kick();
      // The control path stays alive while the queue works through the ring.
      expect(await s.fe.getQueueNum()).toBe(2n);
      const used = await q.waitUsed(1024, 120_000);
      const after = usage(be.proc.pid!);
      expect(used.every((u) => u.len === 1)).toBe(true);
      expect(s.mem.read(status, 1)[0]).toBe(S.IOERR);
      const grew = after.hwmBytes - before.hwmBytes;
      const cpu = after.cpuSeconds - before.cpuSeconds;
      console.log(`65,536-descriptor table x 1024: peak RSS ${(after.hwmBytes / 2 ** 20).toFixed(0)} MiB (+${(grew / 2 ** 20).toFixed(0)} MiB), ${cpu.toFixed(2)} s CPU`);
      // Before the ring layer was bounded this took the daemon past 4 GB of heap.
      expect(after.hwmBytes).toBeLessThan(256 * 2 ** 20);
      expect(cpu).toBeLessThan(60);
      // The other queue never noticed.
      expect((await s.blk[1]!.read(0, 4096)).status).toBe(S.OK);
    });
  });

  it('a 4096-entry table (4x the queue size) is refused with IOERR, not served as a 2 MiB read', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 1, queueSize: 1024 });
      const q = s.queues[0]!;
      const buf = s.mem.alloc(512);
      s.mem.fill(buf, 512, 0xa5);
      const status = statusByte(s.mem);
      const t = table(s.mem, chainDescs(header(s.mem, T.IN), Array.from({ length: 4094 }, () => ({ addr: buf, len: 512 })), status));
      submitIndirect(s, 0, t, 4096);
      q.kick();
      const [u] = await q.waitUsed(1);
      expect(u!.len).toBe(1);
      expect(s.mem.read(status, 1)[0]).toBe(S.IOERR);
      expect(s.mem.read(buf, 512).every((b) => b === 0xa5)).toBe(true); // nothing was read into it
    });
  });

  it('a chain past seg_max or with a segment past size_max fails with IOERR; one at the limits is served', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 1, queueSize: 256 });
      const q = s.queues[0]!;
      const cases: { data: { addr: number; len: number }[]; expect: number }[] = [];
      const page = s.mem.alloc(512);
      cases.push({ data: Array.from({ length: SEG_MAX }, () => ({ addr: page, len: 512 })), expect: S.OK });
      cases.push({ data: Array.from({ length: SEG_MAX + 1 }, () => ({ addr: page, len: 512 })), expect: S.IOERR });
      const big = s.mem.alloc(2 * SIZE_MAX, 4096);
      cases.push({ data: [{ addr: big, len: SIZE_MAX }], expect: S.OK });
      cases.push({ data: [{ addr: big, len: SIZE_MAX + 512 }], expect: S.IOERR });
      const statuses: number[] = [];
      cases.forEach((c, i) => {
        const st = statusByte(s.mem);
        statuses.push(st);
        const t = table(s.mem, chainDescs(header(s.mem, T.IN), c.data, st));
        submitIndirect(s, i, t, c.data.length + 2);
      });
      q.kick();
      await q.waitUsed(cases.length);
      expect(statuses.map((st) => s.mem.read(st, 1)[0])).toEqual(cases.map((c) => c.expect));
    });
  });

  it('a data buffer outside guest memory, or a header shorter than 16 bytes, gets IOERR in the status byte (never a silent S_OK)', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 1 });
      const q = s.queues[0]!;
      const st1 = statusByte(s.mem);
      q.submitRaw([
        { slot: 0, desc: { addr: header(s.mem, T.IN), len: 16, flags: DESC_F_NEXT, next: 1 } },
        { slot: 1, desc: { addr: 0x7000_0000, len: 4096, flags: DESC_F_WRITE | DESC_F_NEXT, next: 2 } },
        { slot: 2, desc: { addr: st1, len: 1, flags: DESC_F_WRITE, next: 0 } },
      ], 0);
      const st2 = statusByte(s.mem);
      q.submitRaw([
        { slot: 3, desc: { addr: header(s.mem, T.OUT), len: 8, flags: DESC_F_NEXT, next: 4 } },
        { slot: 4, desc: { addr: st2, len: 1, flags: DESC_F_WRITE, next: 0 } },
      ], 3);
      q.kick();
      const used = await q.waitUsed(2);
      expect(used.map((u) => u.len)).toEqual([1, 1]);
      expect([s.mem.read(st1, 1)[0], s.mem.read(st2, 1)[0]]).toEqual([S.IOERR, S.IOERR]);
      // The queue goes on.
      expect((await s.blk[0]!.read(0, 4096)).status).toBe(S.OK);
    });
  });

  it('a chain with no status byte fails the queue without a used entry, and GET_VRING_BASE points at it', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 2 });
      const q = s.queues[0]!;
      expect((await s.blk[0]!.read(0, 512)).status).toBe(S.OK);
      const err = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      try {
        await s.fe.setVringErr(0, err);
        const usedBefore = q.usedIdx();
        const availBefore = q.availIdx;
        // A header and readable data, nothing writable: nowhere to put a status.
        q.submitRaw([
          { slot: 0, desc: { addr: header(s.mem, T.OUT), len: 16, flags: DESC_F_NEXT, next: 1 } },
          { slot: 1, desc: { addr: s.mem.alloc(512), len: 512, flags: 0, next: 0 } },
        ], 0);
        q.kick();
        await waitFor(() => native.read(err, new BigUint64Array(1)) === 8, 'a signal on the err eventfd');
        expect(q.usedIdx()).toBe(usedBefore);
        expect(await s.fe.getVringBase(0)).toBe(availBefore);
        expect((await s.blk[1]!.read(0, 512)).status).toBe(S.OK);
      } finally {
        native.close(err);
      }
    });
  });

  it('a call fd that arrives after completions is signalled once, so they are not stranded', async () => {
    await withSession(be, async (s) => {
      await s.negotiate();
      const fe = s.fe;
      await fe.setFeatures(s.features);
      await fe.setMemTable(s.mem.table());
      const { SplitQueue } = await import('../driver/virtqueue.js');
      const { BlkQueue } = await import('../driver/blk.js');
      const q = new SplitQueue(s.mem, 0, 128, 0);
      s.queues.push(q);
      q.eventIdx = true;
      q.poll = true;
      const blk = new BlkQueue(q, s.mem);
      await fe.setVringNum(0, q.size);
      await fe.setVringBase(0, 0);
      await fe.setVringAddr({ index: 0, ...q.addrs() });
      await fe.setVringKick(0, q.kickFd); // QEMU without guest notifier masking: KICK first, CALL later
      await fe.setVringEnable(0, true);
      expect((await blk.read(0, 512)).status).toBe(S.OK);
      const call = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      try {
        await fe.setVringCall(0, call);
        const counter = new BigUint64Array(1);
        await waitFor(() => native.read(call, counter) === 8, 'a signal on the newly installed call fd', 5_000);
      } finally {
        native.close(call);
      }
    });
  });

  it('NOTIFY_ON_EMPTY under EVENT_IDX: the call fd is signalled when the ring runs empty, even with used_event far ahead', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 1, features: DRIVER_FEATURES | bit(VF.NOTIFY_ON_EMPTY) });
      const q = s.queues[0]!;
      expect(s.features & bit(VF.NOTIFY_ON_EMPTY)).not.toBe(0n);
      expect((await s.blk[0]!.read(0, 512)).status).toBe(S.OK); // the first decision always signals
      q.autoUsedEvent = false;
      q.setUsedEvent(q.lastUsed + 1000); // event index alone: no interrupt for a long while
      const seen = q.drainCall();
      const r = s.blk[0]!.read(8, 512);
      await waitFor(() => q.drainCall() > seen, 'a call signal when the ring ran empty', 5_000);
      expect((await r).status).toBe(S.OK);
    });
  });
});
