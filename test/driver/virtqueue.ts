// The driver side of a split virtqueue (VIRTIO 1.x §2.7) in fake guest
// memory: descriptor table, avail ring (with used_event) and used ring (with
// avail_event), kick and call eventfds.
// The call eventfd is polled rather than watched: see frontend.ts on native.watch().
import { native, EAGAIN, EFD_CLOEXEC, EFD_NONBLOCK } from '../../src/native/index.js';
import type { GuestMemory } from './guest.js';

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
export const AVAIL_F_NO_INTERRUPT = 1;

export interface Buf {
  gpa: number;
  len: number;
  /** Device-writable. */
  write: boolean;
}

export interface UsedElem {
  id: number;
  len: number;
}

export interface ChainOptions {
  /** Put the chain in an indirect table (one descriptor in the ring). */
  indirect?: boolean;
  /** Guest region for the indirect table. */
  tableRegion?: number;
}

/** A raw descriptor, for hostile-guest tests. */
export interface RawDesc {
  addr: bigint | number;
  len: number;
  flags: number;
  next: number;
}

const u16 = (v: number): number => v & 0xffff;

export class SplitQueue {
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly kickFd: number;
  callFd: number;
  /** Driver's avail idx (next slot to publish). */
  availIdx = 0;
  /** Used entries consumed so far. */
  lastUsed = 0;
  /** What SET_VRING_BASE sends: 0, then whatever GET_VRING_BASE returned. */
  base = 0;
  /** Call-fd signals seen so far (eventfd counter values summed). */
  signals = 0;
  /** EVENT_IDX negotiated: waitUsed() moves used_event like Linux does. */
  eventIdx = false;
  /** When false, waitUsed() leaves used_event alone (notification tests set it by hand). */
  autoUsedEvent = true;
  /** Also poll the used ring instead of relying only on call signals. */
  poll = false;

  private readonly desc: DataView;
  private readonly avail: Uint16Array;
  private readonly used: Uint16Array;
  private readonly usedDv: DataView;
  private freeDescs: number[];
  private readonly chains = new Map<number, { descs: number[]; table?: number }>();
  private readonly counter = new BigUint64Array(1);
  private destroyed = false;

  constructor(
    private readonly mem: GuestMemory,
    readonly index: number,
    readonly size: number,
    region = 0,
  ) {
    this.descGpa = mem.alloc(16 * size, 16, region);
    this.availGpa = mem.alloc(6 + 2 * size, 2, region);
    this.usedGpa = mem.alloc(6 + 8 * size, 4, region);
    mem.fill(this.descGpa, 16 * size, 0);
    mem.fill(this.availGpa, 6 + 2 * size, 0);
    mem.fill(this.usedGpa, 6 + 8 * size, 0);
    const d = mem.view(this.descGpa, 16 * size);
    this.desc = new DataView(d.buffer, d.byteOffset, d.byteLength);
    const a = mem.view(this.availGpa, 6 + 2 * size);
    this.avail = new Uint16Array(a.buffer, a.byteOffset, (6 + 2 * size) / 2);
    const u = mem.view(this.usedGpa, 6 + 8 * size);
    this.used = new Uint16Array(u.buffer, u.byteOffset, (6 + 8 * size) / 2);
    this.usedDv = new DataView(u.buffer, u.byteOffset, u.byteLength);
    this.freeDescs = Array.from({ length: size }, (_, i) => i);
    this.kickFd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    this.callFd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }

  /**
   * Start the indices at n instead of 0 (before the ring starts), as after a
   * long-running guest: avail idx, used idx in memory and the base all agree.
   */
  startAt(n: number): void {
    if (this.outstanding) throw new Error('startAt with requests outstanding');
    this.availIdx = u16(n);
    this.lastUsed = u16(n);
    this.base = u16(n);
    Atomics.store(this.avail, 1, this.availIdx);
    Atomics.store(this.used, 1, this.lastUsed);
  }

