// The split virtqueue layout (VIRTIO 1.2 §2.7): the avail ring, descriptor
// chains, the used ring and event-index notification suppression. Everything
// read from guest memory is hostile: every walk is bounded by the queue size,
// every address checked, and every chain limited to MAX_CHAIN_SEGMENTS views.
import type { RingFeatures } from '../features.js';
import { MAX_CHAIN_BYTES, MAX_CHAIN_SEGMENTS, SPLIT_RING_MAX_SIZE } from '../limits.js';
import { native } from '../native/index.js';
import type { DescriptorChain } from './chain.js';
import type { DirtyLog } from './dirty-log.js';
import { GuestMemory, MAX_ADDRESS, type Place } from './guest-memory.js';
import { needEvent, RingError, u16, type Ring } from './ring.js';

export { RingError, needEvent, u16 } from './ring.js';
export type { RingFeatures } from '../features.js';

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
export const AVAIL_F_NO_INTERRUPT = 1;
export const USED_F_NO_NOTIFY = 1;
export const DESC_SIZE = 16;
/** `next` is a u16, so no walk can reach past this many entries of an indirect table. */
const REACHABLE_TABLE_BYTES = 65536 * DESC_SIZE;

/** Typed arrays need aligned offsets in their buffer, and atomics need aligned host addresses. */
function misaligned(p: Place, align: number): boolean {
  const host = Number(native.address(p.bytes) % 64n) + p.offset;
  return (p.bytes.byteOffset + p.offset) % align !== 0 || host % align !== 0;
}

export function ringSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: DESC_SIZE * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

export interface RingAddresses {
  /** Front-end virtual addresses, as SET_VRING_ADDR carries them. */
  desc: number;
  avail: number;
  used: number;
}

const hex = (v: number): string => `0x${v.toString(16)}`;

export class SplitRing implements Ring {
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly features: RingFeatures;
  private readonly desc: DataView;
  private readonly avail: Uint16Array;
  private readonly used: Uint16Array;
  private readonly usedDv: DataView;
  private lastAvail: number;
  usedIdx: number;
  private signalledUsed = 0;
  private signalledValid = false;
  private work = 0;
  private log: DirtyLog | undefined;
  private usedGpa = 0;

