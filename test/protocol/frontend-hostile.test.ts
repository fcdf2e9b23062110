// Front-ends that do legal but unusual things (pipelining, many memory slots,
// RESET_OWNER, kick fds before the ring, large rings), and one that floods
// the socket while a reply is pending. vhostd only.
import { ftruncateSync } from 'node:fs';
import { beforeEach, describe, expect, it } from 'vitest';
import { native, EAGAIN, EFD_CLOEXEC, EFD_NONBLOCK, EINTR, MFD_CLOEXEC } from '../../src/native/index.js';
import type { Backend } from './backends.js';
import { annotate, expectBytes, useBackend, waitFor } from './helpers.js';
import { fdCount, rssKiB, sleep } from './inflight-helpers.js';
import { BlkQueue, randomBytes, S, T } from '../driver/blk.js';
import { GiB, MiB } from '../driver/guest.js';
import type { Message } from '../driver/frontend.js';
import { Session } from '../driver/session.js';
import { SplitQueue } from '../driver/virtqueue.js';
import { F_NEED_REPLY, frame, has, PF, Req, singleRegion, u64, VERSION, VF, vringAddr, vringState } from '../driver/wire.js';

/** Queues as startDevice() makes them, without sending anything. */
function makeQueues(s: Session, n: number, size: number): void {
  for (let i = 0; i < n; i++) {
    const q = new SplitQueue(s.mem, i, size, [0, 2, 1][i % 3]!);
    q.eventIdx = has(s.features, VF.EVENT_IDX);
    s.queues.push(q);
    s.blk.push(new BlkQueue(q, s.mem));
  }
}

/** The six messages that set up a queue, framed without need_reply (QEMU pipelines these). */
function queueMessages(q: SplitQueue): { bytes: Uint8Array; fds: number[] }[] {
  return [
    { bytes: frame(Req.SET_VRING_NUM, VERSION, vringState(q.index, q.size)), fds: [] },
    { bytes: frame(Req.SET_VRING_BASE, VERSION, vringState(q.index, q.base)), fds: [] },
    { bytes: frame(Req.SET_VRING_ADDR, VERSION, vringAddr({ index: q.index, ...q.addrs() })), fds: [] },
    { bytes: frame(Req.SET_VRING_KICK, VERSION, u64(q.index)), fds: [q.kickFd] },
    { bytes: frame(Req.SET_VRING_CALL, VERSION, u64(q.index)), fds: [q.callFd] },
    { bytes: frame(Req.SET_VRING_ENABLE, VERSION, vringState(q.index, 1)), fds: [] },
  ];
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/** One non-blocking sendmsg attempt: bytes sent (0 when the socket is full). Throws if the peer is gone. */
function trySend(fd: number, bytes: Uint8Array, fds: number[] = []): number {
  for (;;) {
    const n = native.sendmsg(fd, bytes, fds);
    if (n === -EINTR) continue;
    if (n === -EAGAIN) return 0;
    if (n < 0) throw new Error(`sendmsg errno ${-n}: the back-end closed the connection`);
    return n;
  }
}

/** The pino lines printed since `from`, parsed. */
function logSince(be: Backend, from: number): { msg?: string; reason?: string }[] {
  return be
    .output()
    .slice(from)
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { msg?: string; reason?: string });
}

/** The reason logged for closing a connection over `request` (output of other connections may interleave). */
async function violationReason(be: Backend, from: number, request: string): Promise<string> {
  let reason: string | undefined;
  await waitFor(() => {
    reason = logSince(be, from).find((l) => l.msg === 'closing connection: protocol violation' && l.reason?.startsWith(request))?.reason;
    return reason !== undefined;
  }, 'the protocol violation log line', 5_000);
  return reason!;
}

/** A write on `queue` read back on the same queue. */
async function roundTrip(s: Session, queue: number, sector: number): Promise<void> {
  const d = randomBytes(4096);
  expect((await s.blk[queue]!.write(sector, d)).status).toBe(S.OK);
  expectBytes((await s.blk[queue]!.read(sector, 4096)).data, d, `read back on queue ${queue}`);
}

async function session(be: Backend, fn: (s: Session) => Promise<void>): Promise<void> {
  const s = await Session.open(be.socket);
  try {
    s.fe.timeoutMs = 5_000;
    await fn(s);
  } catch (e) {
    throw annotate(e, be, s);
  } finally {
    s.close();
  }
}