  /** Addresses for SET_VRING_ADDR: front-end virtual addresses. */
  addrs(): { desc: bigint; avail: bigint; used: bigint } {
    return { desc: this.mem.uva(this.descGpa), avail: this.mem.uva(this.availGpa), used: this.mem.uva(this.usedGpa) };
  }

  get freeCount(): number {
    return this.freeDescs.length;
  }

  get outstanding(): number {
    return this.chains.size;
  }

  private readCounter(): void {
    const n = native.read(this.callFd, this.counter);
    if (n === 8) this.signals += Number(this.counter[0]);
    else if (n !== -EAGAIN) throw new Error(`read call eventfd: ${n}`);
  }

  /** Read the call eventfd now; returns the total signals seen. */
  drainCall(): number {
    this.readCounter();
    return this.signals;
  }

  private writeDesc(table: DataView, i: number, d: RawDesc): void {
    table.setBigUint64(i * 16, BigInt(d.addr), true);
    table.setUint32(i * 16 + 8, d.len, true);
    table.setUint16(i * 16 + 12, d.flags, true);
    table.setUint16(i * 16 + 14, d.next, true);
  }

  /** Build a chain (direct or indirect) and publish it. Returns the head. */
  submit(bufs: Buf[], opts: ChainOptions = {}): number {
    if (bufs.length === 0) throw new Error('empty chain');
    if (opts.indirect) {
      const n = bufs.length;
      const table = this.mem.alloc(16 * n, 16, opts.tableRegion);
      const tv = this.mem.view(table, 16 * n);
      const tdv = new DataView(tv.buffer, tv.byteOffset, tv.byteLength);
      bufs.forEach((b, i) =>
        this.writeDesc(tdv, i, {
          addr: b.gpa,
          len: b.len,
          flags: (i < n - 1 ? DESC_F_NEXT : 0) | (b.write ? DESC_F_WRITE : 0),
          next: i < n - 1 ? i + 1 : 0,
        }),
      );
      const head = this.takeDescs(1)[0]!;
      this.writeDesc(this.desc, head, { addr: table, len: 16 * n, flags: DESC_F_INDIRECT, next: 0 });
      this.chains.set(head, { descs: [head], table });
      this.publish(head);
      return head;
    }
    const ids = this.takeDescs(bufs.length);
    bufs.forEach((b, i) =>
      this.writeDesc(this.desc, ids[i]!, {
        addr: b.gpa,
        len: b.len,
        flags: (i < ids.length - 1 ? DESC_F_NEXT : 0) | (b.write ? DESC_F_WRITE : 0),
        next: i < ids.length - 1 ? ids[i + 1]! : 0,
      }),
    );
    this.chains.set(ids[0]!, { descs: ids });
    this.publish(ids[0]!);
    return ids[0]!;
  }

  /**
   * Write raw descriptors at the given table slots and publish `head`, for
   * malformed chains. The slots are taken from the free list.
   */
  submitRaw(descs: { slot: number; desc: RawDesc }[], head: number): void {
    const slots = descs.map((d) => d.slot);
    for (const s of slots) {
      const i = this.freeDescs.indexOf(s);
      if (i < 0) throw new Error(`descriptor ${s} is in use`);
      this.freeDescs.splice(i, 1);
    }
    for (const d of descs) this.writeDesc(this.desc, d.slot, d.desc);
    this.chains.set(head, { descs: slots });
    this.publish(head);
  }

  private takeDescs(n: number): number[] {
    if (this.freeDescs.length < n) throw new Error(`queue ${this.index}: ${n} descriptors wanted, ${this.freeDescs.length} free`);
    return this.freeDescs.splice(0, n);
  }

  /** Publish a head in the avail ring; Atomics.store orders it after the descriptors. */
  publish(head: number): void {
    this.avail[2 + (this.availIdx % this.size)] = head;
    this.availIdx = u16(this.availIdx + 1);
    Atomics.store(this.avail, 1, this.availIdx);
  }

