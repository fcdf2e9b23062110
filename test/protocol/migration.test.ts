// Live migration's dirty log and device status over a real socket, in the
// order QEMU sends them: SET_LOG_BASE (a memfd), then SET_FEATURES with
// VHOST_F_LOG_ALL and SET_VRING_ADDR with the log flag under running rings.
// The log must show every page vhostd wrote, on the daemon's thread and on a
// queue thread, and switching it (on, off, to a new log) must lose or double
// no request. Device status: FEATURES_OK, reset on 0, DEVICE_NEEDS_RESET.
import { ftruncateSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { randomBytes, S, T } from '../driver/blk.js';
import { DRIVER_PROTOCOL, type Session } from '../driver/session.js';
import { bit, F_NEED_REPLY, PF, readU64, Req, u64, VERSION, VF, vringAddr } from '../driver/wire.js';
import { native, MFD_CLOEXEC, PROT_READ, PROT_WRITE } from '../../src/native/index.js';
import { useBackend, waitFor, withSession } from './helpers.js';
import { memfdMaps } from './inflight-helpers.js';

const MiB = 1 << 20;
const PAGE = 4096;
const PROTOCOL = DRIVER_PROTOCOL | bit(PF.LOG_SHMFD) | bit(PF.STATUS);
/** The test guest's highest address is 4 GiB + 4 MiB: one bit per page. */
const LOG_BYTES = Math.ceil((4 * 1024 * MiB + 4 * MiB) / PAGE / 8);
const VRING_F_LOG = 1;

/** A dirty log as QEMU makes one: a memfd the test maps too. */
class TestLog {
  readonly fd: number;
  private readonly address: bigint;
  private readonly buffer: ArrayBuffer;
  readonly bits: Uint8Array;

  constructor(readonly size = LOG_BYTES) {
    this.fd = native.memfdCreate('test-dirty-log', MFD_CLOEXEC);
    ftruncateSync(this.fd, size);
    this.address = native.mmap(this.fd, size, 0, PROT_READ | PROT_WRITE);
    this.buffer = native.view(this.address, size);
    this.bits = new Uint8Array(this.buffer);
  }

  pages(): Set<number> {
    const out = new Set<number>();
    this.bits.forEach((b, i) => {
      if (b) for (let k = 0; k < 8; k++) if (b & (1 << k)) out.add(i * 8 + k);
    });
    return out;
  }

  clear(): void {
    this.bits.fill(0);
  }

  close(): void {
    native.detach(this.buffer);
    native.munmap(this.address, this.size);
    native.close(this.fd);
  }
}

/** SET_LOG_BASE and its one reply: request 6, flags 0x5, a u64 body, whatever need_reply says. */
async function setLogBase(s: Session, log: TestLog, needReply = true): Promise<void> {
  const p = new Uint8Array(16);
  new DataView(p.buffer).setBigUint64(0, BigInt(log.size), true);
  s.fe.send(Req.SET_LOG_BASE, VERSION | (needReply ? F_NEED_REPLY : 0), p, [log.fd]);
  const m = await s.fe.recv();
  s.fe.checkReply(m, Req.SET_LOG_BASE, 8);
  expect(readU64(m.payload)).toBe(0n);
  // No second reply (an ack) behind it: the next reply is GET_FEATURES'.
  expect(await s.fe.getFeatures()).toBe(s.offeredFeatures);
}

/** QEMU's vhost_migration_log(on): LOG_ALL in SET_FEATURES, then the log flag on every ring (both acked). */
async function logging(s: Session, on: boolean): Promise<void> {
  await s.fe.setFeatures(on ? s.features | bit(VF.LOG_ALL) : s.features);
  for (const q of s.queues) {
    await s.fe.setVringAddr({ index: q.index, ...q.addrs(), flags: on ? VRING_F_LOG : 0, log: on ? BigInt(q.usedGpa) : 0n });
  }
}

const pagesOf = (gpa: number, len: number): number[] => {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
};

describe.each([
  ['', [] as string[]],
  [' on a queue thread', ['--threads', '1']],
])('dirty logging%s', { timeout: 60_000 }, (_where, placement) => {
  const be = useBackend('vhostd', { numQueues: 1, imageBytes: 16 * MiB, extraArgs: placement });
  const logMaps = (): number => memfdMaps(be().proc.pid!).filter((l) => l.includes('test-dirty-log')).length;

  it('offers LOG_SHMFD and LOG_ALL; marks every page it writes once logging is on under a running ring', async () => {
    const log = new TestLog();
    try {
      await withSession(be(), async (s) => {
        await s.startDevice({ queues: 1, protocolFeatures: PROTOCOL });
        expect(s.offeredFeatures & bit(VF.LOG_ALL)).toBe(bit(VF.LOG_ALL));
        expect(s.protocol & bit(PF.LOG_SHMFD)).toBe(bit(PF.LOG_SHMFD));
        const blk = s.blk[0]!;
        const q = s.queues[0]!;
        const payload = randomBytes(3 * PAGE);
        // Before logging: served, nothing marked.
        const own = s.mem.alloc(3 * PAGE, PAGE);
        expect((await blk.run({ type: T.OUT, sector: 0, out: payload })).status).toBe(S.OK);
        await setLogBase(s, log);
        expect((await blk.run({ type: T.IN, sector: 0, inLen: PAGE, dataGpa: own })).status).toBe(S.OK);
        expect(log.pages().size, 'marks before LOG_ALL').toBe(0);

        await logging(s, true);
        // A read of two pages into three the test owns: those two, the status byte and the used ring.
        const r = await blk.run({ type: T.IN, sector: 0, inLen: 2 * PAGE, dataGpa: own });
        expect(r.status).toBe(S.OK);
        const marked = log.pages();
        const slot = (q.usedIdx() - 1) % q.size;
        const must = [...pagesOf(own, 2 * PAGE), ...pagesOf(r.statusGpa, 1), ...pagesOf(q.usedGpa + 2, 2), ...pagesOf(q.usedGpa + 4 + 8 * slot, 8)];
        for (const p of must) expect(marked.has(p), `page 0x${p.toString(16)} written and not marked`).toBe(true);
        const may = new Set([...must, ...pagesOf(q.usedGpa, 6 + 8 * q.size)]);
        for (const p of marked) expect(may.has(p), `page 0x${p.toString(16)} marked and never written`).toBe(true);
        expect(marked.has(Math.floor(own / PAGE) + 2), 'the third page, not written').toBe(false);

        // A write: vhostd only reads its data, so only the status byte and the used ring are marked.
        log.clear();
        const w = await blk.run({ type: T.OUT, sector: 8, out: payload, dataGpa: own });
        expect(w.status).toBe(S.OK);
        for (const p of pagesOf(own, 3 * PAGE)) expect(log.pages().has(p), `read-only page 0x${p.toString(16)} marked`).toBe(false);
        expect(log.pages().has(Math.floor(w.statusGpa / PAGE))).toBe(true);

        // GET_ID writes 20 bytes into the guest.
        log.clear();
        const id = await blk.run({ type: T.GET_ID, inLen: 20, dataGpa: own + 2 * PAGE });
        expect(id.status).toBe(S.OK);
        expect(log.pages().has(Math.floor(own / PAGE) + 2)).toBe(true);
        await s.stopDevice();
      });
    } finally {
      log.close();
    }
  });

  it('moves to a new log without a gap, stops marking when logging goes off, and loses or doubles no request meanwhile', async () => {
    const a = new TestLog();
    const b = new TestLog();
    try {
      await withSession(be(), async (s) => {
        await s.startDevice({ queues: 1, queueSize: 256, protocolFeatures: PROTOCOL });
        const blk = s.blk[0]!;
        await setLogBase(s, a);
        await logging(s, true);
        const own = s.mem.alloc(PAGE, PAGE);
        await blk.run({ type: T.IN, sector: 0, inLen: PAGE, dataGpa: own });
        expect(a.pages().has(own / PAGE)).toBe(true);
        // The log grows (QEMU's vhost_dev_log_resize): after the reply the old one is never touched.
        await setLogBase(s, b);
        a.clear();
        await blk.run({ type: T.IN, sector: 0, inLen: PAGE, dataGpa: own });
        expect(b.pages().has(own / PAGE)).toBe(true);
        expect(a.pages().size, 'marks in the replaced log').toBe(0);
        // The replaced log is unmapped by then: the daemon maps one log.
        expect(logMaps(), 'dirty log mappings in the daemon').toBe(1);

        // Logging on and off while 64 requests are in flight: each completes exactly once, and well.
        let submitted = 0;
        for (let round = 0; round < 8; round++) {
          const done: Promise<number>[] = [];
          for (let i = 0; i < 64; i++, submitted++) {
            const req = i % 2 ? { type: T.OUT, sector: i * 8, out: randomBytes(PAGE) } : { type: T.IN, sector: i * 8, inLen: PAGE };
            done.push(blk.submit(req).then((r) => r.status));
          }
          blk.kick();
          await logging(s, round % 2 === 0);
          const statuses = await Promise.all(done);
          expect(statuses.filter((st) => st !== S.OK), `round ${round}`).toEqual([]);
        }
        await logging(s, false);
        b.clear();
        await blk.run({ type: T.IN, sector: 0, inLen: PAGE, dataGpa: own });
        expect(b.pages().size, 'marks with logging off').toBe(0);
        const [base] = await s.stopDevice();
        expect(base, 'requests taken: each once').toBe(submitted + 3);
      });
      // The front-end went away: nothing of the log is left mapped.
      await waitFor(() => logMaps() === 0, 'the log unmapped after the disconnect');
    } finally {
      a.close();
      b.close();
    }
  });

  it('closes the connection for a running ring that moves, and for a log its fd cannot hold', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1, protocolFeatures: PROTOCOL });
      const q = s.queues[0]!;
      const moved = { ...q.addrs(), used: q.addrs().used + 4096n };
      s.fe.send(Req.SET_VRING_ADDR, VERSION, vringAddr({ index: 0, ...moved }));
      await s.fe.waitClosed();
    });
    await waitFor(() => /queue 0 is running; only its log flag and address may change/.test(be().output()), 'the refusal in the log');
    const small = new TestLog(4096);
    try {
      await withSession(be(), async (s) => {
        await s.negotiate({ protocolFeatures: PROTOCOL });
        const p = new Uint8Array(16);
        new DataView(p.buffer).setBigUint64(0, 8192n, true); // more than the memfd holds
        s.fe.send(Req.SET_LOG_BASE, VERSION, p, [small.fd]);
        await s.fe.waitClosed();
      });
      await waitFor(() => /SET_LOG_BASE: log fd holds 4096 bytes, the log needs 8192/.test(be().output()), 'the refusal in the log');
    } finally {
      small.close();
    }
  });
});

