// The dirty log on crafted bitmaps: marks set exactly the pages of the bytes
// written, atomically; and through a real executor, every page the ring
// layer or a device writes is marked (data, status byte, used entries, used
// index, avail_event) and nothing else is (headers, unwritten tails, the
// descriptor table, the avail ring, an indirect table).
import { ftruncateSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { DescriptorChain } from '../../src/ring/chain.js';
import { DirtyLog, LOG_PAGE, LogArea, LogError } from '../../src/ring/dirty-log.js';
import { QueueExecutor, type QueueRunner, type RingConfig } from '../../src/ring/executor.js';
import type { GuestMemory } from '../../src/ring/guest-memory.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE } from '../../src/ring/split-ring.js';
import { native, MFD_CLOEXEC } from '../../src/native/index.js';
import { gview, makeMemory, writeDesc } from './fixtures.js';

const pagesOf = (bits: Uint8Array): number[] => {
  const out: number[] = [];
  bits.forEach((b, i) => {
    for (let k = 0; k < 8; k++) if (b & (1 << k)) out.push(i * 8 + k);
  });
  return out;
};

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe('DirtyLog on a crafted bitmap', () => {
  it('marks exactly the pages a range touches, bit page%8 of byte page/8', () => {
    const bits = new Uint8Array(8);
    const log = new DirtyLog(bits);
    log.mark(0, 1);
    expect(pagesOf(bits)).toEqual([0]);
    log.mark(LOG_PAGE - 1, 2); // the last byte of page 0 and the first of page 1
    expect(pagesOf(bits)).toEqual([0, 1]);
    log.mark(3 * 8 * LOG_PAGE - 1, 9 * LOG_PAGE); // page 23 through 32: across three bytes
    expect(pagesOf(bits)).toEqual([0, 1, ...range(23, 32)]);
    expect(Array.from(bits.subarray(2, 5))).toEqual([0x80, 0xff, 0x01]);
    log.mark(40 * LOG_PAGE, 0);
    expect(pagesOf(bits)).toEqual([0, 1, ...range(23, 32)]);
    expect(log.outside).toBe(0);
  });

  it('counts marks past its end and writes nothing there', () => {
    const backing = new Uint8Array(4);
    const log = new DirtyLog(backing.subarray(0, 2)); // 16 pages; the bytes after it must stay 0
    log.mark(14 * LOG_PAGE, 4 * LOG_PAGE);
    expect(pagesOf(backing)).toEqual([14, 15]);
    log.mark(2 ** 52, 1);
    expect(log.outside).toBe(2);
    expect(Array.from(backing.subarray(2))).toEqual([0, 0]);
  });

  it('loses no bit when two threads mark the same bytes at once', async () => {
    // Two threads sweep one 4 MiB log in step, each marking every page whose
    // bit is theirs (pages 8k+1 and 8k+6: the same bytes). A plain
    // read-modify-write loses about one byte in ten thousand here; atomic ORs none.
    const bytes = 1 << 22;
    const fd = native.memfdCreate('vhostd-log-test', MFD_CLOEXEC);
    ftruncateSync(fd, bytes);
    const area = new LogArea(fd, BigInt(bytes), 0n, -1);
    try {
      const code = `
        const { workerData: d, parentPort } = require('node:worker_threads');
        import(d.module).then(({ DirtyLog }) => {
          const native = require(d.native);
          const buffer = native.view(BigInt(d.address), d.bytes);
          const log = new DirtyLog(new Uint8Array(buffer));
          const gate = new Int32Array(d.gate);
          Atomics.add(gate, 0, 1);
          while (Atomics.load(gate, 0) < 2);
          for (let page = d.bit; page < d.bytes * 8; page += 8) log.mark(page * 4096, 1);
          native.detach(buffer);
          parentPort.postMessage('done');
        });`;
      const gate = new SharedArrayBuffer(4);
      const data = {
        module: new URL('../../dist/ring/dirty-log.js', import.meta.url).href,
        native: new URL('../../build/Release/vhostd_native.node', import.meta.url).pathname,
        address: area.shared.address.toString(),
        bytes,
        gate,
      };
      const run = (bit: number): Promise<void> =>
        new Promise((resolve, reject) => {
          const w = new Worker(code, { eval: true, workerData: { ...data, bit } });
          w.once('message', () => resolve());
          w.once('error', reject);
        });
      await Promise.all([run(1), run(6)]);
      const view = new Uint8Array(native.view(area.shared.address, bytes));
      let wrong = 0;
      for (let i = 0; i < bytes; i++) if (view[i] !== 0x42) wrong++;
      native.detach(view.buffer);
      expect(wrong, 'bytes missing a mark').toBe(0);
    } finally {
      area.close();
    }
  });

  it('refuses a log its fd cannot hold, one too large, and a misaligned offset', () => {
    const make = (fileBytes: number, size: bigint, offset: bigint): void => {
      const fd = native.memfdCreate('vhostd-log-test', MFD_CLOEXEC);
      ftruncateSync(fd, fileBytes);
      new LogArea(fd, size, offset, -1).close();
    };
    expect(() => make(4096, 8192n, 0n)).toThrow(LogError);
    expect(() => make(4096, 0n, 0n)).toThrow(/outside 1\.\./);
    expect(() => make(4096, 2n ** 31n, 0n)).toThrow(/outside 1\.\./);
    expect(() => make(8192, 16n, 100n)).toThrow(/page-aligned/);
    expect(() => new LogArea(987654, 16n, 0n, -1)).toThrow(/not a valid file descriptor/);
    make(8192, 100n, 4096n);
  });
});

// A crafted layout with every structure on its own page, so the bitmap tells
// them apart: descriptors on page 0x10, the avail ring on 0x11, the used ring
// from 0x12ff0 (its index and first entry on page 0x12, its second entry across
// 0x12/0x13 and avail_event on 0x13).
const SIZE = 8;
const DESC = 0x10000;
const AVAIL = 0x11000;
const USED = 0x12ff0;
const HEADER = 0x20000;
const DATA1 = 0x30f00; // 0x200 bytes over pages 0x30 and 0x31
const DATA2 = 0x40000; // 0x3000 bytes over pages 0x40..0x42
const STATUS = 0x50800;
const INDIRECT = 0x60000;

describe('dirty logging through an executor', () => {
  let mem: GuestMemory | undefined;
  let exec: QueueExecutor | undefined;
  let area: LogArea | undefined;
  afterEach(async () => {
    await exec?.stop();
    exec = undefined;
    area?.close();
    area = undefined;
    mem?.clear();
  });

  const LOG_BYTES = 64; // 512 pages: 2 MiB of guest memory

  function setup(): { bits: Uint8Array; served: DescriptorChain[]; publish: (head: number) => void } {
    mem = makeMemory([{ gpa: 0, size: 4 << 20, uva: 0 }]);
    const desc = gview(mem, DESC, 16 * SIZE);
    writeDesc(desc, 0, HEADER, 16, DESC_F_NEXT, 1);
    writeDesc(desc, 1, DATA1, 0x200, DESC_F_WRITE | DESC_F_NEXT, 2);
    writeDesc(desc, 2, DATA2, 0x3000, DESC_F_WRITE | DESC_F_NEXT, 3);
    writeDesc(desc, 3, STATUS, 1, DESC_F_WRITE, 0);
    // The same request through an indirect table at head 4.
    const table = gview(mem, INDIRECT, 64);
    writeDesc(table, 0, HEADER, 16, DESC_F_NEXT, 1);
    writeDesc(table, 1, DATA1, 0x200, DESC_F_WRITE | DESC_F_NEXT, 2);
    writeDesc(table, 2, DATA2, 0x3000, DESC_F_WRITE | DESC_F_NEXT, 3);
    writeDesc(table, 3, STATUS, 1, DESC_F_WRITE, 0);
    writeDesc(desc, 4, INDIRECT, 64, DESC_F_INDIRECT, 0);
    const avail = gview(mem, AVAIL, 6 + 2 * SIZE);
    let idx = 0;
    const publish = (head: number): void => {
      avail.setUint16(4 + 2 * (idx % SIZE), head, true);
      avail.setUint16(2, ++idx, true);
    };
    const fd = native.memfdCreate('vhostd-log-test', MFD_CLOEXEC);
    ftruncateSync(fd, 4096);
    area = new LogArea(fd, BigInt(LOG_BYTES), 0n, -1);
    const bits = new Uint8Array(native.view(area.shared.address, LOG_BYTES));
    const served: DescriptorChain[] = [];
    return { bits, served, publish };
  }

  /** A device that writes all of DATA1 and 0x1001 bytes of DATA2, then the status byte. */
  function runner(served: DescriptorChain[], hold = false): QueueRunner {
    return {
      start: (q) => ({
        faults: 'status',
        run: () => {
          const c = new DescriptorChain();
          while (q.pop(c)) {
            const w = c.readableSegs;
            c.segs[w]!.fill(1);
            c.segs[w + 1]!.subarray(0, 0x1001).fill(2);
            c.writeStatus(0);
            const done = new DescriptorChain();
            done.copyFrom(c);
            if (hold) served.push(done);
            else q.complete(done, 0x200 + 0x1001 + 1);
          }
          return 'idle';
        },
      }),
      stop: () => undefined,
    };
  }

  function start(r: QueueRunner, logAddr?: number): QueueExecutor {
    const cfg: RingConfig = {
      index: 0,
      size: SIZE,
      base: 0,
      addrs: { desc: DESC, avail: AVAIL, used: USED },
      features: { eventIdx: true, indirect: true, notifyOnEmpty: false },
      enabled: true,
      kick: -1,
      call: -1,
      err: -1,
      logAddr,
    };
    exec = new QueueExecutor(cfg, mem!, { error() {}, warn() {}, info() {}, debug() {} }, undefined);
    exec.start(r, undefined, true);
    return exec;
  }

  const turn = (): Promise<void> => new Promise((r) => setTimeout(r, 20));
  const usedIdx = (): number => gview(mem!, USED, 4).getUint16(2, true);

  it('marks data written, the status byte and the used ring, and nothing else', async () => {
    const { bits, served, publish } = setup();
    const e = start(runner(served));
    e.setLog(area!.log, undefined);
    publish(0);
    await turn();
    expect(usedIdx()).toBe(1);
    // Data: all of DATA1 (0x30, 0x31), DATA2's first 0x1001 bytes (0x40, 0x41) but not its tail (0x42);
    // the status byte (0x50); the used index and entry 0 (0x12), avail_event (0x13).
    expect(pagesOf(bits)).toEqual([0x12, 0x13, 0x30, 0x31, 0x40, 0x41, 0x50]);
    bits.fill(0);
    publish(4); // the indirect one: its table (page 0x60) is read, never written
    await turn();
    expect(usedIdx()).toBe(2);
    expect(pagesOf(bits)).toEqual([0x12, 0x13, 0x30, 0x31, 0x40, 0x41, 0x50]);
  });

  it('marks the used ring at log_guest_addr when the front-end gives one', async () => {
    const { bits, served, publish } = setup();
    const e = start(runner(served), 0x100000); // a used ring "seen" at 1 MiB: pages 0x100, 0x101
    e.setLog(area!.log, 0x100000);
    publish(0);
    await turn();
    expect(pagesOf(bits)).toEqual([0x30, 0x31, 0x40, 0x41, 0x50, 0x100]);
  });

  it('marks nothing while logging is off, and a chain taken before logging began is marked whole', async () => {
    const { bits, served, publish } = setup();
    const e = start(runner(served, true));
    publish(0);
    await turn();
    expect(served.length).toBe(1); // taken, written, not completed yet
    expect(pagesOf(bits)).toEqual([]);
    e.setLog(area!.log, undefined);
    e.complete(served[0]!, 0x200 + 0x1001 + 1);
    expect(pagesOf(bits)).toEqual([0x12, 0x30, 0x31, 0x40, 0x41, 0x50]);
    e.setLog(undefined, undefined);
    bits.fill(0);
    publish(4);
    await turn();
    e.complete(served[1]!, 0x200 + 0x1001 + 1);
    await turn();
    expect(usedIdx()).toBe(2);
    expect(pagesOf(bits)).toEqual([]);
  });
});