  /** Set avail->idx directly (hostile tests). */
  setAvailIdxRaw(v: number): void {
    Atomics.store(this.avail, 1, u16(v));
  }

  kick(): void {
    const n = native.write(this.kickFd, new BigUint64Array([1n]));
    if (n !== 8) throw new Error(`kick write: ${n}`);
  }

  /**
   * Switch to a fresh call eventfd (send it with SET_VRING_CALL), as QEMU does
   * when it masks a vector. Returns the old fd, now the caller's to close.
   */
  swapCallFd(): number {
    this.drainCall();
    const old = this.callFd;
    this.callFd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return old;
  }

  /** Consume pending kicks, so a back-end can only learn of new chains by looking at the ring. */
  drainKick(): void {
    native.read(this.kickFd, this.counter);
  }

  usedIdx(): number {
    return Atomics.load(this.used, 1);
  }

  usedFlags(): number {
    return Atomics.load(this.used, 0);
  }

  /** avail_event, published by the back-end in used->ring[size]. */
  availEvent(): number {
    return Atomics.load(this.used, 2 + 4 * this.size);
  }

  setUsedEvent(v: number): void {
    Atomics.store(this.avail, 2 + this.size, u16(v));
  }

  setAvailFlags(flags: number): void {
    Atomics.store(this.avail, 0, flags);
  }

  /** Consume used entries published so far, returning their descriptors to the free list. */
  collect(): UsedElem[] {
    const out: UsedElem[] = [];
    const end = this.usedIdx();
    if (u16(end - this.lastUsed) > this.size) throw new Error(`queue ${this.index}: used idx ${end} is more than a ring ahead of ${this.lastUsed}`);
    while (this.lastUsed !== end) {
      const slot = this.lastUsed % this.size;
      const id = this.usedDv.getUint32(4 + slot * 8, true);
      const len = this.usedDv.getUint32(8 + slot * 8, true);
      const c = this.chains.get(id);
      if (!c) throw new Error(`queue ${this.index}: back-end returned head ${id}, which is not outstanding`);
      this.chains.delete(id);
      this.freeDescs.push(...c.descs);
      if (c.table !== undefined) this.mem.free(c.table);
      out.push({ id, len });
      this.lastUsed = u16(this.lastUsed + 1);
    }
    return out;
  }

  /** Until the call fd has been signalled since `seen`, or ms pass. */
  private async waitSignal(seen: number, ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.destroyed && this.drainCall() === seen && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /**
   * Wait for at least `min` used entries. Without `poll` only a call signal
   * wakes us, so this also checks that the back-end notifies.
   */
  async waitUsed(min = 1, timeoutMs = 10_000): Promise<UsedElem[]> {
    const out: UsedElem[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const seen = this.signals;
      // Linux's virtqueue_enable_cb: interrupt on the next entry. Atomics.store is a full barrier before the re-check.
      if (this.eventIdx && this.autoUsedEvent) this.setUsedEvent(this.lastUsed);
      out.push(...this.collect());
      if (out.length >= min) return out;
      // The collect moved lastUsed past the used_event just published, which the
      // device may already have passed: without moving it again and re-checking,
      // no interrupt comes until the index wraps.
      if (this.eventIdx && this.autoUsedEvent) {
        this.setUsedEvent(this.lastUsed);
        out.push(...this.collect());
        if (out.length >= min) return out;
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `queue ${this.index}: ${out.length}/${min} completions after ${timeoutMs} ms ` +
            `(avail ${this.availIdx}, used ${this.usedIdx()}, signals ${this.signals}${this.poll ? ', polling' : ''})`,
        );
      }
      await this.waitSignal(seen, this.poll ? Math.min(left, 5) : left);
    }
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    native.close(this.kickFd);
    native.close(this.callFd);
  }
}