describe('a front-end that pipelines', { timeout: 60_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 64 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('64 blk queues set up in one burst without need_reply, then a round trip and I/O on queue 63', async () => {
    await session(be, async (s) => {
      await s.negotiate();
      expect(s.queueNum).toBe(64);
      makeQueues(s, 64, 64);
      await s.fe.setFeatures(s.features);
      await s.fe.setMemTable(s.mem.table());
      // Every message its own sendmsg (each KICK/CALL carries its fd); no waiting in between.
      const msgs = s.queues.flatMap(queueMessages);
      expect(msgs.length).toBe(384);
      for (const m of msgs) s.fe.sendBytes(m.bytes, m.fds);
      expect(await s.fe.getQueueNum()).toBe(64n);
      expect(await s.fe.getFeatures()).toBe(s.offeredFeatures);
      expect(s.fe.pending()).toEqual([]);
      await roundTrip(s, 63, 1000);
      await roundTrip(s, 0, 1008);
    });
    expect(be.exited()).toBe(false);
  });

  it('a burst of 5000 messages in one write is processed in order', async () => {
    await session(be, async (s) => {
      await s.negotiate();
      // SET_OWNER needs no reply; GET_QUEUE_NUM at the end must come back as the only reply.
      const burst = concat([...Array.from({ length: 5000 }, () => frame(Req.SET_OWNER, VERSION, new Uint8Array(0))), frame(Req.GET_QUEUE_NUM, VERSION, new Uint8Array(0))]);
      s.fe.sendBytes(burst);
      const m = await s.fe.recv();
      s.fe.checkReply(m, Req.GET_QUEUE_NUM, 8);
      expect(await s.fe.getQueueNum()).toBe(64n);
      expect(s.fe.pending()).toEqual([]);
    });
  });
});

describe('a front-end that reads its replies late', { timeout: 60_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('2000 need_reply messages sent before reading any reply: every ack arrives, in order, and the connection stays', async () => {
    await session(be, async (s) => {
      await s.negotiate();
      // Far more acks than a Unix socket buffers (about 280 of 20 bytes): the daemon must wait for us to read.
      const n = 2000;
      s.fe.sendBytes(concat(Array.from({ length: n }, () => frame(Req.SET_OWNER, VERSION | F_NEED_REPLY, new Uint8Array(0)))));
      await new Promise((r) => setTimeout(r, 500));
      for (let i = 0; i < n; i++) {
        const m = await s.fe.recv();
        s.fe.checkReply(m, Req.SET_OWNER, 8);
        expect(new DataView(m.payload.buffer, m.payload.byteOffset).getBigUint64(0, true)).toBe(0n);
      }
      expect(await s.fe.getQueueNum()).toBe(2n);
      expect(be.output()).not.toMatch(/cannot send/);
    });
  });
});

