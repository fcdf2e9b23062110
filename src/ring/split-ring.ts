// Split virtqueue mechanics (VIRTIO 1.x §2.7): reading the avail ring, walking
// descriptor chains, filling the used ring and deciding on notifications.
// Everything read from guest memory is hostile and is validated here.
import { native } from '../native/index.js';
import { GuestMemory, MAX_ADDRESS, WINDOW_OVERLAP, type Place } from './guest-memory.js';

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
export const AVAIL_F_NO_INTERRUPT = 1;
export const DESC_SIZE = 16;
export const MAX_QUEUE_SIZE = 32768;
/** Largest indirect table accepted; Linux never builds one larger than a queue. */
export const MAX_INDIRECT_DESCS = WINDOW_OVERLAP / DESC_SIZE;
/** A chain moves at most this many bytes; more is a guest bug or an attack. */
export const MAX_CHAIN_BYTES = 2 ** 32 - 1;

/** The ring itself is unusable: the whole queue must stop. */
export class RingError extends Error {}
/** One chain is malformed: it fails, the queue may continue. */
export class ChainError extends Error {}

export const u16 = (v: number): number => v & 0xffff;

/** VIRTIO 1.x "vring_need_event": notify when the driver's event index lies in [old, new). */
export function needEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return u16(newIdx - event - 1) < u16(newIdx - oldIdx);
}

/** Typed arrays need aligned offsets in their buffer, and atomics need aligned host addresses. */
function misaligned(p: Place, align: number): boolean {
  const host = Number(native.address(p.bytes) % 64n) + p.offset;
  return (p.bytes.byteOffset + p.offset) % align !== 0 || host % align !== 0;
}

export function ringSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: DESC_SIZE * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** A descriptor chain, resolved into views of guest memory. */
export class Chain {
  head = 0;
  /** Driver-to-device bytes, in order. */
  readonly readable: Uint8Array[] = [];
  /** Device-to-driver bytes, in order. */
  readonly writable: Uint8Array[] = [];
  readableBytes = 0;
  writableBytes = 0;
  descriptors = 0;
  /** Why the chain is malformed; it was still consumed and must be completed. */
  error: string | undefined;

  reset(head: number): void {
    this.head = head;
    this.error = undefined;
    this.readable.length = 0;
    this.writable.length = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.descriptors = 0;
  }
}

export interface RingAddresses {
  /** Front-end virtual addresses, as SET_VRING_ADDR carries them. */
  desc: number;
  avail: number;
  used: number;
}

export interface RingFeatures {
  eventIdx: boolean;
  indirect: boolean;
  notifyOnEmpty: boolean;
}

export class SplitRing {
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly features: RingFeatures;
  private readonly desc: DataView;
  private readonly avail: Uint16Array;
  private readonly used: Uint16Array;
  private readonly usedDv: DataView;
  /** Next avail entry to consume. */
  lastAvail: number;
  /** Our copy of used->idx. */
  usedIdx: number;
  private signalledUsed = 0;
  private signalledValid = false;

