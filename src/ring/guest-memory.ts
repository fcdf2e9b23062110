// Guest memory shared by the front-end as one fd per region.
//
// Each region is mapped once, contiguously. JS reaches it through windows:
// ArrayBuffers of at most WINDOW_SIZE + WINDOW_OVERLAP bytes, because a typed
// array on Node 20 cannot span 4 GiB. Windows overlap so that any object of at
// most WINDOW_OVERLAP bytes (rings, descriptor tables, headers) is contiguous
// in one window; bulk buffers that cross a boundary are split into segments.
import { fstatSync } from 'node:fs';
import { native, PROT_READ, PROT_WRITE } from '../native/index.js';

export const WINDOW_SIZE = 2 ** 30;
export const WINDOW_OVERLAP = 2 ** 21;
/** Addresses above this cannot be represented exactly as JS numbers. */
export const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

export class MemoryError extends Error {}

export interface RegionSpec {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
  fd: number;
}

/**
 * A mapped region as another thread of this process sees it: the address of
 * its first byte in our mapping. Plain data, so it can be posted to a worker.
 */
export interface SharedRegion {
  gpa: number;
  size: number;
  uva: number;
  mmapOffset: number;
  address: bigint;
}

export interface Region {
  readonly gpa: number;
  readonly size: number;
  readonly uva: number;
  readonly mmapOffset: number;
  /** The region's fd, or -1 for a mirror of another thread's mapping (nothing to unmap or close). */
  readonly fd: number;
  /** Distance from the start of the mapping to the region's first byte. */
  readonly skew: number;
  readonly mapAddress: bigint;
  readonly mapLength: number;
  readonly windows: Uint8Array[];
  /** ADD_MEM_REG calls for this very region (QEMU sends one per vhost device on the connection). */
  refs: number;
}

function toSafe(what: string, v: bigint): number {
  if (v > BigInt(MAX_ADDRESS)) throw new MemoryError(`${what} 0x${v.toString(16)} is beyond 2^53`);
  return Number(v);
}

/** A place in guest memory: `bytes` is a window, `offset` the first byte. */
export interface Place {
  bytes: Uint8Array;
  offset: number;
  /** Contiguous bytes available in `bytes` from `offset`. */
  avail: number;
}

let generations = 0;
const nextGeneration = (): number => ++generations;

/** Where each window's bytes start in this process, for I/O the kernel does straight into guest memory. */
const windowAddress = new WeakMap<ArrayBufferLike, number>();

/** The address of a view's first byte, if it is a view of guest memory (no native call, no BigInt). */
export function hostAddress(view: Uint8Array): number | undefined {
  const base = windowAddress.get(view.buffer);
  return base === undefined ? undefined : base + view.byteOffset;
}

/** Overlapping windows over `size` mapped bytes at `address` (see the top of this file). */
function windowsOver(address: bigint, size: number): Uint8Array[] {
  const windows: Uint8Array[] = [];
  for (let start = 0; start < size; start += WINDOW_SIZE) {
    const len = Math.min(WINDOW_SIZE + WINDOW_OVERLAP, size - start);
    const at = address + BigInt(start);
    const buffer = native.view(at, len);
    windowAddress.set(buffer, Number(at));
    windows.push(new Uint8Array(buffer));
  }
  return windows;
}

export class GuestMemory {
  private regions: Region[] = [];
  private generation = nextGeneration();

  get regionCount(): number {
    return this.regions.length;
  }

  /**
   * Changes whenever the table changes, so cached translations can be
   * invalidated; unique across instances, so a queue thread can tell tables apart.
   */
  get version(): number {
    return this.generation;
  }

  list(): readonly Region[] {
    return this.regions;
  }

