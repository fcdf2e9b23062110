// Crash-safe reconnect (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), vhostd only:
// the split-ring layout of the vhost-user spec's "Inflight I/O tracking".
// Most tests forge the record a crashed back-end would leave, so there is no
// reference run; one kills vhostd for real.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, ftruncateSync, openSync, readlinkSync, writeSync } from 'node:fs';
import { beforeEach, describe, expect, it } from 'vitest';
import { native, EFD_CLOEXEC, EFD_NONBLOCK, MFD_CLOEXEC } from '../../src/native/index.js';
import { startBackend, VHOSTD_BIN, type Backend } from './backends.js';
import { annotate, expectBytes, useBackend, waitFor, withSession } from './helpers.js';
import {
  addQueues,
  forgeUsed,
  getInflight,
  INFLIGHT_PROTOCOL,
  rawBlk,
  shuffled,
  sleep,
  startWithInflight,
  status,
  type InflightHandle,
  type RawReq,
} from './inflight-helpers.js';
import { ID_BYTES, randomBytes, S, SECTOR, T } from '../driver/blk.js';
import { FrontEnd } from '../driver/frontend.js';
import { GuestMemory, MiB } from '../driver/guest.js';
import { InflightAreaView, inflightQueueRegion, type InflightQueueView } from '../driver/inflight.js';
import { DRIVER_FEATURES } from '../driver/session.js';
import { SplitQueue } from '../driver/virtqueue.js';
import { bit, F_NEED_REPLY, has, inflightMsg, PF, Req, VERSION, VF, type InflightMsg } from '../driver/wire.js';

const QSIZE = 128;
const IMAGE = 64 * MiB;
const u16 = (v: number): number => v & 0xffff;

/** Full start with an inflight area plus a write/read round trip on both queues: the daemon still serves. */
async function serves(be: Backend): Promise<void> {
  await withSession(be, async (s) => {
    const h = await startWithInflight(s, { queues: 2 });
    try {
      for (const q of s.queues) {
        const d = randomBytes(4096);
        const w = rawBlk(s.mem, q, T.OUT, 2000 + q.index * 8, { out: d });
        const r = rawBlk(s.mem, q, T.IN, 2000 + q.index * 8, { inLen: 4096 });
        q.kick();
        // Two chains on one queue may complete in either order; the read is checked after both.
        await q.waitUsed(2);
        expect(status(s.mem, w)).toBe(S.OK);
        expect(status(s.mem, r)).toBe(S.OK);
      }
      const d = randomBytes(4096);
      const q = s.queues[0]!;
      const w = rawBlk(s.mem, q, T.OUT, 3000, { out: d });
      q.kick();
      await q.waitUsed(1);
      expect(status(s.mem, w)).toBe(S.OK);
      expectBytes(be.readImage(3000 * SECTOR, 4096), d, 'image after a write');
    } finally {
      h.close();
    }
  });
}

function memfdOfSize(size: number, name = 'vhostd-test-inflight'): number {
  const fd = native.memfdCreate(name, MFD_CLOEXEC);
  ftruncateSync(fd, size);
  return fd;
}

/** Forge one queue's record as a back-end that crashed would have left it. */
function forge(rec: InflightQueueView, o: { descNum?: number; usedIdx: number; lastBatchHead?: number; inflight: { head: number; counter: bigint; next?: number }[] }): void {
  rec.clear();
  rec.version = 1;
  rec.descNum = o.descNum ?? QSIZE;
  rec.usedIdx = u16(o.usedIdx);
  rec.lastBatchHead = o.lastBatchHead ?? 0;
  for (const e of o.inflight) rec.setEntry(e.head, { inflight: 1, counter: e.counter, next: e.next ?? 0 });
}

/** Wait until the record says nothing is in flight and agrees with used->idx. */
async function settled(rec: InflightQueueView, q: SplitQueue, what: string): Promise<void> {
  await waitFor(() => rec.inflightHeads().length === 0 && rec.usedIdx === q.usedIdx(), `${what}: inflight flags cleared and used_idx = used->idx`, 2_000).catch((e: Error) => {
    e.message += ` (flags on heads [${rec.inflightHeads()}], record used_idx ${rec.usedIdx}, used->idx ${q.usedIdx()})`;
    throw e;
  });
}

/** Write bytes into the image file directly, as a back-end that completed a write would have. */
function writeImage(be: Backend, offset: number, data: Uint8Array): void {
  const f = openSync(be.image, 'r+');
  try {
    writeSync(f, data, 0, data.length, offset);
  } finally {
    closeSync(f);
  }
}

/** pino warnings (level 40) that mention the inflight record. */
function inflightWarnings(out: string): number {
  return out.split('\n').filter((l) => l.includes('"level":40') && /inflight/i.test(l)).length;
}