  constructor(mem: GuestMemory, size: number, addrs: RingAddresses, features: RingFeatures, lastAvail: number) {
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RingError(`queue size ${size} is not a power of two in 1..${MAX_QUEUE_SIZE}`);
    }
    if (addrs.desc % 16 || addrs.avail % 2 || addrs.used % 4) {
      throw new RingError('ring addresses are misaligned (desc 16, avail 2, used 4)');
    }
    const sz = ringSizes(size);
    const d = mem.smallByUva(addrs.desc, sz.desc);
    const a = mem.smallByUva(addrs.avail, sz.avail);
    const u = mem.smallByUva(addrs.used, sz.used);
    if (!d || !a || !u) throw new RingError('ring addresses lie outside guest memory');
    // A region whose file offset and front-end address disagree in their low bits puts aligned
    // rings at odd places of our mapping, where the avail and used rings cannot be accessed atomically.
    if (misaligned(d, 16) || misaligned(a, 2) || misaligned(u, 4)) {
      throw new RingError('ring addresses map to misaligned memory: the region\'s mmap_offset and userspace_addr are not aligned alike');
    }
    this.size = size;
    this.mem = mem;
    this.features = features;
    this.desc = new DataView(d.bytes.buffer, d.bytes.byteOffset + d.offset, sz.desc);
    this.avail = new Uint16Array(a.bytes.buffer, a.bytes.byteOffset + a.offset, sz.avail / 2);
    this.used = new Uint16Array(u.bytes.buffer, u.bytes.byteOffset + u.offset, sz.used / 2);
    this.usedDv = new DataView(u.bytes.buffer, u.bytes.byteOffset + u.offset, sz.used);
    this.lastAvail = u16(lastAvail);
    this.usedIdx = Atomics.load(this.used, 1);
  }

  availIdx(): number {
    return Atomics.load(this.avail, 1);
  }

  /** Entries published by the driver and not yet taken. Throws RingError on an impossible index. */
  pending(): number {
    const n = u16(this.availIdx() - this.lastAvail);
    if (n > this.size) throw new RingError(`avail idx is ${n} entries ahead of the device, queue size is ${this.size}`);
    return n;
  }

  /**
   * Take the next available chain into `chain`. Returns false when the ring is empty.
   * Throws RingError if the ring itself is unusable. A malformed chain is still
   * consumed and returned with `chain.error` set: complete it with `chain.head`.
   */
  pop(chain: Chain): boolean {
    if (this.pending() === 0) return false;
    const head = this.avail[2 + (this.lastAvail % this.size)]!;
    if (head >= this.size) throw new RingError(`avail ring names descriptor ${head}, queue size is ${this.size}`);
    this.lastAvail = u16(this.lastAvail + 1);
    chain.reset(head);
    try {
      this.walk(chain);
    } catch (e) {
      if (!(e instanceof ChainError)) throw e;
      chain.error = e.message;
    }
    return true;
  }

  /** Re-read the chain at `head` (resubmitting one taken by an earlier back-end). */
  chainAt(head: number, chain: Chain): void {
    chain.reset(head);
    if (head >= this.size) {
      chain.error = `inflight head ${head} is outside the queue`;
      return;
    }
    try {
      this.walk(chain);
    } catch (e) {
      if (!(e instanceof ChainError)) throw e;
      chain.error = e.message;
    }
  }

  private walk(chain: Chain): void {
    let table = this.desc;
    let tableLen = this.size;
    let idx = chain.head;
    let budget = this.size;
    let indirect = false;
    let total = 0;
    for (;;) {
      if (budget-- === 0) throw new ChainError(`descriptor chain from head ${chain.head} is longer than its table: a loop`);
      const off = idx * DESC_SIZE;
      const lo = table.getUint32(off, true);
      const hi = table.getUint32(off + 4, true);
      const len = table.getUint32(off + 8, true);
      const flags = table.getUint16(off + 12, true);
      const next = table.getUint16(off + 14, true);
      if (hi >= 0x200000) throw new ChainError(`descriptor ${idx} address 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is beyond guest memory`);
      const addr = hi * 0x100000000 + lo;
      if (flags & DESC_F_INDIRECT) {
        if (!this.features.indirect) throw new ChainError('indirect descriptor without INDIRECT_DESC negotiated');
        if (indirect) throw new ChainError('nested indirect descriptor table');
        if (flags & DESC_F_NEXT) throw new ChainError('indirect descriptor with NEXT set');
        if (len === 0 || len % DESC_SIZE) throw new ChainError(`indirect table length ${len} is not a non-zero multiple of 16`);
        if (len / DESC_SIZE > MAX_INDIRECT_DESCS) throw new ChainError(`indirect table of ${len / DESC_SIZE} descriptors is too large`);
        const place = this.mem.small(addr, len);
        if (!place) throw new ChainError(`indirect table at 0x${addr.toString(16)} (+${len}) is outside guest memory`);
        table = new DataView(place.bytes.buffer, place.bytes.byteOffset + place.offset, len);
        tableLen = len / DESC_SIZE;
        budget = tableLen;
        indirect = true;
        idx = 0;
        continue;
      }
      total += len;
      if (total > MAX_CHAIN_BYTES) throw new ChainError(`descriptor chain from head ${chain.head} moves more than 4 GiB`);
      if (addr + len > MAX_ADDRESS) throw new ChainError(`descriptor ${idx} wraps the address space`);
      chain.descriptors++;
      if (flags & DESC_F_WRITE) {
        if (!this.mem.segments(addr, len, chain.writable)) {
          throw new ChainError(`descriptor ${idx} buffer 0x${addr.toString(16)} (+${len}) is outside guest memory`);
        }
        chain.writableBytes += len;
      } else {
        if (chain.writableBytes > 0 || chain.writable.length > 0) {
          throw new ChainError('readable descriptor after a writable one');
        }
        if (!this.mem.segments(addr, len, chain.readable)) {
          throw new ChainError(`descriptor ${idx} buffer 0x${addr.toString(16)} (+${len}) is outside guest memory`);
        }
        chain.readableBytes += len;
      }
      if (!(flags & DESC_F_NEXT)) return;
      if (next >= tableLen) throw new ChainError(`descriptor ${idx} has next ${next}, table has ${tableLen}`);
      idx = next;
    }
  }

  /** Return a chain to the driver. Publishes used->idx with a full barrier. */
  push(head: number, written: number): void {
    this.add(head, written);
    this.publish();
  }

  /** Write a used element without publishing it (several chains of one packet go out together). */
  add(head: number, written: number): void {
    const slot = this.usedIdx % this.size;
    this.usedDv.setUint32(4 + slot * 8, head, true);
    this.usedDv.setUint32(8 + slot * 8, written, true);
    this.usedIdx = u16(this.usedIdx + 1);
  }

  publish(): void {
    // Atomics.store is a locked xchg on x86: the elements above are visible
    // first, and the used_event load in needsNotify() cannot pass this store.
    Atomics.store(this.used, 1, this.usedIdx);
  }

  /** Give back the last `n` popped chains, unused; they are popped again next time. */
  unpop(n: number): void {
    this.lastAvail = u16(this.lastAvail - n);
  }

  /** Whether the driver wants an interrupt for what was pushed since the last call. */
  needsNotify(): boolean {
    if (this.features.eventIdx) {
      const event = Atomics.load(this.avail, 2 + this.size);
      const old = this.signalledUsed;
      const valid = this.signalledValid;
      this.signalledUsed = this.usedIdx;
      this.signalledValid = true;
      return !valid || needEvent(event, this.usedIdx, old);
    }
    if (this.features.notifyOnEmpty && this.availIdx() === this.lastAvail) return true;
    return (Atomics.load(this.avail, 0) & AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Ask the driver to kick when entries beyond lastAvail arrive. Returns true
   * if entries arrived meanwhile and the caller must keep processing.
   */
  enableKicks(): boolean {
    if (this.features.eventIdx) {
      // Full barrier: publish avail_event before re-reading avail->idx.
      Atomics.store(this.used, 2 + 4 * this.size, this.lastAvail);
    }
    return this.availIdx() !== this.lastAvail;
  }
}
