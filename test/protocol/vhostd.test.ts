// vhostd-only protocol tests: malformed messages, hostile rings, config space
// bounds and one-front-end-at-a-time. qsd behaves differently (it panics or
// ignores) on most of these, so there is no reference to compare with.
import { beforeEach, describe, expect, it } from 'vitest';
import { native, EFD_CLOEXEC, EFD_NONBLOCK } from '../../src/native/index.js';
import { existsSync } from 'node:fs';
import { startBackend, type Backend } from './backends.js';
import { expectBytes, useBackend, waitFor, withSession } from './helpers.js';
import { randomBytes, S, T } from '../driver/blk.js';
import { FrontEnd } from '../driver/frontend.js';
import { GiB } from '../driver/guest.js';
import { Session } from '../driver/session.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE } from '../driver/virtqueue.js';
import { bit, configMsg, F_REPLY, memTable, PF, Req, u64, VERSION, VF, vringState } from '../driver/wire.js';

/** Full start plus a write/read round trip: the daemon still serves. */
async function serves(be: Backend): Promise<void> {
  await withSession(be, async (s) => {
    await s.startDevice({ queues: 2 });
    const d = randomBytes(4096);
    expect((await s.blk[0]!.write(64, d)).status).toBe(S.OK);
    expectBytes((await s.blk[1]!.read(64, 4096)).data, d, 'read back');
  });
}

async function negotiated(fe: FrontEnd, protocol = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG)): Promise<void> {
  await fe.getFeatures();
  await fe.getProtocolFeatures();
  await fe.setProtocolFeatures(protocol);
}