  /**
   * Map a region and take ownership of its fd (closed when the region goes, or
   * on failure). Adding a region identical to a mapped one only counts a reference.
   */
  add(spec: RegionSpec): Region {
    try {
      const size = toSafe('region size', spec.memorySize);
      const gpa = toSafe('guest address', spec.guestPhysAddr);
      const uva = toSafe('user address', spec.userspaceAddr);
      const mmapOffset = toSafe('mmap offset', spec.mmapOffset);
      if (size === 0) throw new MemoryError('region has size 0');
      const same = this.regions.find((r) => r.gpa === gpa && r.size === size && r.uva === uva && r.mmapOffset === mmapOffset);
      if (same) {
        same.refs++;
        native.close(spec.fd);
        return same;
      }
      if (gpa + size > MAX_ADDRESS || uva + size > MAX_ADDRESS) throw new MemoryError('region wraps the address space');
      for (const r of this.regions) {
        if (gpa < r.gpa + r.size && r.gpa < gpa + size) {
          throw new MemoryError(`region at guest 0x${gpa.toString(16)} overlaps the region at 0x${r.gpa.toString(16)}`);
        }
        if (uva < r.uva + r.size && r.uva < uva + size) {
          throw new MemoryError(`region at user address 0x${uva.toString(16)} overlaps another region`);
        }
      }
      // hugetlbfs needs huge-page alignment; st_blksize reports it (4 KiB for memfd/tmpfs).
      let st;
      try {
        st = fstatSync(spec.fd);
      } catch {
        throw new MemoryError(`region fd ${spec.fd} is not a valid file descriptor`);
      }
      if (!st.isFile()) throw new MemoryError('region fd is not a memory file (memfd, hugetlbfs or tmpfs file)');
      // Touching a mapping beyond the end of its file raises SIGBUS: refuse such regions up front.
      if (st.size < mmapOffset + size) {
        throw new MemoryError(`region needs ${mmapOffset + size} bytes of its fd, which holds ${st.size}`);
      }
      const align = Math.max(native.pageSize(), st.blksize);
      const mapOffset = Math.floor(mmapOffset / align) * align;
      const skew = mmapOffset - mapOffset;
      const mapLength = Math.ceil((size + skew) / align) * align;
      let mapAddress: bigint;
      try {
        mapAddress = native.mmap(spec.fd, mapLength, mapOffset, PROT_READ | PROT_WRITE);
      } catch (e) {
        throw new MemoryError(`cannot map region (size ${size}, offset ${mmapOffset}): ${(e as Error).message}`);
      }
      const windows = windowsOver(mapAddress + BigInt(skew), size);
      const region: Region = { gpa, size, uva, mmapOffset, fd: spec.fd, skew, mapAddress, mapLength, windows, refs: 1 };
      this.insert(region);
      this.generation = nextGeneration();
      return region;
    } catch (e) {
      native.close(spec.fd);
      throw e;
    }
  }

  /** The regions for another thread to mirror(); valid until this table changes. */
  shared(): SharedRegion[] {
    return this.regions.map((r) => ({ gpa: r.gpa, size: r.size, uva: r.uva, mmapOffset: r.mmapOffset, address: r.mapAddress + BigInt(r.skew) }));
  }

  /**
   * Replace the table with views of another thread's mappings (a queue thread
   * reads the guest through the daemon's one mapping). The owner must not
   * unmap them before this side clear()s.
   */
  mirror(regions: readonly SharedRegion[]): void {
    this.clear();
    for (const r of regions) {
      const windows = windowsOver(r.address, r.size);
      this.insert({ gpa: r.gpa, size: r.size, uva: r.uva, mmapOffset: r.mmapOffset, fd: -1, skew: 0, mapAddress: r.address, mapLength: 0, windows, refs: 1 });
    }
    this.generation = nextGeneration();
  }

  /** Drop a reference to the region matching gpa/size/uva (REM_MEM_REG); returns whether one was found. */
  remove(spec: { guestPhysAddr: bigint; memorySize: bigint; userspaceAddr: bigint }): boolean {
    const i = this.regions.findIndex(
      (r) =>
        BigInt(r.gpa) === spec.guestPhysAddr &&
        BigInt(r.size) === spec.memorySize &&
        BigInt(r.uva) === spec.userspaceAddr,
    );
    if (i < 0) return false;
    if (--this.regions[i]!.refs > 0) return true;
    const [r] = this.regions.splice(i, 1);
    this.release(r!);
    this.generation = nextGeneration();
    return true;
  }

  /** Unmap everything and close every fd. Callers must have stopped all I/O into this memory. */
  clear(): void {
    for (const r of this.regions) this.release(r);
    if (this.regions.length) this.generation = nextGeneration();
    this.regions = [];
  }

