// Fake guest RAM: memfd-backed regions mapped into this process. The mapping
// address is the "userspace address" the front-end reports, as QEMU does, so
// back-ends that translate ring addresses by uva (qemu-storage-daemon) work.
import { ftruncateSync } from 'node:fs';
import { native, MFD_CLOEXEC, PROT_READ, PROT_WRITE } from '../../src/native/index.js';
import type { RegionWithFd } from './frontend.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export interface RegionSpec {
  gpa: number;
  size: number;
  /** Where the region's bytes start in its fd (QEMU: 2-3 GiB for RAM above 4 GiB). */
  mmapOffset?: number;
}

/** Bytes left unallocated at both ends of each region, for explicitly placed buffers. */
export const GUARD = 64 * KiB;

export class GuestRegion {
  /** Unmapped after REM_MEM_REG; kept in the list so region indices stay stable. */
  removed = false;
  readonly fd: number;
  readonly uva: bigint;
  readonly bytes: Uint8Array;
  /** Free ranges [start, end) in guest-physical addresses, sorted. */
  private free: [number, number][];
  private readonly used = new Map<number, number>();

  constructor(
    readonly index: number,
    readonly gpa: number,
    readonly size: number,
    readonly mmapOffset: number,
  ) {
    this.fd = native.memfdCreate(`vhostd-test-guest-${index}`, MFD_CLOEXEC);
    ftruncateSync(this.fd, mmapOffset + size); // sparse: a large offset costs nothing
    this.uva = native.mmap(this.fd, size, mmapOffset, PROT_READ | PROT_WRITE);
    this.bytes = new Uint8Array(native.view(this.uva, size));
    this.free = [[gpa + GUARD, gpa + size - GUARD]];
  }

  get end(): number {
    return this.gpa + this.size;
  }

  contains(gpa: number, len = 1): boolean {
    return !this.removed && gpa >= this.gpa && gpa + len <= this.end;
  }

  /** First-fit allocation; returns a gpa or undefined. */
  alloc(size: number, align: number): number | undefined {
    if (this.removed) return undefined;
    for (let i = 0; i < this.free.length; i++) {
      const [s, e] = this.free[i]!;
      const a = Math.ceil(s / align) * align;
      if (a + size > e) continue;
      const pieces: [number, number][] = [];
      if (a > s) pieces.push([s, a]);
      if (a + size < e) pieces.push([a + size, e]);
      this.free.splice(i, 1, ...pieces);
      this.used.set(a, size);
      return a;
    }
    return undefined;
  }

  release(gpa: number): boolean {
    const size = this.used.get(gpa);
    if (size === undefined) return false;
    this.used.delete(gpa);
    this.free.push([gpa, gpa + size]);
    this.free.sort((x, y) => x[0] - y[0]);
    const merged: [number, number][] = [];
    for (const r of this.free) {
      const last = merged[merged.length - 1];
      if (last && last[1] === r[0]) last[1] = r[1];
      else merged.push([r[0], r[1]]);
    }
    this.free = merged;
    return true;
  }

  message(): RegionWithFd {
    return {
      guestPhysAddr: BigInt(this.gpa),
      memorySize: BigInt(this.size),
      userspaceAddr: this.uva,
      mmapOffset: BigInt(this.mmapOffset),
      fd: this.fd,
    };
  }

  destroy(): void {
    if (this.removed) return;
    this.removed = true;
    native.detach(this.bytes.buffer as ArrayBuffer);
    native.munmap(this.uva, this.size);
    native.close(this.fd);
  }
}

/**
 * Default layout:
 *  - region 0: gpa 0, 8 MiB, offset 0;
 *  - region 1: gpa 8 MiB (adjacent, so buffers can span 0/1), 8 MiB, fd offset 2 MiB;
 *  - region 2: gpa 4 GiB (descriptor addresses need the high word), 4 MiB, fd offset 3 GiB.
 */
export const DEFAULT_LAYOUT: RegionSpec[] = [
  { gpa: 0, size: 8 * MiB, mmapOffset: 0 },
  { gpa: 8 * MiB, size: 8 * MiB, mmapOffset: 2 * MiB },
  { gpa: 4 * GiB, size: 4 * MiB, mmapOffset: 3 * GiB },
];

export class GuestMemory {
  readonly regions: GuestRegion[] = [];
  private destroyed = false;

  constructor(layout: RegionSpec[] = DEFAULT_LAYOUT) {
    try {
      for (const spec of layout) this.addRegion(spec);
    } catch (e) {
      this.destroy();
      throw e;
    }
  }

  /** Map another region (for ADD_MEM_REG tests). */
  addRegion(spec: RegionSpec): GuestRegion {
    const r = new GuestRegion(this.regions.length, spec.gpa, spec.size, spec.mmapOffset ?? 0);
    this.regions.push(r);
    return r;
  }

  /** Unmap a region once the back-end has let go of it (after REM_MEM_REG). */
  removeRegion(r: GuestRegion): void {
    r.destroy();
  }

  /** The regions a SET_MEM_TABLE carries (all live ones, or the ones named). */
  table(indices?: number[]): RegionWithFd[] {
    const rs = indices ? indices.map((i) => this.regions[i]!) : this.regions.filter((r) => !r.removed);
    return rs.map((r) => r.message());
  }

  private regionOf(gpa: number, len = 1): GuestRegion {
    const r = this.regions.find((x) => x.contains(gpa, len));
    if (!r) throw new Error(`gpa 0x${gpa.toString(16)} (+${len}) is not inside one guest region`);
    return r;
  }

  /** A live view of [gpa, gpa+len), which must lie in one region. */
  view(gpa: number, len: number): Uint8Array {
    const r = this.regionOf(gpa, len);
    return r.bytes.subarray(gpa - r.gpa, gpa - r.gpa + len);
  }

  /** Front-end virtual address of a gpa (what SET_VRING_ADDR carries). */
  uva(gpa: number): bigint {
    const r = this.regionOf(gpa);
    return r.uva + BigInt(gpa - r.gpa);
  }

  /** Copy in, possibly across adjacent regions. */
  write(gpa: number, data: Uint8Array): void {
    let off = 0;
    while (off < data.length) {
      const r = this.regionOf(gpa + off);
      const n = Math.min(data.length - off, r.end - (gpa + off));
      r.bytes.set(data.subarray(off, off + n), gpa + off - r.gpa);
      off += n;
    }
  }

  /** Copy out, possibly across adjacent regions. */
  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let off = 0;
    while (off < len) {
      const r = this.regionOf(gpa + off);
      const n = Math.min(len - off, r.end - (gpa + off));
      out.set(r.bytes.subarray(gpa + off - r.gpa, gpa + off - r.gpa + n), off);
      off += n;
    }
    return out;
  }

  fill(gpa: number, len: number, value: number): void {
    this.write(gpa, new Uint8Array(len).fill(value));
  }

  /** Allocate in a given region, or the first that fits. */
  alloc(size: number, align = 16, region?: number): number {
    const order = region === undefined ? this.regions : [this.regions[region]!];
    for (const r of order) {
      const gpa = r.alloc(size, align);
      if (gpa !== undefined) return gpa;
    }
    throw new Error(`guest memory exhausted allocating ${size} bytes`);
  }

  free(gpa: number): void {
    for (const r of this.regions) if (r.release(gpa)) return;
    throw new Error(`free of unallocated gpa 0x${gpa.toString(16)}`);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const r of this.regions) r.destroy();
  }
}