describe.each([
  ['', [] as string[]],
  [' on a queue thread', ['--threads', '1']],
])('device status%s', { timeout: 60_000 }, (_where, placement) => {
  const be = useBackend('vhostd', { numQueues: 1, imageBytes: 16 * MiB, extraArgs: placement });
  const getStatus = async (s: Session): Promise<number> => Number(readU64(await s.fe.query(Req.GET_STATUS, new Uint8Array(0), 8)));
  const setStatus = (s: Session, v: number | bigint): Promise<bigint> => s.fe.command(Req.SET_STATUS, u64(v));
  const ACK = 1, DRIVER = 2, DRIVER_OK = 4, FEATURES_OK = 8, NEEDS_RESET = 0x40;

  it('keeps FEATURES_OK clear until features are set; status 0 stops the rings and GET_VRING_BASE still tells where', async () => {
    await withSession(be(), async (s) => {
      await s.negotiate({ protocolFeatures: PROTOCOL });
      expect(s.protocol & bit(PF.STATUS)).toBe(bit(PF.STATUS));
      expect(await getStatus(s)).toBe(0);
      await setStatus(s, ACK | DRIVER | FEATURES_OK);
      expect(await getStatus(s), 'FEATURES_OK before SET_FEATURES').toBe(ACK | DRIVER);
    });
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1, protocolFeatures: PROTOCOL });
      await setStatus(s, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
      expect(await getStatus(s)).toBe(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
      const blk = s.blk[0]!;
      for (let i = 0; i < 5; i++) expect((await blk.run({ type: T.IN, sector: i, inLen: 512 })).status).toBe(S.OK);
      // QEMU 7.2's stop: SET_STATUS(0) first, then GET_VRING_BASE.
      await setStatus(s, 0);
      expect(await getStatus(s)).toBe(0);
      const late = blk.run({ type: T.IN, sector: 0, inLen: 512 });
      await new Promise((r) => setTimeout(r, 300));
      expect(s.queues[0]!.usedIdx(), 'served after status 0').toBe(5);
      const [base] = await s.stopDevice();
      expect(base).toBe(5);
      // Restarted as QEMU restarts a device: the request waiting in the ring is served then.
      await s.startRings();
      await setStatus(s, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
      expect((await late).status).toBe(S.OK);
    });
  });

  it('shows DEVICE_NEEDS_RESET while a ring has failed, and refuses a status that is not a byte', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1, protocolFeatures: PROTOCOL });
      await setStatus(s, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
      const q = s.queues[0]!;
      q.setAvailIdxRaw(q.size + 7); // further ahead than the ring holds: the ring fails
      q.kick();
      await waitFor(async () => ((await getStatus(s)) & NEEDS_RESET) !== 0, 'DEVICE_NEEDS_RESET');
      expect(await getStatus(s)).toBe(ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
      s.fe.send(Req.SET_STATUS, VERSION, u64(0x100));
      await s.fe.waitClosed();
    });
    await waitFor(() => /SET_STATUS: 0x100 is not a status byte/.test(be().output()), 'the refusal in the log');
  });
});