  private release(r: Region): void {
    if (this.last === r) this.last = undefined;
    for (const w of r.windows) native.detach(w.buffer as ArrayBuffer);
    r.windows.length = 0;
    if (r.fd < 0) return; // a mirror: the owning thread unmaps
    native.munmap(r.mapAddress, r.mapLength);
    native.close(r.fd);
  }

  private last: Region | undefined;

  /** Keep regions sorted by guest address: lookups are a binary search over up to MAX_MEM_SLOTS regions. */
  private insert(r: Region): void {
    let i = this.regions.length;
    while (i > 0 && this.regions[i - 1]!.gpa > r.gpa) i--;
    this.regions.splice(i, 0, r);
  }

  private findGpa(gpa: number): Region | undefined {
    const l = this.last;
    if (l && gpa >= l.gpa && gpa < l.gpa + l.size) return l;
    const rs = this.regions;
    let lo = 0;
    let hi = rs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = rs[mid]!;
      if (gpa < r.gpa) hi = mid - 1;
      else if (gpa >= r.gpa + r.size) lo = mid + 1;
      else return (this.last = r);
    }
    return undefined;
  }

  private findUva(uva: number): Region | undefined {
    for (const r of this.regions) {
      if (uva >= r.uva && uva < r.uva + r.size) return r;
    }
    return undefined;
  }

  private place(r: Region, off: number): Place {
    const k = Math.floor(off / WINDOW_SIZE);
    const bytes = r.windows[k]!;
    const offset = off - k * WINDOW_SIZE;
    return { bytes, offset, avail: bytes.length - offset };
  }

  /**
   * Contiguous view of [gpa, gpa+len) for small objects (len <= WINDOW_OVERLAP).
   * Returns undefined when the range is not entirely inside one region.
   */
  small(gpa: number, len: number): Place | undefined {
    if (len > WINDOW_OVERLAP) return undefined;
    const r = this.findGpa(gpa);
    if (!r || gpa + len > r.gpa + r.size) return undefined;
    return this.place(r, gpa - r.gpa);
  }

  /** Same as small(), addressed by front-end virtual address (ring addresses). */
  smallByUva(uva: number, len: number): Place | undefined {
    if (len > WINDOW_OVERLAP) return undefined;
    const r = this.findUva(uva);
    if (!r || uva + len > r.uva + r.size) return undefined;
    return this.place(r, uva - r.uva);
  }

  /** Translate a front-end virtual address to a guest physical one. */
  uvaToGpa(uva: number): number | undefined {
    const r = this.findUva(uva);
    return r ? uva - r.uva + r.gpa : undefined;
  }

  /**
   * A view of the first contiguous piece of [gpa, gpa+len): up to len bytes,
   * ending early at a window or region boundary. Undefined when gpa is outside
   * guest memory. The caller walks on from gpa + view.length.
   */
  slice(gpa: number, len: number): Uint8Array | undefined {
    const r = this.findGpa(gpa);
    if (!r) return undefined;
    const off = gpa - r.gpa;
    const k = Math.floor(off / WINDOW_SIZE);
    const inWin = off - k * WINDOW_SIZE;
    // Only up to the window's own end (not into the overlap) or the region end.
    const n = Math.min(len, WINDOW_SIZE - inWin, r.size - off);
    return r.windows[k]!.subarray(inWin, inWin + n);
  }

  /** Whether every byte of [gpa, gpa+len) is guest memory (no views made). */
  covers(gpa: number, len: number): boolean {
    for (let addr = gpa, end = gpa + len; addr < end; ) {
      const r = this.findGpa(addr);
      if (!r) return false;
      addr = r.gpa + r.size;
    }
    return true;
  }

  /**
   * Append views of [gpa, gpa+len) to `out`, one per contiguous piece. Pieces
   * split at window and region boundaries. Returns false, appending nothing,
   * when any byte lies outside guest memory.
   */
  segments(gpa: number, len: number, out: Uint8Array[]): boolean {
    if (len === 0) return true;
    if (gpa + len > MAX_ADDRESS) return false;
    const mark = out.length;
    for (let addr = gpa, left = len; left > 0; ) {
      const v = this.slice(addr, left);
      if (!v) {
        out.length = mark;
        return false;
      }
      out.push(v);
      addr += v.length;
      left -= v.length;
    }
    return true;
  }
}
