// Guest memory backed by a real memfd, plus a writer for ring structures, so
// ring tests run against the same mapping code the daemon uses.
import { ftruncateSync } from 'node:fs';
import { native, MFD_CLOEXEC } from '../../src/native/index.js';
import { GuestMemory } from '../../src/ring/guest-memory.js';

export interface RegionPlan {
  gpa: number;
  size: number;
  uva: number;
  /** Where the region starts in the memfd. The file is sized to offset + size (sparse). */
  mmapOffset?: number;
}

export function makeMemory(plans: RegionPlan[]): GuestMemory {
  const mem = new GuestMemory();
  for (const p of plans) {
    const fd = native.memfdCreate('vhostd-test', MFD_CLOEXEC);
    ftruncateSync(fd, (p.mmapOffset ?? 0) + p.size);
    mem.add({
      guestPhysAddr: BigInt(p.gpa),
      memorySize: BigInt(p.size),
      userspaceAddr: BigInt(p.uva),
      mmapOffset: BigInt(p.mmapOffset ?? 0),
      fd,
    });
  }
  return mem;
}

/** DataView over guest-physical [gpa, gpa+len), which must be contiguous in one window. */
export function gview(mem: GuestMemory, gpa: number, len: number): DataView {
  const p = mem.small(gpa, len);
  if (!p) throw new Error(`test bug: 0x${gpa.toString(16)} +${len} not in memory`);
  return new DataView(p.bytes.buffer, p.bytes.byteOffset + p.offset, len);
}

export function writeDesc(dv: DataView, i: number, addr: number, len: number, flags: number, next: number): void {
  const o = i * 16;
  dv.setUint32(o, addr % 0x100000000, true);
  dv.setUint32(o + 4, Math.floor(addr / 0x100000000), true);
  dv.setUint32(o + 8, len, true);
  dv.setUint16(o + 12, flags, true);
  dv.setUint16(o + 14, next, true);
}

/** A split ring laid out at a guest address, identity-mapped gpa == uva for simplicity. */
export class RingLayout {
  readonly desc: DataView;
  readonly avail: DataView;
  readonly used: DataView;
  availIdx = 0;

  constructor(
    mem: GuestMemory,
    readonly size: number,
    readonly base: number,
  ) {
    this.desc = gview(mem, base, 16 * size);
    this.avail = gview(mem, base + 16 * size, 6 + 2 * size);
    const usedAt = Math.ceil((base + 16 * size + 6 + 2 * size) / 4) * 4;
    this.used = gview(mem, usedAt, 6 + 8 * size);
  }

  get addrs(): { desc: number; avail: number; used: number } {
    const u = this.used;
    const a = this.avail;
    const d = this.desc;
    // Offsets inside the window equal offsets from `base` because the views were taken from one region.
    return {
      desc: this.base,
      avail: this.base + (a.byteOffset - d.byteOffset),
      used: this.base + (u.byteOffset - d.byteOffset),
    };
  }

  publish(head: number): void {
    this.avail.setUint16(4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.avail.setUint16(2, this.availIdx, true);
  }

  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.avail.setUint16(2, this.availIdx, true);
  }

  usedIdx(): number {
    return this.used.getUint16(2, true);
  }

  usedElem(i: number): { id: number; len: number } {
    const o = 4 + 8 * (i % this.size);
    return { id: this.used.getUint32(o, true), len: this.used.getUint32(o + 4, true) };
  }

  setUsedEvent(v: number): void {
    this.avail.setUint16(4 + 2 * this.size, v, true);
  }

  availEvent(): number {
    return this.used.getUint16(4 + 8 * this.size, true);
  }
}
