// Inflight I/O tracking in memory shared with the front-end (vhost-user
// "Inflight I/O tracking", split-ring layout), so that requests in flight when
// the back-end dies are resubmitted, in their original order, after restart.
//
// Per queue: a 16-byte header {u64 features, u16 version, u16 desc_num,
// u16 last_batch_head, u16 used_idx} and desc_num 16-byte entries
// {u8 inflight, u8 pad[5], u16 next, u64 counter}, padded to 64 bytes.
import { fstatSync } from 'node:fs';
import { native, PROT_READ, PROT_WRITE } from '../native/index.js';
import { u16 } from './ring.js';

const ALIGN = 64;
const HEADER = 16;
const ENTRY = 16;
const VERSION = 1;
const OFF_VERSION = 8;
const OFF_DESC_NUM = 10;
const OFF_LAST_BATCH = 12;
const OFF_USED_IDX = 14;

export class InflightError extends Error {}

export function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((HEADER + ENTRY * queueSize) / ALIGN) * ALIGN;
}

/** The shared area for every queue of a device, as one mapping of the front-end's fd. */
export class InflightArea {
  readonly numQueues: number;
  readonly queueSize: number;
  private readonly address: bigint;
  private readonly length: number;
  private readonly buffer: ArrayBuffer;
  private readonly queues: InflightQueue[] = [];

  constructor(
    private readonly fd: number,
    mmapSize: bigint,
    mmapOffset: bigint,
    numQueues: number,
    queueSize: number,
  ) {
    try {
      if (numQueues < 1 || queueSize < 1 || queueSize > 32768) {
        throw new InflightError(`inflight area for ${numQueues} queues of ${queueSize} entries is invalid`);
      }
      const need = numQueues * inflightQueueBytes(queueSize);
      if (mmapSize < BigInt(need) || mmapSize > BigInt(need) * 2n) {
        throw new InflightError(`inflight area is ${mmapSize} bytes, expected ${need}`);
      }
      if (mmapOffset % 4096n || mmapOffset > 1n << 40n) throw new InflightError(`inflight mmap offset ${mmapOffset} is invalid`);
      let st;
      try {
        st = fstatSync(fd);
      } catch {
        throw new InflightError(`inflight fd ${fd} is not a valid file descriptor`);
      }
      // A mapping past the end of its file raises SIGBUS on first touch.
      if (!st.isFile() || BigInt(st.size) < mmapOffset + BigInt(need)) {
        throw new InflightError(`inflight fd holds ${st.size} bytes, the area needs ${mmapOffset + BigInt(need)}`);
      }
      this.length = need;
      try {
        this.address = native.mmap(fd, need, mmapOffset, PROT_READ | PROT_WRITE);
      } catch (e) {
        throw new InflightError(`cannot map the inflight area: ${(e as Error).message}`);
      }
      this.buffer = native.view(this.address, need);
      this.numQueues = numQueues;
      this.queueSize = queueSize;
      const per = inflightQueueBytes(queueSize);
      for (let q = 0; q < numQueues; q++) {
        const iq = new InflightQueue(new DataView(this.buffer, q * per, per), queueSize);
        iq.shared = { address: this.address + BigInt(q * per), length: per, capacity: queueSize };
        this.queues.push(iq);
      }
    } catch (e) {
      native.close(fd);
      throw e;
    }
  }

  queue(index: number): InflightQueue | undefined {
    return this.queues[index];
  }

  close(): void {
    native.detach(this.buffer);
    native.munmap(this.address, this.length);
    native.close(this.fd);
  }
}

/** Where a queue's record is mapped in this process, so a queue thread can view it (never map it). */
export interface SharedInflight {
  address: bigint;
  length: number;
  capacity: number;
}

export class InflightQueue {
  private counter = 1;
  /** Set by the InflightArea that mapped it. */
  shared: SharedInflight | undefined;

  constructor(
    private readonly dv: DataView,
    private readonly capacity: number,
  ) {}