  constructor(mem: GuestMemory, size: number, addrs: RingAddresses, features: RingFeatures, lastAvail: number) {
    if (!Number.isInteger(size) || size < 1 || size > SPLIT_RING_MAX_SIZE || (size & (size - 1)) !== 0) {
      throw new RingError(`queue size ${size} is not a power of two in 1..${SPLIT_RING_MAX_SIZE}`);
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
      throw new RingError("ring addresses map to misaligned memory: the region's mmap_offset and userspace_addr are not aligned alike");
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

  get nextAvail(): number {
    return this.lastAvail;
  }

  takeWork(): number {
    const w = this.work;
    this.work = 0;
    return w;
  }

  private availIdx(): number {
    return Atomics.load(this.avail, 1);
  }

  pending(): number {
    const n = u16(this.availIdx() - this.lastAvail);
    if (n > this.size) throw new RingError(`avail idx is ${n} entries ahead of the device, queue size is ${this.size}`);
    return n;
  }

  peek(k: number, chain: DescriptorChain): void {
    const head = this.avail[2 + (u16(this.lastAvail + k) % this.size)]!;
    if (head >= this.size) throw new RingError(`avail ring names descriptor ${head}, queue size is ${this.size}`);
    this.walk(head, chain);
  }

  take(n: number): void {
    this.lastAvail = u16(this.lastAvail + n);
  }

  chainAt(head: number, chain: DescriptorChain): void {
    if (head >= this.size) {
      chain.reset(head);
      chain.fault = `head ${head} is outside the queue`;
      return;
    }
    this.walk(head, chain);
  }

  rewindTo(next: number): void {
    this.lastAvail = u16(next);
  }

  /**
   * Resolve the chain at `head`. A chain longer than the queue (VIRTIO 1.2
   * §2.7.5.3.1) or a table larger than it is a fault, but the walk goes on to
   * the chain's end, so blk can still answer with an error status; problems
   * that leave the rest readable are noted the same way. Every walk is
   * bounded: direct descriptors by the queue size, an indirect table by its
   * own reachable length (next is a u16), so a loop ends the walk without a
   * status byte. Past MAX_CHAIN_SEGMENTS nothing more is kept.
   */
  private walk(head: number, chain: DescriptorChain): void {
    chain.reset(head);
    let table = this.desc;
    let tableLen = this.size;
    let idx = head;
    let budget = this.size;
    let indirect = false;
    let total = 0;
    let ordinal = 0;
    let writing = false;
    // The last writable descriptor with bytes: [addr, len], and whether it lies in memory.
    let statusAddr = -1;
    for (;;) {
      if (budget-- === 0) {
        chain.fault ??= `descriptor chain from head ${head} does not end within its table: a loop`;
        statusAddr = -1;
        break;
      }
      this.work++;
      chain.descriptors++;
      const off = idx * DESC_SIZE;
      const lo = table.getUint32(off, true);
      const hi = table.getUint32(off + 4, true);
      const len = table.getUint32(off + 8, true);
      const flags = table.getUint16(off + 12, true);
      const next = table.getUint16(off + 14, true);
      const addr = hi * 0x100000000 + lo;
      if (flags & DESC_F_INDIRECT) {
        // The end of the chain lies inside the table: without it there is no status byte.
        const bad =
          !this.features.indirect ? 'indirect descriptor without INDIRECT_DESC negotiated'
          : indirect ? 'indirect descriptor inside an indirect table'
          : flags & DESC_F_NEXT ? 'indirect descriptor with NEXT set'
          : len === 0 || len % DESC_SIZE ? `indirect table length ${len} is not a non-zero multiple of 16`
          : undefined;
        if (bad) {
          chain.fault ??= bad;
          statusAddr = -1;
          break;
        }
        if (len / DESC_SIZE > this.size) chain.fault ??= `indirect table of ${len / DESC_SIZE} descriptors is larger than the queue (${this.size})`;
        const place = hi >= 0x200000 ? undefined : this.mem.small(addr, Math.min(len, REACHABLE_TABLE_BYTES));
        if (!place) {
          chain.fault ??= `indirect table at ${hex(addr)} (+${len}) is outside guest memory`;
          statusAddr = -1;
          break;
        }
        table = new DataView(place.bytes.buffer, place.bytes.byteOffset + place.offset, Math.min(len, REACHABLE_TABLE_BYTES));
        tableLen = Math.min(len / DESC_SIZE, REACHABLE_TABLE_BYTES / DESC_SIZE);
        budget = tableLen;
        indirect = true;
        idx = 0;
        continue;
      }
      const writable = (flags & DESC_F_WRITE) !== 0;
      if (writable) writing = true;
      else if (writing) chain.fault ??= 'readable descriptor after a writable one';
      total += len;
      if (total > MAX_CHAIN_BYTES) chain.fault ??= `descriptor chain from head ${head} moves more than 4 GiB`;
      if (len > 0) {
        const inMemory = hi < 0x200000 && addr + len <= MAX_ADDRESS && this.resolve(chain, addr, len, ordinal, writable);
        if (!inMemory) chain.fault ??= `descriptor ${idx} buffer ${hex(addr)} (+${len}) is outside guest memory`;
        // The status byte is the chain's last byte, and only a writable one can hold it.
        statusAddr = writable && inMemory ? addr + len - 1 : -1;
        if (writable) chain.writableBytes += len;
        else chain.readableBytes += len;
      }
      if (++ordinal === this.size + 1) chain.fault ??= `descriptor chain from head ${head} is longer than the queue (${this.size})`;
      if (!(flags & DESC_F_NEXT)) break;
      if (next >= tableLen) {
        chain.fault ??= `descriptor ${idx} has next ${next}, table has ${tableLen}`;
        statusAddr = -1;
        break;
      }
      idx = next;
    }
    if (statusAddr >= 0) {
      const v = this.mem.slice(statusAddr, 1);
      if (v) {
        chain.statusBytes = v;
        chain.statusIndex = 0;
        chain.statusGpa = statusAddr;
      }
    }
  }

  /** Views of one descriptor's buffer into the chain; false if any byte is outside guest memory. */
  private resolve(chain: DescriptorChain, addr: number, len: number, ordinal: number, writable: boolean): boolean {
    // Past the segment limit only check the bytes, keeping nothing.
    if (chain.full) {
      chain.fault ??= `descriptor chain from head ${chain.head} needs more than ${MAX_CHAIN_SEGMENTS} segments`;
      return this.mem.covers(addr, len);
    }
    const mark = chain.count;
    for (let a = addr, left = len; left > 0; ) {
      const v = this.mem.slice(a, left);
      if (!v) {
        chain.truncate(mark);
        return false;
      }
      if (chain.full) {
        chain.fault ??= `descriptor chain from head ${chain.head} needs more than ${MAX_CHAIN_SEGMENTS} segments`;
      } else {
        chain.push(v, ordinal, writable, a);
      }
      a += v.length;
      left -= v.length;
    }
    return true;
  }

  setLog(log: DirtyLog | undefined, usedGpa: number): void {
    this.log = log;
    this.usedGpa = usedGpa;
  }

  add(head: number, written: number): void {
    const slot = this.usedIdx % this.size;
    this.usedDv.setUint32(4 + slot * 8, head, true);
    this.usedDv.setUint32(8 + slot * 8, written, true);
    this.usedIdx = u16(this.usedIdx + 1);
    this.log?.mark(this.usedGpa + 4 + slot * 8, 8);
  }

  publish(): void {
    // Atomics.store is a locked xchg on x86: the elements above are visible
    // first, and the used_event load in needsNotify() cannot pass this store.
    Atomics.store(this.used, 1, this.usedIdx);
    this.log?.mark(this.usedGpa + 2, 2);
  }

  needsNotify(): boolean {
    // NOTIFY_ON_EMPTY overrides both suppression mechanisms (VIRTIO 1.2 §6.3).
    const empty = this.features.notifyOnEmpty && this.availIdx() === this.lastAvail;
    if (this.features.eventIdx) {
      const event = Atomics.load(this.avail, 2 + this.size);
      const old = this.signalledUsed;
      const valid = this.signalledValid;
      this.signalledUsed = this.usedIdx;
      this.signalledValid = true;
      return empty || !valid || needEvent(event, this.usedIdx, old);
    }
    return empty || (Atomics.load(this.avail, 0) & AVAIL_F_NO_INTERRUPT) === 0;
  }

  enableNotifications(seen: number): boolean {
    if (this.features.eventIdx) {
      // Full barrier: avail_event is visible before avail->idx is read again.
      Atomics.store(this.used, 2 + 4 * this.size, u16(this.lastAvail + seen));
      this.log?.mark(this.usedGpa + 4 + 8 * this.size, 2);
    } else {
      Atomics.store(this.used, 0, Atomics.load(this.used, 0) & ~USED_F_NO_NOTIFY);
      this.log?.mark(this.usedGpa, 2);
    }
    return u16(this.availIdx() - this.lastAvail) > seen;
  }

  disableNotifications(): void {
    // With event index a stale avail_event already suppresses kicks.
    if (this.features.eventIdx) return;
    Atomics.store(this.used, 0, Atomics.load(this.used, 0) | USED_F_NO_NOTIFY);
    this.log?.mark(this.usedGpa, 2);
  }
}