function eventfd(): number {
  return native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

describe('vhostd only', { timeout: 60_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  describe('a malformed message closes that connection, and the daemon serves the next', () => {
    const cases: { name: string; prep?: (fe: FrontEnd) => Promise<void>; bad: (fe: FrontEnd) => void }[] = [
      { name: 'SET_FEATURES with a 4-byte payload', bad: (fe) => fe.send(Req.SET_FEATURES, VERSION, new Uint8Array(4)) },
      { name: 'GET_FEATURES with a payload', bad: (fe) => fe.send(Req.GET_FEATURES, VERSION, u64(0)) },
      { name: 'SET_VRING_NUM with a 4-byte payload', bad: (fe) => fe.send(Req.SET_VRING_NUM, VERSION, new Uint8Array(4)) },
      { name: 'version 0 in the flags', bad: (fe) => fe.send(Req.GET_FEATURES, 0) },
      { name: 'version 2 in the flags', bad: (fe) => fe.send(Req.GET_FEATURES, 2) },
      { name: 'the reply bit on a request', bad: (fe) => fe.send(Req.GET_FEATURES, VERSION | F_REPLY) },
      { name: 'unknown request 99', bad: (fe) => fe.send(99, VERSION) },
      { name: 'request 0', bad: (fe) => fe.send(0, VERSION) },
      { name: 'an fd on GET_FEATURES', bad: (fe) => fe.send(Req.GET_FEATURES, VERSION, new Uint8Array(0), [eventfdOnce()]) },
      { name: 'an fd on SET_VRING_NUM', bad: (fe) => fe.send(Req.SET_VRING_NUM, VERSION, vringState(0, 64), [eventfdOnce()]) },
      {
        name: 'SET_VRING_KICK with the no-fd flag and an fd',
        bad: (fe) => fe.send(Req.SET_VRING_KICK, VERSION, u64(0x100), [eventfdOnce()]),
      },
      { name: 'SET_VRING_CALL with neither an fd nor the no-fd flag', bad: (fe) => fe.send(Req.SET_VRING_CALL, VERSION, u64(0)) },
      {
        name: 'SET_MEM_TABLE with two regions and one fd',
        bad: (fe) => {
          const r = { guestPhysAddr: 0n, memorySize: 1n << 20n, userspaceAddr: 1n << 40n, mmapOffset: 0n };
          fe.send(Req.SET_MEM_TABLE, VERSION, memTable([r, { ...r, guestPhysAddr: 1n << 20n, userspaceAddr: (1n << 40n) + (1n << 20n) }]), [memfdOnce()]);
        },
      },
      { name: 'SET_MEM_TABLE with no regions', bad: (fe) => fe.send(Req.SET_MEM_TABLE, VERSION, memTable([])) },
      { name: 'a header announcing a 1 MiB payload', bad: (fe) => fe.sendBytes(headerOnly(Req.SET_MEM_TABLE, VERSION, 1 << 20)) },
      { name: 'SET_VRING_NUM for queue 5 of 2', bad: (fe) => fe.send(Req.SET_VRING_NUM, VERSION, vringState(5, 64)) },
      { name: 'SET_VRING_NUM of 100 (not a power of two)', bad: (fe) => fe.send(Req.SET_VRING_NUM, VERSION, vringState(0, 100)) },
      { name: 'SET_VRING_KICK for queue 9', bad: (fe) => fe.send(Req.SET_VRING_KICK, VERSION, u64(9), [eventfdOnce()]) },
      { name: 'SET_FEATURES with a bit never offered (RING_PACKED)', bad: (fe) => fe.send(Req.SET_FEATURES, VERSION, u64(bit(VF.VERSION_1) | bit(VF.RING_PACKED))) },
      {
        name: 'SET_PROTOCOL_FEATURES with a bit never offered (PAGEFAULT)',
        bad: (fe) => fe.send(Req.SET_PROTOCOL_FEATURES, VERSION, u64(bit(PF.MQ) | bit(PF.PAGEFAULT))),
      },
      {
        name: 'GET_CONFIG without the CONFIG protocol feature',
        prep: (fe) => negotiated(fe, bit(PF.MQ) | bit(PF.REPLY_ACK)),
        bad: (fe) => fe.send(Req.GET_CONFIG, VERSION, configMsg(0, 8, 0)),
      },
      {
        name: 'GET_CONFIG of 257 bytes',
        prep: (fe) => negotiated(fe),
        bad: (fe) => fe.send(Req.GET_CONFIG, VERSION, configMsg(0, 257, 0)),
      },
    ];

    // fds we create for a bad message; sendmsg duplicates them, so ours are closed right after.
    let made: number[] = [];
    const eventfdOnce = (): number => {
      const fd = eventfd();
      made.push(fd);
      return fd;
    };
    const memfdOnce = (): number => {
      const fd = native.memfdCreate('vhostd-bad', 0);
      made.push(fd);
      return fd;
    };
    const headerOnly = (request: number, flags: number, size: number): Uint8Array => {
      const b = new Uint8Array(12);
      const dv = new DataView(b.buffer);
      dv.setUint32(0, request, true);
      dv.setUint32(4, flags, true);
      dv.setUint32(8, size, true);
      return b;
    };

    it.each(cases)('$name', async ({ prep, bad }) => {
      const fe = await FrontEnd.connect(be.socket);
      try {
        fe.timeoutMs = 5_000;
        if (prep) await prep(fe);
        bad(fe);
        expect(await fe.waitClosed()).toEqual([]);
      } finally {
        fe.close();
        for (const fd of made) native.close(fd);
        made = [];
      }
      expect(be.exited()).toBe(false);
      await serves(be);
    });
  });

  describe('config space bounds', () => {
    it('reads at an offset; a range past 256 bytes is refused with an empty reply', async () => {
      await withSession(be, async (s) => {
        await s.negotiate();
        const nq = await s.fe.getConfig(34, 2);
        expect(nq && new DataView(nq.data.buffer, nq.data.byteOffset, 2).getUint16(0, true)).toBe(2);
        const all = await s.fe.getConfig(0, 256);
        expect(all!.data.length).toBe(256);
        expect(all!.data.subarray(64).every((b) => b === 0)).toBe(true);
        expect(await s.fe.getConfig(200, 100)).toBeUndefined();
        expect(await s.fe.getConfig(256, 1)).toBeUndefined();
        // The connection is still usable.
        expect(await s.fe.getQueueNum()).toBe(2n);
      });
    });

    it('SET_CONFIG outside the writeback byte is nacked, not fatal', async () => {
      await withSession(be, async (s) => {
        await s.negotiate();
        expect(await s.fe.setConfig(0, new Uint8Array(8), 0, { allowNack: true })).not.toBe(0n);
        expect(await s.fe.setConfig(32, Uint8Array.of(2), 0, { allowNack: true })).not.toBe(0n);
        expect(await s.fe.getQueueNum()).toBe(2n);
      });
    });
  });

  describe('front-ends', () => {
    it('a second front-end is refused while the first is connected, and the first keeps working', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        const other = await FrontEnd.connect(be.socket);
        try {
          expect(await other.waitClosed(5_000)).toEqual([]);
        } finally {
          other.close();
        }
        const d = randomBytes(512);
        expect((await s.blk[0]!.write(10, d)).status).toBe(S.OK);
        expectBytes((await s.blk[0]!.read(10, 512)).data, d, 'first front-end after the refusal');
      });
      await serves(be);
    });

    it('300 front-ends in a row, each negotiating and going away', async () => {
      for (let i = 0; i < 300; i++) {
        const fe = await FrontEnd.connect(be.socket, 2_000);
        try {
          fe.timeoutMs = 2_000;
          await negotiated(fe);
          expect(await fe.getQueueNum()).toBe(2n);
        } catch (e) {
          (e as Error).message = `connection ${i}: ${(e as Error).message}`;
          throw e;
        } finally {
          fe.close();
        }
        // The next connect must not race the daemon's teardown of this one.
        if (i % 50 === 49) await serves(be);
      }
    });

    it('a front-end that vanishes with requests in flight is replaced once they drain', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        const q = s.queues[0]!;
        for (let i = 0; i < 32; i++) void s.blk[0]!.submit({ type: T.OUT, sector: 100_000 + i * 512, out: randomBytes(256 * 1024) }).catch(() => {});
        s.blk[0]!.kick();
        await waitFor(() => q.usedIdx() > 0, 'first completion');
      });
      // Like QEMU's reconnect: retry while the old connection drains, within a bound.
      const deadline = Date.now() + 10_000;
      for (;;) {
        try {
          await serves(be);
          break;
        } catch (e) {
          if (Date.now() > deadline) throw e;
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    });
  });

  describe('ring state', () => {
    it('a disabled ring is not processed until enabled again', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        const q = s.queues[0]!;
        await s.fe.setVringEnable(0, false);
        const p = s.blk[0]!.run({ type: T.FLUSH });
        // A round trip on the socket; a disabled ring must still be untouched after it.
        await s.fe.getQueueNum();
        expect(q.usedIdx()).toBe(0);
        await s.fe.setVringEnable(0, true);
        expect((await p).status).toBe(S.OK);
      });
    });

    it('a ring started without a kick fd (VRING_NOFD) is polled', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        await s.fe.setVringKick(0, null);
        const d = randomBytes(4096);
        // Published, never kicked.
        expect((await s.blk[0]!.submit({ type: T.OUT, sector: 500, out: d })).status).toBe(S.OK);
        expectBytes((await s.blk[0]!.submit({ type: T.IN, sector: 500, inLen: 4096 })).data, d, 'polled read');
      });
    });

    it('no call signal after GET_VRING_BASE, and a stopped ring is not processed', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        const q = s.queues[0]!;
        await s.blk[0]!.flush();
        await s.stopDevice();
        const signals = q.drainCall();
        q.poll = true;
        const p = s.blk[0]!.run({ type: T.FLUSH });
        await s.fe.getQueueNum();
        expect(q.usedIdx()).toBe(1);
        expect(q.drainCall()).toBe(signals);
        await s.startRings();
        expect((await p).status).toBe(S.OK);
      });
    });
  });

  describe('shutdown', () => {
    it('SIGTERM with a front-end connected: exits 0 and removes its socket', async () => {
      const own = await startBackend('vhostd', { numQueues: 1 });
      try {
        const s = await Session.open(own.socket);
        try {
          await s.startDevice({ queues: 1 });
          await s.blk[0]!.write(1, randomBytes(512));
          const code = new Promise<number | null>((r) => own.proc.once('exit', (c) => r(c)));
          own.proc.kill('SIGTERM');
          expect(await s.fe.waitClosed()).toEqual([]);
          expect(await code).toBe(0);
          expect(existsSync(own.socket)).toBe(false);
        } finally {
          s.close();
        }
      } finally {
        await own.stop();
      }
    });
  });

  describe('a hostile guest fails its queue, not the daemon', () => {
    type Hostile = (s: Session) => void;
    const cases: { name: string; make: Hostile }[] = [
      {
        name: 'a descriptor loop',
        make: (s) => s.queues[0]!.submitRaw([{ slot: 0, desc: { addr: s.mem.alloc(16), len: 16, flags: DESC_F_NEXT, next: 0 } }], 0),
      },
      {
        name: 'a next index beyond the table',
        make: (s) => s.queues[0]!.submitRaw([{ slot: 0, desc: { addr: s.mem.alloc(16), len: 16, flags: DESC_F_NEXT, next: 500 } }], 0),
      },
      {
        name: 'a buffer outside guest memory',
        make: (s) =>
          s.queues[0]!.submitRaw([
            { slot: 0, desc: { addr: s.mem.alloc(16), len: 16, flags: DESC_F_NEXT, next: 1 } },
            { slot: 1, desc: { addr: 64n * BigInt(GiB), len: 4096, flags: DESC_F_WRITE, next: 0 } },
          ], 0),
      },
      {
        name: 'a buffer running off the end of a region',
        make: (s) => {
          const r = s.mem.regions[2]!;
          s.queues[0]!.submitRaw([
            { slot: 0, desc: { addr: s.mem.alloc(16), len: 16, flags: DESC_F_NEXT, next: 1 } },
            { slot: 1, desc: { addr: r.end - 512, len: 4096, flags: DESC_F_WRITE, next: 0 } },
          ], 0);
        },
      },
      {
        name: 'a length that overflows the address',
        make: (s) =>
          s.queues[0]!.submitRaw([
            { slot: 0, desc: { addr: s.mem.alloc(16), len: 16, flags: DESC_F_NEXT, next: 1 } },
            { slot: 1, desc: { addr: 0xffff_ffff_ffff_f000n, len: 0xffff_ffff, flags: DESC_F_WRITE, next: 0 } },
          ], 0),
      },
      {
        name: 'a nested indirect table',
        make: (s) => {
          const inner = s.mem.alloc(32, 16);
          const outer = s.mem.alloc(16, 16);
          const v = new DataView(s.mem.view(outer, 16).buffer, s.mem.view(outer, 16).byteOffset, 16);
          v.setBigUint64(0, BigInt(inner), true);
          v.setUint32(8, 32, true);
          v.setUint16(12, DESC_F_INDIRECT, true);
          s.queues[0]!.submitRaw([{ slot: 0, desc: { addr: outer, len: 16, flags: DESC_F_INDIRECT, next: 0 } }], 0);
        },
      },
      {
        name: 'an indirect table whose length is not a multiple of 16',
        make: (s) => s.queues[0]!.submitRaw([{ slot: 0, desc: { addr: s.mem.alloc(32, 16), len: 24, flags: DESC_F_INDIRECT, next: 0 } }], 0),
      },
      {
        name: 'a readable descriptor after a writable one',
        make: (s) =>
          s.queues[0]!.submitRaw([
            { slot: 0, desc: { addr: s.mem.alloc(512), len: 512, flags: DESC_F_NEXT | DESC_F_WRITE, next: 1 } },
            { slot: 1, desc: { addr: s.mem.alloc(16), len: 16, flags: 0, next: 0 } },
          ], 0),
      },
      {
        name: 'an avail index more than a queue ahead',
        make: (s) => s.queues[0]!.setAvailIdxRaw(s.queues[0]!.availIdx + 1000),
      },
      {
        name: 'an avail ring naming descriptor 4000',
        make: (s) => {
          // Publish a bogus head by hand in the next avail slot.
          const q = s.queues[0]!;
          const slot = q.availGpa + 4 + 2 * (q.availIdx % q.size);
          new DataView(s.mem.view(slot, 2).buffer, s.mem.view(slot, 2).byteOffset, 2).setUint16(0, 4000, true);
          q.setAvailIdxRaw(q.availIdx + 1);
        },
      },
    ];

    it('a used ring laid over the avail ring (every completion republishes the chain) does not starve the daemon', async () => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 2 });
        const q = s.queues[0]!;
        q.base = await s.fe.getVringBase(0);
        // One GET_ID chain at descriptor 0; every avail slot names it.
        const hdr = s.mem.alloc(16);
        new DataView(s.mem.view(hdr, 16).buffer, s.mem.view(hdr, 16).byteOffset, 16).setUint32(0, T.GET_ID, true);
        const buf = s.mem.alloc(21);
        q.submitRaw([
          { slot: 0, desc: { addr: hdr, len: 16, flags: DESC_F_NEXT, next: 1 } },
          { slot: 1, desc: { addr: buf, len: 21, flags: DESC_F_WRITE, next: 0 } },
        ], 0);
        s.mem.fill(q.availGpa + 4, 2 * q.size, 0);
        const a = q.addrs();
        await s.fe.setVringAddr({ index: 0, desc: a.desc, avail: a.avail, used: a.avail });
        await s.fe.setVringKick(0, q.kickFd);
        // The queue spins on its own completions; everything else must still be served.
        for (let i = 0; i < 20; i++) expect(await s.fe.getQueueNum()).toBe(2n);
        const d = randomBytes(4096);
        expect((await s.blk[1]!.write(91, d)).status).toBe(S.OK);
        expectBytes((await s.blk[1]!.read(91, 4096)).data, d, 'other queue');
        await s.fe.getVringBase(0);
      });
      expect(be.exited()).toBe(false);
      await serves(be);
    });

    it.each(cases)('$name', async ({ make }) => {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 2 });
        const err = eventfd();
        try {
          await s.fe.setVringErr(0, err);
          make(s);
          s.queues[0]!.kick();
          // vhostd reports a failed queue on its err fd.
          const counter = new BigUint64Array(1);
          await waitFor(() => native.read(err, counter) === 8, 'a signal on the err eventfd');
          // The other queue, and the connection, carry on.
          const d = randomBytes(4096);
          expect((await s.blk[1]!.write(77, d)).status).toBe(S.OK);
          expectBytes((await s.blk[1]!.read(77, 4096)).data, d, 'other queue');
          expect(await s.fe.getQueueNum()).toBe(2n);
        } finally {
          native.close(err);
        }
      });
      expect(be.exited()).toBe(false);
      await serves(be);
    });
  });
});