  /**
   * A ring of `size` entries starts with `usedIdx` in its used ring. Returns
   * the heads still in flight from an earlier back-end, oldest first, or
   * an empty list when the area is new (or unusable, then it starts afresh).
   */
  start(size: number, usedIdx: number): { resubmit: number[]; recovered: boolean; reason?: string } {
    const dv = this.dv;
    if (size > this.capacity) return this.reset(size, usedIdx, `queue size ${size} exceeds the inflight area (${this.capacity})`);
    if (dv.getUint16(OFF_VERSION, true) !== VERSION) return this.reset(size, usedIdx);
    if (dv.getUint16(OFF_DESC_NUM, true) !== size) return this.reset(size, usedIdx, 'inflight area was laid out for another queue size');
    // A crash between publishing used->idx and clearing the batch's flags:
    // those chains did complete, so clear them now.
    const batch = u16(usedIdx - dv.getUint16(OFF_USED_IDX, true));
    if (batch > size) return this.reset(size, usedIdx, `used idx moved ${batch} entries past the inflight record`);
    let i = dv.getUint16(OFF_LAST_BATCH, true);
    for (let n = 0; n < batch; n++) {
      if (i >= size) return this.reset(size, usedIdx, 'inflight batch list is corrupt');
      dv.setUint8(HEADER + i * ENTRY, 0);
      i = dv.getUint16(HEADER + i * ENTRY + 6, true);
    }
    dv.setUint16(OFF_USED_IDX, usedIdx, true);
    const pending: { head: number; counter: number }[] = [];
    let max = 0;
    for (let h = 0; h < size; h++) {
      const c = this.getCounter(h);
      if (c > max) max = c;
      if (dv.getUint8(HEADER + h * ENTRY) === 1) pending.push({ head: h, counter: c });
    }
    pending.sort((a, b) => a.counter - b.counter);
    this.counter = max + 1;
    return { resubmit: pending.map((p) => p.head), recovered: true };
  }

  /**
   * Take up a record another object kept (a queue thread's view of it, made
   * anew at each start): go on numbering fetches after the highest so far, so
   * recovery still resubmits in fetch order.
   */
  resumeNumbering(size: number): void {
    let max = 0;
    for (let h = 0; h < Math.min(size, this.capacity); h++) max = Math.max(max, this.getCounter(h));
    this.counter = max + 1;
  }

  private reset(size: number, usedIdx: number, reason?: string): { resubmit: number[]; recovered: boolean; reason?: string } {
    const n = HEADER + ENTRY * Math.min(size, this.capacity);
    new Uint8Array(this.dv.buffer, this.dv.byteOffset, n).fill(0);
    this.dv.setUint16(OFF_VERSION, VERSION, true);
    this.dv.setUint16(OFF_DESC_NUM, size, true);
    this.dv.setUint16(OFF_USED_IDX, usedIdx, true);
    this.counter = 1;
    return reason ? { resubmit: [], recovered: false, reason } : { resubmit: [], recovered: false };
  }

  private getCounter(head: number): number {
    const o = HEADER + head * ENTRY + 8;
    return this.dv.getUint32(o, true) + this.dv.getUint32(o + 4, true) * 0x100000000;
  }

  /** A chain was taken from the avail ring. */
  fetched(head: number): void {
    const o = HEADER + head * ENTRY;
    const c = this.counter++;
    this.dv.setUint32(o + 8, c % 0x100000000, true);
    this.dv.setUint32(o + 12, Math.floor(c / 0x100000000), true);
    this.dv.setUint8(o, 1);
  }

  /** Before the used ring is published: link the chain into this batch. */
  completing(head: number): void {
    const o = HEADER + head * ENTRY;
    this.dv.setUint16(o + 6, this.dv.getUint16(OFF_LAST_BATCH, true), true);
    this.dv.setUint16(OFF_LAST_BATCH, head, true);
  }

  /** After the used ring is published: the chain is no longer in flight. */
  done(head: number): void {
    this.dv.setUint8(HEADER + head * ENTRY, 0);
  }

  /** After every done() of a batch: the record has caught up with used->idx. */
  caughtUp(usedIdx: number): void {
    this.dv.setUint16(OFF_USED_IDX, usedIdx, true);
  }
}
