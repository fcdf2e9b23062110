// The front-end's view of an inflight area (vhost-user "Inflight I/O tracking",
// split-ring layout), mapped from the fd GET_INFLIGHT_FD returned. QEMU only
// stores and hands the area back; tests also read it to judge the back-end,
// and write it to play a back-end that crashed.
//
// Per queue, padded to 64 bytes:
//   header  {u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx}
//   entries desc_num x {u8 inflight, u8 pad[5], u16 next, u64 counter}
import { fstatSync } from 'node:fs';
import { native, PROT_READ, PROT_WRITE } from '../../src/native/index.js';

export const INFLIGHT_HEADER = 16;
export const INFLIGHT_ENTRY = 16;
export const INFLIGHT_ALIGN = 64;

export function inflightQueueRegion(queueSize: number): number {
  return Math.ceil((INFLIGHT_HEADER + INFLIGHT_ENTRY * queueSize) / INFLIGHT_ALIGN) * INFLIGHT_ALIGN;
}

export interface InflightEntry {
  inflight: number;
  next: number;
  counter: bigint;
}

/** One queue's record. Offsets are from the spec, not from vhostd's code. */
export class InflightQueueView {
  constructor(
    private readonly dv: DataView,
    readonly capacity: number,
  ) {}

  get features(): bigint {
    return this.dv.getBigUint64(0, true);
  }
  get version(): number {
    return this.dv.getUint16(8, true);
  }
  set version(v: number) {
    this.dv.setUint16(8, v, true);
  }
  get descNum(): number {
    return this.dv.getUint16(10, true);
  }
  set descNum(v: number) {
    this.dv.setUint16(10, v, true);
  }
  get lastBatchHead(): number {
    return this.dv.getUint16(12, true);
  }
  set lastBatchHead(v: number) {
    this.dv.setUint16(12, v, true);
  }
  get usedIdx(): number {
    return this.dv.getUint16(14, true);
  }
  set usedIdx(v: number) {
    this.dv.setUint16(14, v, true);
  }

  private off(i: number): number {
    if (i < 0 || i >= this.capacity) throw new Error(`inflight entry ${i} outside ${this.capacity}`);
    return INFLIGHT_HEADER + i * INFLIGHT_ENTRY;
  }

  entry(i: number): InflightEntry {
    const o = this.off(i);
    return { inflight: this.dv.getUint8(o), next: this.dv.getUint16(o + 6, true), counter: this.dv.getBigUint64(o + 8, true) };
  }

  setEntry(i: number, e: Partial<InflightEntry>): void {
    const o = this.off(i);
    if (e.counter !== undefined) this.dv.setBigUint64(o + 8, e.counter, true);
    if (e.next !== undefined) this.dv.setUint16(o + 6, e.next, true);
    if (e.inflight !== undefined) this.dv.setUint8(o, e.inflight);
  }

  /** Heads whose inflight flag is set, among the first n entries. */
  inflightHeads(n = this.capacity): number[] {
    const out: number[] = [];
    for (let i = 0; i < Math.min(n, this.capacity); i++) if (this.dv.getUint8(this.off(i)) !== 0) out.push(i);
    return out;
  }

  /** Zero the header and every entry. */
  clear(): void {
    new Uint8Array(this.dv.buffer, this.dv.byteOffset, this.dv.byteLength).fill(0);
  }
}

export class InflightAreaView {
  readonly bytes: Uint8Array;
  private readonly address: bigint;
  private destroyed = false;

  /** Maps [offset, offset + size) of fd. The fd stays the caller's. */
  constructor(
    readonly fd: number,
    readonly size: number,
    readonly numQueues: number,
    readonly queueSize: number,
    offset = 0,
  ) {
    this.address = native.mmap(fd, size, offset, PROT_READ | PROT_WRITE);
    this.bytes = new Uint8Array(native.view(this.address, size));
  }

  /** Size of the file behind the fd (a memfd's size is what ftruncate set). */
  static fileSize(fd: number): number {
    return fstatSync(fd).size;
  }

  queue(q: number): InflightQueueView {
    if (q < 0 || q >= this.numQueues) throw new Error(`inflight queue ${q} outside ${this.numQueues}`);
    const per = inflightQueueRegion(this.queueSize);
    return new InflightQueueView(new DataView(this.bytes.buffer, this.bytes.byteOffset + q * per, per), this.queueSize);
  }

  isZero(): boolean {
    return this.bytes.every((b) => b === 0);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    native.detach(this.bytes.buffer as ArrayBuffer);
    native.munmap(this.address, this.size);
  }
}