// On the daemon's thread and on queue threads, which view the daemon's mapping of the record.
describe.each([
  ['', [] as string[]],
  [' on queue threads', ['--threads', '1']],
])('vhostd inflight I/O tracking (INFLIGHT_SHMFD)%s', { timeout: 60_000 }, (_where, placement) => {
  const backend = useBackend('vhostd', { numQueues: 2, imageBytes: IMAGE, extraArgs: placement });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  describe('GET_INFLIGHT_FD / SET_INFLIGHT_FD', () => {
    it('INFLIGHT_SHMFD (bit 12) and RESET_DEVICE (bit 13) are offered', async () => {
      await withSession(be, async (s) => {
        const p = await s.fe.getProtocolFeatures();
        expect(has(p, PF.INFLIGHT_SHMFD)).toBe(true);
        expect(has(p, PF.RESET_DEVICE)).toBe(true);
      });
    });

    it.each([
      [1, 128],
      [2, 128],
      [2, 256],
      [1, 1],
      [2, 1024],
    ])('%i queue(s) of %i: 24-byte reply with one zeroed memfd of num_queues x align64(16 + 16 x size); SET_INFLIGHT_FD acks it', async (nq, qs) => {
      await withSession(be, async (s) => {
        await s.negotiate({ protocolFeatures: INFLIGHT_PROTOCOL });
        const r = await s.fe.getInflightFd(nq, qs);
        try {
          const expected = nq * inflightQueueRegion(qs);
          expect(inflightQueueRegion(qs) % 64).toBe(0);
          expect(r.mmapSize).toBe(BigInt(expected));
          expect(r.numQueues).toBe(nq);
          expect(r.queueSize).toBe(qs);
          expect(readlinkSync(`/proc/self/fd/${r.fd}`)).toMatch(/^\/memfd:/);
          expect(fstatSync(r.fd).size).toBeGreaterThanOrEqual(Number(r.mmapOffset) + expected);
          const area = new InflightAreaView(r.fd, expected, nq, qs, Number(r.mmapOffset));
          try {
            expect(area.isZero()).toBe(true);
          } finally {
            area.destroy();
          }
          expect(await s.fe.setInflightFd(r, r.fd)).toBe(0n);
          expect(await s.fe.getQueueNum()).toBe(2n);
          expect(s.fe.pending()).toEqual([]);
        } finally {
          native.close(r.fd);
        }
      });
    });

    it('the area is not touched before a ring starts, then gets version 1 and desc_num on each started queue', async () => {
      await withSession(be, async (s) => {
        await s.negotiate({ protocolFeatures: INFLIGHT_PROTOCOL });
        const h = await getInflight(s.fe, 2, 256);
        try {
          await s.fe.setInflightFd(h.desc, h.fd);
          expect(h.area.isZero()).toBe(true);
          addQueues(s, 2, 256);
          await s.startRings();
          for (const i of [0, 1]) {
            const rec = h.area.queue(i);
            expect(rec.version, `queue ${i} version`).toBe(1);
            expect(rec.descNum, `queue ${i} desc_num`).toBe(256);
            expect(rec.usedIdx).toBe(0);
            expect(rec.inflightHeads()).toEqual([]);
          }
        } finally {
          h.close();
        }
      });
    });
  });

  describe('malformed inflight messages close the connection, and the daemon serves the next', () => {
    const good = (nq = 2, qs = QSIZE): InflightMsg => ({ mmapSize: BigInt(nq * inflightQueueRegion(qs)), mmapOffset: 0n, numQueues: nq, queueSize: qs });
    let made: number[] = [];
    const area = (size = Number(good().mmapSize)): number => {
      const fd = memfdOfSize(size);
      made.push(fd);
      return fd;
    };
    const set = (fe: FrontEnd, m: InflightMsg, fds: number[]): void => fe.send(Req.SET_INFLIGHT_FD, VERSION, inflightMsg(m), fds);
    const cases: { name: string; negotiate?: bigint; bad: (fe: FrontEnd) => void }[] = [
      { name: 'SET_INFLIGHT_FD without an fd', bad: (fe) => set(fe, good(), []) },
      { name: 'SET_INFLIGHT_FD with two fds', bad: (fe) => set(fe, good(), [area(), area()]) },
      { name: 'SET_INFLIGHT_FD with a 16-byte payload', bad: (fe) => fe.send(Req.SET_INFLIGHT_FD, VERSION, inflightMsg(good()).subarray(0, 16), [area()]) },
      {
        name: 'SET_INFLIGHT_FD with a 32-byte payload',
        bad: (fe) => {
          const p = new Uint8Array(32);
          p.set(inflightMsg(good()));
          fe.send(Req.SET_INFLIGHT_FD, VERSION, p, [area()]);
        },
      },
      { name: 'SET_INFLIGHT_FD for 3 queues (the device has 2)', bad: (fe) => set(fe, good(3), [area(Number(good(3).mmapSize))]) },
      { name: 'SET_INFLIGHT_FD for 0 queues', bad: (fe) => set(fe, { ...good(), numQueues: 0 }, [area()]) },
      { name: 'SET_INFLIGHT_FD with queue_size 0', bad: (fe) => set(fe, { ...good(), queueSize: 0 }, [area()]) },
      { name: 'SET_INFLIGHT_FD with mmap_size one queue region short', bad: (fe) => set(fe, { ...good(), mmapSize: good().mmapSize - BigInt(inflightQueueRegion(QSIZE)) }, [area()]) },
      { name: 'SET_INFLIGHT_FD with mmap_size 64 bytes short', bad: (fe) => set(fe, { ...good(), mmapSize: good().mmapSize - 64n }, [area()]) },
      { name: 'SET_INFLIGHT_FD with mmap_size 0', bad: (fe) => set(fe, { ...good(), mmapSize: 0n }, [area()]) },
      { name: 'SET_INFLIGHT_FD with an unaligned mmap_offset', bad: (fe) => set(fe, { ...good(), mmapOffset: 100n }, [area(8192)]) },
      {
        name: 'SET_INFLIGHT_FD with an fd that cannot be mapped (an eventfd)',
        bad: (fe) => {
          const fd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
          made.push(fd);
          set(fe, good(), [fd]);
        },
      },
      { name: 'GET_INFLIGHT_FD for 3 queues', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg({ ...good(3), mmapSize: 0n })) },
      { name: 'GET_INFLIGHT_FD for 0 queues', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg({ ...good(), numQueues: 0, mmapSize: 0n })) },
      { name: 'GET_INFLIGHT_FD with queue_size 0', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg({ ...good(), queueSize: 0, mmapSize: 0n })) },
      { name: 'GET_INFLIGHT_FD with queue_size 1025 (the device allows 1024)', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg({ ...good(), queueSize: 1025, mmapSize: 0n })) },
      { name: 'GET_INFLIGHT_FD with a 16-byte payload', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg(good()).subarray(0, 16)) },
      { name: 'GET_INFLIGHT_FD carrying an fd', bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg(good()), [area()]) },
      {
        name: 'GET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated',
        negotiate: bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG),
        bad: (fe) => fe.send(Req.GET_INFLIGHT_FD, VERSION, inflightMsg(good())),
      },
      {
        name: 'SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated',
        negotiate: bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG),
        bad: (fe) => set(fe, good(), [area()]),
      },
    ];

    it.each(cases)('$name', async ({ negotiate, bad }) => {
      const fe = await FrontEnd.connect(be.socket);
      try {
        fe.timeoutMs = 5_000;
        await fe.getFeatures();
        await fe.getProtocolFeatures();
        await fe.setProtocolFeatures(negotiate ?? INFLIGHT_PROTOCOL);
        bad(fe);
        expect(await fe.waitClosed()).toEqual([]);
      } catch (e) {
        throw annotate(e, be);
      } finally {
        fe.close();
        for (const fd of made) native.close(fd);
        made = [];
      }
      expect(be.exited()).toBe(false);
      await serves(be);
    });

    it('an area fd shorter than mmap_size is refused at SET_INFLIGHT_FD, not a SIGBUS when a ring starts', async () => {
      // mmap of a memfd past its end succeeds; the first touch of those pages raises SIGBUS.
      const fd = memfdOfSize(0);
      let outcome = '';
      try {
        await withSession(be, async (s) => {
          await s.negotiate({ protocolFeatures: INFLIGHT_PROTOCOL });
          s.fe.timeoutMs = 5_000;
          s.fe.send(Req.SET_INFLIGHT_FD, VERSION | F_NEED_REPLY, inflightMsg(good()), [fd]);
          let acked: bigint | undefined;
          try {
            const m = await s.fe.recv();
            acked = new DataView(m.payload.buffer, m.payload.byteOffset, 8).getBigUint64(0, true);
          } catch {
            outcome = 'closed';
          }
          if (acked !== undefined && acked !== 0n) outcome = 'nacked';
          if (acked === 0n) {
            // Accepted: show what that leads to when the rings start.
            addQueues(s, 2, QSIZE);
            try {
              await s.startRings();
              outcome = 'accepted, and the rings started';
            } catch (e) {
              await sleep(200);
              outcome = `accepted (ack 0); starting the rings then failed: ${(e as Error).message.split('\n')[0]}; ` +
                `daemon ${be.exited() ? `DIED (${be.proc.signalCode ?? be.proc.exitCode})` : 'alive'}`;
            }
          }
        });
      } catch (e) {
        outcome ||= `session failed: ${(e as Error).message.split('\n')[0]}`;
      } finally {
        native.close(fd);
      }
      expect(outcome, `SET_INFLIGHT_FD with an empty memfd claiming ${good().mmapSize} bytes`).toBe('closed');
      expect(be.exited()).toBe(false);
      await serves(be);
    });

    it('the same for guest memory: a SET_MEM_TABLE region past the end of its fd is refused, not a SIGBUS when a ring starts', async () => {
      // Same root cause as above (no size check on a front-end's fd before mmap); kept here beside it.
      const fd = memfdOfSize(0, 'vhostd-test-guest-empty');
      const uva = 0x7100_0000_0000n;
      let outcome = '';
      try {
        const fe = await FrontEnd.connect(be.socket);
        try {
          fe.timeoutMs = 5_000;
          await fe.getFeatures();
          await fe.getProtocolFeatures();
          await fe.setProtocolFeatures(bit(PF.MQ) | bit(PF.REPLY_ACK));
          await fe.setFeatures(bit(VF.VERSION_1));
          const ack = await fe.setMemTable([{ guestPhysAddr: 0n, memorySize: BigInt(MiB), userspaceAddr: uva, mmapOffset: 0n, fd }], { allowNack: true });
          if (ack !== 0n) outcome = 'nacked';
          else {
            await fe.setVringNum(0, 64);
            await fe.setVringBase(0, 0);
            await fe.setVringAddr({ index: 0, desc: uva + 0x10000n, avail: uva + 0x20000n, used: uva + 0x30000n });
            const kick = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            try {
              await fe.setVringKick(0, kick);
              outcome = 'accepted, and the ring started';
            } finally {
              native.close(kick);
            }
          }
        } catch (e) {
          await sleep(200);
          outcome = fe.isClosed && !be.exited() ? 'closed' : `failed: ${(e as Error).message.split('\n')[0]}; daemon ${be.exited() ? `DIED (${be.proc.signalCode ?? be.proc.exitCode})` : 'alive'}`;
        } finally {
          fe.close();
        }
      } finally {
        native.close(fd);
      }
      expect(['closed', 'nacked'], `SET_MEM_TABLE with an empty memfd claiming 1 MiB: ${outcome}`).toContain(outcome);
      expect(be.exited()).toBe(false);
      await serves(be);
    });
  });

  describe('normal operation keeps the record per spec', () => {
    it('a completed batch: flags 0, used_idx = used->idx, counters rise in avail order, last_batch_head = last used head', async () => {
      await withSession(be, async (s) => {
        const h = await startWithInflight(s, { queues: 2 });
        try {
          const [q0, q1] = s.queues as [SplitQueue, SplitQueue];
          const reqs: RawReq[] = [];
          for (let i = 0; i < 16; i++) reqs.push(rawBlk(s.mem, q0, T.OUT, 100 + i * 8, { out: randomBytes(4096) }));
          q0.kick();
          const used = await q0.waitUsed(16);
          expect(used.length).toBe(16);
          for (const r of reqs) expect(status(s.mem, r)).toBe(S.OK);
          const rec = h.area.queue(0);
          await settled(rec, q0, 'queue 0');
          expect(rec.usedIdx).toBe(16);
          // The counter records fetch order, which for new chains is avail order.
          const counters = reqs.map((r) => rec.entry(r.head).counter);
          for (let i = 0; i < counters.length; i++) {
            expect(counters[i]! > 0n, `counter of request ${i}`).toBe(true);
            if (i) expect(counters[i]! > counters[i - 1]!, `counter ${i} (${counters[i]}) after ${counters[i - 1]}`).toBe(true);
          }
          expect(rec.lastBatchHead).toBe(used[used.length - 1]!.id);
          // The other queue's record is its own.
          const rec1 = h.area.queue(1);
          expect(rec1.usedIdx).toBe(0);
          expect(rec1.inflightHeads()).toEqual([]);
          const r1 = rawBlk(s.mem, q1, T.IN, 100, { inLen: 4096 });
          q1.kick();
          await q1.waitUsed(1);
          expect(status(s.mem, r1)).toBe(S.OK);
          await settled(rec1, q1, 'queue 1');
          expect(rec1.usedIdx).toBe(1);
          expect(rec1.lastBatchHead).toBe(r1.head);
          expect(rec.usedIdx).toBe(16);
        } finally {
          h.close();
        }
      });
    });

    it('requests being processed are marked inflight with their counter', async () => {
      // 40 write-through writes of 1 MiB (3 descriptors each in a 128-entry table): long enough that an in-flight entry is observable from here.
      await withSession(
        be,
        async (s) => {
          const h = await startWithInflight(s, { queues: 1 });
          try {
            expect(await s.fe.setConfig(32, Uint8Array.of(0))).toBe(0n);
            const q = s.queues[0]!;
            const rec = h.area.queue(0);
            const reqs: RawReq[] = [];
            for (let i = 0; i < 40; i++) reqs.push(rawBlk(s.mem, q, T.OUT, 8192 + i * 2048, { out: randomBytes(MiB) }));
            const heads = new Set(reqs.map((r) => r.head));
            q.kick();
            let seen = 0;
            let bad = '';
            const deadline = Date.now() + 10_000;
            // Busy loop on purpose: the daemon is another process, and yielding could miss the window.
            while (Date.now() < deadline && q.usedIdx() !== 40) {
              for (const head of rec.inflightHeads()) {
                seen++;
                if (!heads.has(head)) bad ||= `head ${head} is flagged but was never submitted`;
                else if (rec.entry(head).counter === 0n) bad ||= `head ${head} is flagged with counter 0`;
              }
            }
            expect(bad).toBe('');
            expect(seen, 'inflight flags observed while 40 MiB of write-through writes ran').toBeGreaterThan(0);
            await q.waitUsed(40);
            for (const r of reqs) expect(status(s.mem, r)).toBe(S.OK);
            await settled(rec, q, 'after the writes');
          } finally {
            h.close();
          }
        },
        [{ gpa: 0, size: 64 * MiB }],
      );
    });

    it('a clean stop and restart with the same area resubmits nothing', async () => {
      await withSession(be, async (s) => {
        const h = await startWithInflight(s, { queues: 1 });
        try {
          const q = s.queues[0]!;
          for (let i = 0; i < 5; i++) rawBlk(s.mem, q, T.OUT, 500 + i * 8, { out: randomBytes(4096) });
          q.kick();
          await q.waitUsed(5);
          const [base] = await s.stopDevice();
          expect(base).toBe(5);
          // QEMU sends the area again on every start.
          await s.fe.setInflightFd(h.desc, h.fd);
          await s.startRings();
          const r = rawBlk(s.mem, q, T.OUT, 600, { out: randomBytes(4096) });
          q.kick();
          const used = await q.waitUsed(1);
          expect(used.map((u) => u.id)).toEqual([r.head]);
          const [again] = await s.stopDevice();
          expect(again).toBe(6);
          expect(q.usedIdx()).toBe(6);
          expect(q.collect()).toEqual([]);
          await settled(h.area.queue(0), q, 'after restart');
        } finally {
          h.close();
        }
      });
    });
  });

  describe('recovery from a crashed back-end (forged record, new connection)', () => {
    it('n requests left in flight complete exactly once, their data lands, and a new request follows (indices wrap)', async () => {
      const U = 65533;
      const n = 6;
      await withSession(be, async (s) => {
        const reqs: RawReq[] = [];
        const data: Uint8Array[] = [];
        const h = await startWithInflight(s, {
          queues: 2,
          startIndex: U,
          craft: (h, [q0]) => {
            for (let i = 0; i < n; i++) {
              data.push(randomBytes(4096));
              reqs.push(rawBlk(s.mem, q0!, T.OUT, 10_000 + i * 16, { out: data[i] }));
            }
            // Fetched in a shuffled order, so counter order is neither head nor avail order.
            const order = shuffled(reqs.map((r) => r.head));
            forge(h.area.queue(0), { usedIdx: U, inflight: order.map((head, i) => ({ head, counter: BigInt(100 + i) })) });
          },
        });
        try {
          const q = s.queues[0]!;
          expect(q.base).toBe(U);
          q.kick();
          const used = await q.waitUsed(n);
          expect(used.map((u) => u.id).sort((a, b) => a - b)).toEqual(reqs.map((r) => r.head).sort((a, b) => a - b));
          for (const r of reqs) expect(status(s.mem, r)).toBe(S.OK);
          reqs.forEach((r, i) => expectBytes(be.readImage(r.sector * SECTOR, 4096), data[i]!, `request ${i} in the image`));
          const rec = h.area.queue(0);
          await settled(rec, q, 'after recovery');
          expect(rec.usedIdx).toBe(u16(U + n));
          // Avail resumes after the n: a new request is the next one processed.
          const d = randomBytes(4096);
          const r = rawBlk(s.mem, q, T.OUT, 20_000, { out: d });
          q.kick();
          const next = await q.waitUsed(1);
          expect(next.map((u) => u.id)).toEqual([r.head]);
          expect(status(s.mem, r)).toBe(S.OK);
          expectBytes(be.readImage(20_000 * SECTOR, 4096), d, 'new request in the image');
          const bases = await s.stopDevice();
          expect(bases[0]).toBe(u16(U + n + 1));
          expect(q.usedIdx()).toBe(u16(U + n + 1));
          expect(q.collect()).toEqual([]);
        } finally {
          h.close();
        }
      });
    });

    it('resubmission follows the counter order', async () => {
      // GET_ID completes inline while vhostd pops it (no thread-pool I/O), so the
      // used ring shows the resubmission order; reads and writes finish in
      // whatever order the thread pool does.
      const n = 8;
      await withSession(be, async (s) => {
        const reqs: RawReq[] = [];
        let byCounter: number[] = [];
        const h = await startWithInflight(s, {
          queues: 1,
          startIndex: 40,
          craft: (h, [q]) => {
            for (let i = 0; i < n; i++) reqs.push(rawBlk(s.mem, q!, T.GET_ID, 0, { inLen: ID_BYTES }));
            byCounter = shuffled(reqs.map((r) => r.head), 777);
            // Counters need not be dense; leave gaps.
            forge(h.area.queue(0), { usedIdx: 40, inflight: byCounter.map((head, i) => ({ head, counter: BigInt(1000 + 7 * i) })) });
          },
        });
        try {
          expect(byCounter).not.toEqual(reqs.map((r) => r.head));
          const q = s.queues[0]!;
          q.kick();
          const used = await q.waitUsed(n);
          expect(used.map((u) => u.id)).toEqual(byCounter);
          for (const r of reqs) expect(status(s.mem, r)).toBe(S.OK);
          await settled(h.area.queue(0), q, 'after recovery');
        } finally {
          h.close();
        }
      });
    });

    it('requests completed out of order before the crash: only those still in flight run, none twice, none lost', async () => {
      // A back-end popped a0..a5 and completed a1 and a3. QEMU restores last_avail to
      // used->idx (a2's slot): a back-end trusting it alone would run a3 again and lose a0.
      const U0 = 300;
      await withSession(be, async (s) => {
        const reqs: RawReq[] = [];
        const data: Uint8Array[] = [];
        const h = await startWithInflight(s, {
          queues: 1,
          startIndex: U0,
          craft: (h, [q]) => {
            for (let i = 0; i < 6; i++) {
              data.push(randomBytes(4096));
              reqs.push(rawBlk(s.mem, q!, T.OUT, 30_000 + i * 16, { out: data[i] }));
            }
            const done = [reqs[1]!, reqs[3]!];
            for (const r of done) writeImage(be, r.sector * SECTOR, r.out!);
            forgeUsed(s.mem, q!, done);
            expect(q!.collect().map((u) => u.id)).toEqual(done.map((r) => r.head));
            // The guest reuses a completed request's buffer: running it again would corrupt the disk.
            for (const r of done) s.mem.fill(r.dataGpa, 4096, 0xee);
            q!.base = u16(U0 + 2);
            forge(h.area.queue(0), {
              usedIdx: U0 + 2,
              lastBatchHead: reqs[3]!.head,
              inflight: [0, 2, 4, 5].map((i) => ({ head: reqs[i]!.head, counter: BigInt(i + 1) })),
            });
            for (const i of [1, 3]) h.area.queue(0).setEntry(reqs[i]!.head, { inflight: 0, counter: BigInt(i + 1) });
            h.area.queue(0).setEntry(reqs[3]!.head, { next: reqs[1]!.head });
          },
        });
        try {
          const q = s.queues[0]!;
          q.kick();
          const used = await q.waitUsed(4);
          expect(used.map((u) => u.id).sort((a, b) => a - b)).toEqual([0, 2, 4, 5].map((i) => reqs[i]!.head).sort((a, b) => a - b));
          for (const i of [0, 2, 4, 5]) {
            expect(status(s.mem, reqs[i]!)).toBe(S.OK);
            expectBytes(be.readImage(reqs[i]!.sector * SECTOR, 4096), data[i]!, `a${i} in the image`);
          }
          for (const i of [1, 3]) expectBytes(be.readImage(reqs[i]!.sector * SECTOR, 4096), data[i]!, `a${i} (completed before the crash) not run again`);
          await settled(h.area.queue(0), q, 'after recovery');
          const r = rawBlk(s.mem, q, T.OUT, 31_000, { out: randomBytes(4096) });
          q.kick();
          expect((await q.waitUsed(1)).map((u) => u.id)).toEqual([r.head]);
          const [base] = await s.stopDevice();
          expect(base).toBe(U0 + 7);
          expect(q.usedIdx()).toBe(U0 + 7);
          expect(q.collect()).toEqual([]);
        } finally {
          h.close();
        }
      });
    });

    it('interrupted batch: used->idx moved k past used_idx, so the last batch completed and is not resubmitted', async () => {
      // Crash after publishing used->idx for batch b0..b2 and before clearing their flags.
      const U = 1000;
      await withSession(be, async (s) => {
        const reqs: RawReq[] = [];
        const data: Uint8Array[] = [];
        const h = await startWithInflight(s, {
          queues: 1,
          startIndex: U,
          craft: (h, [q]) => {
            for (let i = 0; i < 6; i++) {
              data.push(randomBytes(4096));
              reqs.push(rawBlk(s.mem, q!, T.OUT, 40_000 + i * 16, { out: data[i] }));
            }
            const batch = [reqs[0]!, reqs[2]!, reqs[4]!];
            const rest = [reqs[1]!, reqs[3]!, reqs[5]!];
            for (const r of batch) writeImage(be, r.sector * SECTOR, r.out!);
            forgeUsed(s.mem, q!, batch);
            expect(q!.collect().length).toBe(3);
            for (const r of batch) s.mem.fill(r.dataGpa, 4096, 0xee);
            q!.base = u16(U + 3);
            const rec = h.area.queue(0);
            forge(rec, {
              usedIdx: U,
              lastBatchHead: batch[2]!.head,
              inflight: reqs.map((r, i) => ({ head: r.head, counter: BigInt(50 + i) })),
            });
            // last_batch_head -> b2 -> b1 -> b0; b0's next points at a request still in flight, which must not be cleared.
            rec.setEntry(batch[2]!.head, { next: batch[1]!.head });
            rec.setEntry(batch[1]!.head, { next: batch[0]!.head });
            rec.setEntry(batch[0]!.head, { next: rest[0]!.head });
          },
        });
        try {
          const q = s.queues[0]!;
          q.kick();
          const used = await q.waitUsed(3);
          expect(used.map((u) => u.id).sort((a, b) => a - b)).toEqual([1, 3, 5].map((i) => reqs[i]!.head).sort((a, b) => a - b));
          for (const i of [1, 3, 5]) {
            expect(status(s.mem, reqs[i]!)).toBe(S.OK);
            expectBytes(be.readImage(reqs[i]!.sector * SECTOR, 4096), data[i]!, `request ${i} in the image`);
          }
          for (const i of [0, 2, 4]) expectBytes(be.readImage(reqs[i]!.sector * SECTOR, 4096), data[i]!, `batch request ${i} not run again`);
          const rec = h.area.queue(0);
          await settled(rec, q, 'after recovery');
          expect(rec.usedIdx).toBe(U + 6);
          const r = rawBlk(s.mem, q, T.OUT, 41_000, { out: randomBytes(4096) });
          q.kick();
          expect((await q.waitUsed(1)).map((u) => u.id)).toEqual([r.head]);
          const [base] = await s.stopDevice();
          expect(base).toBe(U + 7);
          expect(q.usedIdx()).toBe(U + 7);
          expect(q.collect()).toEqual([]);
        } finally {
          h.close();
        }
      });
    });

    describe('a corrupt record: the ring starts fresh, with a warning, and I/O works', () => {
      interface Corrupt {
        name: string;
        /** Completions the dead back-end published (the driver has consumed them). */
        completed?: number;
        forge: (rec: InflightQueueView, reqs: RawReq[], base: number) => void;
      }
      const cases: Corrupt[] = [
        {
          name: 'desc_num is not the queue size',
          forge: (rec, reqs, base) => forge(rec, { descNum: 64, usedIdx: base, inflight: reqs.map((r, i) => ({ head: r.head, counter: BigInt(i + 1) })) }),
        },
        {
          name: 'desc_num is 0',
          forge: (rec, reqs, base) => forge(rec, { descNum: 0, usedIdx: base, inflight: reqs.map((r, i) => ({ head: r.head, counter: BigInt(i + 1) })) }),
        },
        {
          name: 'the last batch list runs out of range',
          completed: 2,
          forge: (rec, reqs, base) => {
            const [c0, c1] = reqs as [RawReq, RawReq];
            forge(rec, { usedIdx: base - 2, lastBatchHead: c1.head, inflight: [{ head: c1.head, counter: 2n, next: 4000 }, { head: c0.head, counter: 1n }] });
          },
        },
        {
          name: 'last_batch_head is out of range',
          completed: 1,
          forge: (rec, reqs, base) => forge(rec, { usedIdx: base - 1, lastBatchHead: 999, inflight: [{ head: reqs[0]!.head, counter: 1n }] }),
        },
        {
          name: 'used->idx is more than a queue past used_idx',
          forge: (rec, reqs, base) => forge(rec, { usedIdx: base - 300, inflight: reqs.map((r, i) => ({ head: r.head, counter: BigInt(i + 1) })) }),
        },
      ];

      it.each(cases)('$name', async ({ completed = 0, forge: forgeRec }) => {
        const before = inflightWarnings(be.output());
        const U = 5000;
        await withSession(be, async (s) => {
          const fresh: RawReq[] = [];
          const dead: RawReq[] = [];
          const data: Uint8Array[] = [];
          const h = await startWithInflight(s, {
            queues: 1,
            startIndex: U,
            craft: (h, [q]) => {
              for (let i = 0; i < completed; i++) dead.push(rawBlk(s.mem, q!, T.FLUSH, 0));
              if (completed) {
                forgeUsed(s.mem, q!, dead);
                expect(q!.collect().length).toBe(completed);
              }
              const base = u16(U + completed);
              q!.base = base;
              for (let i = 0; i < 4; i++) {
                data.push(randomBytes(4096));
                fresh.push(rawBlk(s.mem, q!, T.OUT, 50_000 + i * 16, { out: data[i] }));
              }
              forgeRec(h.area.queue(0), completed ? dead : fresh, base);
            },
          });
          try {
            const q = s.queues[0]!;
            q.kick();
            // Starting fresh at the base: the published requests run once each, as on any ring.
            const used = await q.waitUsed(4);
            expect(used.map((u) => u.id).sort((a, b) => a - b)).toEqual(fresh.map((r) => r.head).sort((a, b) => a - b));
            fresh.forEach((r, i) => {
              expect(status(s.mem, r)).toBe(S.OK);
              expectBytes(be.readImage(r.sector * SECTOR, 4096), data[i]!, `request ${i}`);
            });
            const rec = h.area.queue(0);
            expect(rec.version).toBe(1);
            expect(rec.descNum).toBe(QSIZE);
            await settled(rec, q, 'after a reset record');
            const d = randomBytes(4096);
            const w = rawBlk(s.mem, q, T.OUT, 51_000, { out: d });
            const r = rawBlk(s.mem, q, T.IN, 50_000, { inLen: 4096 });
            q.kick();
            await q.waitUsed(2);
            expect(status(s.mem, w)).toBe(S.OK);
            expect(status(s.mem, r)).toBe(S.OK);
            expectBytes(s.mem.read(r.dataGpa, 4096), data[0]!, 'read after the reset');
            const [base] = await s.stopDevice();
            expect(base).toBe(u16(U + completed + 6));
            expect(q.collect()).toEqual([]);
          } finally {
            h.close();
          }
        });
        expect(be.exited()).toBe(false);
        await waitFor(() => inflightWarnings(be.output()) > before, 'a warning that the inflight record was reset', 2_000);
        await serves(be);
      });
    });
  });

  describe('recovery from a real crash', () => {
    it('SIGKILL with writes in flight; a new daemon on the same image resumes them: every request completes once, all data lands', async () => {
      const own = await startBackend('vhostd', { numQueues: 1, imageBytes: 256 * MiB, extraArgs: placement });
      let second: ChildProcess | undefined;
      let secondOut = '';
      const mem = new GuestMemory([{ gpa: 0, size: 96 * MiB }]);
      let fe: FrontEnd | undefined;
      let h: InflightHandle | undefined;
      const size = 512; // 150 chains of 3 descriptors
      const q = new SplitQueue(mem, 0, size, 0);
      q.poll = true; // call signals may die with the daemon
      try {
        const start = async (first: boolean): Promise<void> => {
          fe = await FrontEnd.connect(own.socket, 10_000);
          const f = await fe.getFeatures();
          const p = await fe.getProtocolFeatures();
          await fe.setProtocolFeatures(p & INFLIGHT_PROTOCOL);
          await fe.setOwner();
          const feats = f & DRIVER_FEATURES;
          q.eventIdx = has(feats, VF.EVENT_IDX);
          // QEMU asks for the area once and hands the same fd to every back-end after.
          if (first) h = await getInflight(fe, 1, size);
          await fe.setInflightFd(h!.desc, h!.fd);
          await fe.setFeatures(feats);
          await fe.setMemTable(mem.table());
          await fe.setVringNum(0, size);
          await fe.setVringBase(0, q.base);
          await fe.setVringAddr({ index: 0, ...q.addrs() });
          await fe.setVringKick(0, q.kickFd);
          await fe.setVringCall(0, q.callFd);
          await fe.setVringEnable(0, true);
        };
        await start(true);
        const n = 150;
        const reqs: RawReq[] = [];
        const data: Uint8Array[] = [];
        for (let i = 0; i < n; i++) {
          data.push(randomBytes(512 * 1024));
          reqs.push(rawBlk(mem, q, T.OUT, 20_000 + i * 1024, { out: data[i] }));
        }
        const done = new Map<number, number>();
        const take = (): void => {
          for (const u of q.collect()) done.set(u.id, (done.get(u.id) ?? 0) + 1);
        };
        q.kick();
        // Kill once the record shows chains in flight and some have completed.
        const rec = h!.area.queue(0);
        const deadline = Date.now() + 10_000;
        while (Date.now() < deadline && !(rec.inflightHeads().length > 0 && q.usedIdx() > 0)) {
          /* busy: the window is milliseconds */
        }
        own.proc.kill('SIGKILL');
        await new Promise<void>((r) => (own.exited() ? r() : own.proc.once('exit', () => r())));
        take();
        const before = done.size;
        const flagged = rec.inflightHeads().length;
        fe!.close();
        // QEMU restores last_avail to used->idx after a back-end crash.
        q.base = q.usedIdx();
        second = spawn(process.execPath, [VHOSTD_BIN, 'blk', '--socket', own.socket, '--file', own.image, '--num-queues', '1', '--log-level', 'debug', ...placement], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        second.stdout!.on('data', (b: Buffer) => (secondOut += b.toString()));
        second.stderr!.on('data', (b: Buffer) => (secondOut += b.toString()));
        await start(false);
        q.kick();
        const until = Date.now() + 20_000;
        while (done.size < n && Date.now() < until) {
          take();
          await sleep(2);
        }
        take();
        await sleep(100);
        take();
        console.log(`SIGKILL recovery: ${before} of ${n} done before the kill, ${flagged} flagged in flight, ${n - before} completed by the new daemon`);
        expect(done.size, `completions after the restart (before the kill: ${before})`).toBe(n);
        for (const [head, times] of done) expect(times, `head ${head} completions`).toBe(1);
        for (const r of reqs) expect(status(mem, r)).toBe(S.OK);
        reqs.forEach((r, i) => expectBytes(own.readImage(r.sector * SECTOR, data[i]!.length), data[i]!, `request ${i} in the image`));
        await settled(rec, q, 'after the restart');
        const base = await fe!.getVringBase(0);
        expect(base).toBe(n);
        expect(q.usedIdx()).toBe(n);
      } catch (e) {
        const err = e instanceof Error ? e : new Error(String(e));
        err.message += `\n--- second daemon output (tail) ---\n${secondOut.split('\n').slice(-20).join('\n')}`;
        throw annotate(err, own);
      } finally {
        fe?.close();
        h?.close();
        q.destroy();
        mem.destroy();
        if (second && second.exitCode === null && second.signalCode === null) {
          const gone = new Promise((r) => second!.once('exit', r));
          second.kill('SIGTERM');
          const t = setTimeout(() => second!.kill('SIGKILL'), 5_000);
          await gone;
          clearTimeout(t);
        }
        await own.stop();
      }
    });
  });
});