describe('a hostile front-end', { timeout: 90_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('floods fds and messages while GET_VRING_BASE drains: the daemon stops reading, memory and fds stay bounded', async () => {
    const pid = be.proc.pid!;
    const err = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    try {
      await session(be, async (s) => {
        await s.startDevice({ queues: 2, queueSize: 1024 });
        await roundTrip(s, 1, 2000);
        const fds0 = fdCount(pid);
        const rss0 = rssKiB(pid);
        // Keep queue 0 busy: 1 MiB reads into one shared buffer (three descriptors each: 341 fit), so the drain takes a while.
        const buf = s.mem.alloc(MiB, 4096, 0);
        const reads = Array.from({ length: 340 }, (_, i) => s.blk[0]!.submit({ type: T.IN, sector: (i % 64) * 2048, inLen: MiB, dataGpa: buf }));
        for (const r of reads) r.catch(() => {}); // judged below; a failure must not go unhandled first
        s.blk[0]!.kick();
        s.fe.send(Req.GET_VRING_BASE, VERSION, vringState(0, 0));
        // Then flood until the reply comes: SET_VRING_ERR for queue 1 carrying an fd, then
        // 500 SET_OWNER in one write, over and over; none asks for a reply.
        const errMsg = frame(Req.SET_VRING_ERR, VERSION, u64(1));
        let carry: Uint8Array | undefined; // the rest of a partial write goes out before anything else
        const owners = concat(Array.from({ length: 500 }, () => frame(Req.SET_OWNER, VERSION, new Uint8Array(0))));
        // First 300 KB at once, more than the socket buffer holds, so it is full long before the drain ends.
        carry = concat(Array.from({ length: 50 }, () => owners)); // a partial write's rest goes first
        let sentFds = 0;
        // A burst of fds first (each message its own sendmsg, as the fds need), then the bytes.
        while (sentFds < 300 && trySend(s.fe.fd, errMsg, [err]) === errMsg.length) sentFds++;
        let full = 0;
        let maxFds = 0;
        let maxRss = 0;
        const sample = (): void => {
          maxFds = Math.max(maxFds, fdCount(pid));
          maxRss = Math.max(maxRss, rssKiB(pid));
        };
        let reply: Message | undefined;
        const deadline = Date.now() + 20_000;
        for (let i = 0; !reply; i++) {
          if (Date.now() > deadline) throw new Error('no GET_VRING_BASE reply within 20 s');
          if (!carry) {
            if (trySend(s.fe.fd, errMsg, [err]) === errMsg.length) {
              sentFds++;
              carry = owners;
            }
          }
          if (carry) {
            const n = trySend(s.fe.fd, carry);
            carry = n === carry.length ? undefined : carry.subarray(n);
          }
          if (carry) {
            full++;
            sample();
            await sleep(1);
          } else if (i % 20 === 0) {
            sample();
          }
          const got = s.fe.pending();
          if (got.length) {
            expect(got.length, 'one reply, to GET_VRING_BASE').toBe(1);
            reply = got[0];
          }
        }
        if (carry) s.fe.sendBytes(carry);
        console.log(
          `flood while draining: ${sentFds} fds (and SET_OWNER bytes) sent; the socket was full ${full} times; ` +
            `daemon fds ${fds0} -> at most ${maxFds}, RSS ${(rss0 / 1024).toFixed(1)} -> at most ${(maxRss / 1024).toFixed(1)} MiB`,
        );
        s.fe.checkReply(reply!, Req.GET_VRING_BASE, 8);
        expect(full, 'the daemon stopped reading while it drained').toBeGreaterThan(0);
        expect(maxFds - fds0, 'fds held during the flood').toBeLessThanOrEqual(8);
        expect((maxRss - rss0) / 1024, 'RSS growth during the flood, MiB').toBeLessThan(32);
        // Everything sent meanwhile is processed after the reply, in order.
        expect(await s.fe.getQueueNum(), 'the connection survives the flood').toBe(2n);
        expect(s.fe.pending()).toEqual([]);
        // A queue holds at most 64 MiB in flight: reads it had not taken yet are still in the ring.
        // Restarted from the base it returned, it serves exactly those.
        const q0 = s.queues[0]!;
        q0.base = new DataView(reply!.payload.buffer, reply!.payload.byteOffset).getUint32(4, true);
        await s.fe.setVringNum(0, q0.size);
        await s.fe.setVringBase(0, q0.base);
        await s.fe.setVringAddr({ index: 0, ...q0.addrs() });
        await s.fe.setVringKick(0, q0.kickFd);
        await s.fe.setVringEnable(0, true);
        for (const r of await Promise.allSettled(reads)) expect(r.status).toBe('fulfilled');
        // Each SET_VRING_ERR replaced the last: one err fd more than before.
        expect(fdCount(pid) - fds0).toBeLessThanOrEqual(1);
        await roundTrip(s, 1, 3000);
      });
    } finally {
      native.close(err);
    }
    expect(be.exited()).toBe(false);
  });
});

describe('an unusual front-end', { timeout: 90_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('509 memory slots: a duplicate of a mapped region is accepted when all are in use, the 510th is refused', async () => {
    const memfd = native.memfdCreate('vhostd-test-slot', MFD_CLOEXEC);
    ftruncateSync(memfd, 4096);
    try {
      await session(be, async (s) => {
        await s.negotiate();
        expect(has(s.protocol, PF.CONFIGURE_MEM_SLOTS)).toBe(true);
        expect(await s.fe.getMaxMemSlots()).toBe(509n);
        makeQueues(s, 1, 128);
        await s.fe.setFeatures(s.features);
        // QEMU with CONFIGURE_MEM_SLOTS sends the table one region at a time.
        for (const r of s.mem.table()) expect(await s.fe.addMemReg(r)).toBe(0n);
        for (const m of queueMessages(s.queues[0]!)) s.fe.sendBytes(m.bytes, m.fds);
        const small = (i: number) => ({
          guestPhysAddr: 64n * BigInt(GiB) + BigInt(i) * 4096n,
          memorySize: 4096n,
          userspaceAddr: (1n << 44n) + BigInt(i) * 4096n,
          mmapOffset: 0n,
          fd: memfd,
        });
        const distinct = 509 - s.mem.regions.length;
        for (let i = 0; i < distinct; i++) {
          expect(await s.fe.addMemReg(small(i)), `region ${s.mem.regions.length + i + 1}`).toBe(0n);
          if (i === 40) await roundTrip(s, 0, 4000); // past the old limit of 32
        }
        await roundTrip(s, 0, 4100);
        // QEMU's second vhost_dev on a net device sends regions it already sent.
        expect(await s.fe.addMemReg(small(7)), 'a duplicate with every slot in use').toBe(0n);
        expect(await s.fe.addMemReg(s.mem.table()[0]!), 'a duplicate of the first region').toBe(0n);
        await roundTrip(s, 0, 4200);
        const from = be.output().length;
        s.fe.send(Req.ADD_MEM_REG, VERSION, singleRegion(small(distinct)), [memfd]);
        expect(await s.fe.waitClosed()).toEqual([]);
        expect(await violationReason(be, from, 'ADD_MEM_REG')).toMatch(/ADD_MEM_REG.*509 memory slots/);
      });
    } finally {
      native.close(memfd);
    }
    expect(be.exited()).toBe(false);
  });

  it('RESET_OWNER disables the rings and keeps memory and ring configuration: SET_VRING_ENABLE(1) resumes them', async () => {
    await session(be, async (s) => {
      await s.startDevice({ queues: 2 });
      await roundTrip(s, 0, 5000);
      const q = s.queues[0]!;
      s.blk[0]!.timeoutMs = 5_000;
      expect(await s.fe.command(Req.RESET_OWNER, new Uint8Array(0))).toBe(0n);
      const used = q.usedIdx();
      const p = s.blk[0]!.run({ type: T.FLUSH });
      await s.fe.getQueueNum();
      await sleep(50);
      expect(q.usedIdx(), 'a disabled ring is not processed').toBe(used);
      // No memory table, no ring messages: only the enable.
      await s.fe.setVringEnable(0, true);
      await s.fe.setVringEnable(1, true);
      expect((await p).status).toBe(S.OK);
      await roundTrip(s, 0, 5008);
      await roundTrip(s, 1, 5016);
    });
  });

  describe('a kick fd that arrives before the rest of its ring', () => {
    it('KICK and CALL before NUM/BASE/ADDR: the ring starts once they arrive', async () => {
      await session(be, async (s) => {
        await s.negotiate();
        makeQueues(s, 1, 128);
        const q = s.queues[0]!;
        s.blk[0]!.timeoutMs = 5_000;
        await s.fe.setFeatures(s.features);
        await s.fe.setMemTable(s.mem.table());
        await s.fe.setVringKick(0, q.kickFd);
        await s.fe.setVringCall(0, q.callFd);
        await s.fe.setVringNum(0, q.size);
        await s.fe.setVringBase(0, q.base);
        await s.fe.setVringAddr({ index: 0, ...q.addrs() });
        await s.fe.setVringEnable(0, true);
        await roundTrip(s, 0, 6000);
      });
    });

    it('the whole ring before SET_MEM_TABLE: the ring starts with the memory table', async () => {
      await session(be, async (s) => {
        await s.negotiate();
        makeQueues(s, 1, 128);
        const q = s.queues[0]!;
        s.blk[0]!.timeoutMs = 5_000;
        await s.fe.setFeatures(s.features);
        await s.fe.setVringKick(0, q.kickFd);
        await s.fe.setVringCall(0, q.callFd);
        await s.fe.setVringNum(0, q.size);
        await s.fe.setVringBase(0, q.base);
        await s.fe.setVringAddr({ index: 0, ...q.addrs() });
        await s.fe.setVringEnable(0, true);
        await s.fe.setMemTable(s.mem.table());
        await roundTrip(s, 0, 6100);
      });
    });
  });

  describe('ring sizes', () => {
    it('the largest ring the device offers (1024) works', async () => {
      await session(be, async (s) => {
        await s.startDevice({ queues: 1, queueSize: 1024 });
        await roundTrip(s, 0, 7000);
      });
    });

    it.each([
      [2048, /SET_VRING_NUM: queue 0: size 2048 is above the device maximum of 1024/],
      [65536, /SET_VRING_NUM: queue 0: size 65536 is above the device maximum of 1024/],
      [0, /SET_VRING_NUM: queue 0: size 0/],
      [100, /SET_VRING_NUM: queue 0: size 100 is not a power of two/],
      [1000, /SET_VRING_NUM: queue 0: size 1000 is not a power of two/],
    ])('SET_VRING_NUM of %i closes the connection and says why', async (num, why) => {
      await session(be, async (s) => {
        await s.negotiate();
        const from = be.output().length;
        s.fe.send(Req.SET_VRING_NUM, VERSION, vringState(0, num));
        expect(await s.fe.waitClosed()).toEqual([]);
        const reason = await violationReason(be, from, 'SET_VRING_NUM');
        expect(reason).toMatch(why);
        if (num !== 100 && num !== 1000) expect(reason).not.toMatch(/power of two/);
      });
      expect(be.exited()).toBe(false);
    });
  });
});
