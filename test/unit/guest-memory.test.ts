import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { GuestMemory, MemoryError, WINDOW_SIZE } from '../../src/ring/guest-memory.js';
import { native, MFD_CLOEXEC } from '../../src/native/index.js';
import { gview, makeMemory } from './fixtures.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
let mem: GuestMemory | undefined;
afterEach(() => mem?.clear());

function memfdMappings(): number {
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes('memfd:vhostd-test')).length;
}

describe('guest memory', () => {
  it('translates guest-physical and user addresses', () => {
    mem = makeMemory([
      { gpa: 0, size: 640 * 1024, uva: 0x7f00_0000_0000 },
      { gpa: 0x10_0000, size: 16 * MiB, uva: 0x7f00_1000_0000 },
    ]);
    gview(mem, 0x10_0000 + 100, 4).setUint32(0, 0xcafe, true);
    const viaUva = mem.smallByUva(0x7f00_1000_0000 + 100, 4)!;
    expect(new DataView(viaUva.bytes.buffer, viaUva.bytes.byteOffset + viaUva.offset, 4).getUint32(0, true)).toBe(0xcafe);
    expect(mem.uvaToGpa(0x7f00_1000_0010)).toBe(0x10_0010);
    expect(mem.uvaToGpa(0x1234)).toBeUndefined();
    expect(mem.small(640 * 1024, 1)).toBeUndefined(); // the hole between regions
    expect(mem.small(640 * 1024 - 2, 4)).toBeUndefined(); // straddles the end of a region
  });

  it('a mirror (what a queue thread builds) sees the same bytes and unmaps nothing', () => {
    mem = makeMemory([
      { gpa: 0, size: 2 * MiB, uva: 0x7f00_0000_0000, mmapOffset: 4096 },
      { gpa: 0x1_0000_0000, size: 5 * GiB, uva: 0x7e00_0000_0000, mmapOffset: 3 * GiB },
    ]);
    const mirror = new GuestMemory();
    mirror.mirror(mem.shared());
    expect(mirror.version).not.toBe(0);
    const top = 0x1_0000_0000 + 5 * GiB - 8;
    gview(mirror, top, 8).setBigUint64(0, 0x0102030405060708n, true);
    expect(gview(mem, top, 8).getBigUint64(0, true)).toBe(0x0102030405060708n);
    gview(mem, 100, 4).setUint32(0, 0xfeed, true);
    const p = mirror.smallByUva(0x7f00_0000_0000 + 100, 4)!;
    expect(new DataView(p.bytes.buffer, p.bytes.byteOffset + p.offset, 4).getUint32(0, true)).toBe(0xfeed);
    const before = memfdMappings();
    const views = mirror.list().flatMap((r) => r.windows);
    mirror.clear();
    // Its views are detached (reading them finds nothing), the owner's mapping is still there.
    expect(views.every((v) => v.byteLength === 0)).toBe(true);
    expect(memfdMappings()).toBe(before);
    expect(gview(mem, top, 8).getBigUint64(0, true)).toBe(0x0102030405060708n);
  });

  it('maps a region that starts 3 GiB into its fd and is larger than 4 GiB', () => {
    // Like a 5G+ guest: the high region lives at a 3 GiB offset of the shared memfd.
    mem = makeMemory([{ gpa: 0x1_0000_0000, size: 5 * GiB, uva: 0x7e00_0000_0000, mmapOffset: 3 * GiB }]);
    const top = 0x1_0000_0000 + 5 * GiB - 8;
    gview(mem, top, 8).setBigUint64(0, 0x1122334455667788n, true);
    expect(gview(mem, top, 8).getBigUint64(0, true)).toBe(0x1122334455667788n);
    expect(mem.list()[0]!.windows.length).toBe(5);
  });

  it('splits a buffer that crosses a window boundary and keeps its bytes in order', () => {
    mem = makeMemory([{ gpa: 0, size: 2 * GiB + 4096, uva: 0x7d00_0000_0000, mmapOffset: 2 * GiB }]);
    const start = WINDOW_SIZE - 1000;
    const segs: Uint8Array[] = [];
    expect(mem.segments(start, 3000, segs)).toBe(true);
    expect(segs.map((s) => s.length)).toEqual([1000, 2000]);
    segs[0]!.fill(0xaa);
    segs[1]!.fill(0xbb);
    // Read back through the overlapping view of the first window: same memory.
    const whole = mem.small(start, 3000)!;
    expect(whole.bytes[whole.offset + 999]).toBe(0xaa);
    expect(whole.bytes[whole.offset + 1000]).toBe(0xbb);
  });

  it('refuses buffers outside memory without appending anything', () => {
    mem = makeMemory([{ gpa: 0x1000, size: 4096, uva: 0x10000 }]);
    const segs: Uint8Array[] = [];
    expect(mem.segments(0x1000 + 4000, 200, segs)).toBe(false);
    expect(mem.segments(0, 1, segs)).toBe(false);
    expect(mem.segments(2 ** 53 - 10, 100, segs)).toBe(false);
    expect(segs).toEqual([]);
  });

  it('rejects overlapping regions and closes the fd it was given', () => {
    mem = makeMemory([{ gpa: 0, size: MiB, uva: 0x100000 }]);
    const fd = native.memfdCreate('vhostd-test', MFD_CLOEXEC);
    expect(() =>
      mem!.add({ guestPhysAddr: BigInt(MiB / 2), memorySize: BigInt(MiB), userspaceAddr: 0x900000n, mmapOffset: 0n, fd }),
    ).toThrow(MemoryError);
    expect(native.close(fd)).toBeLessThan(0); // already closed by add()
  });

  it('rejects regions beyond 2^53 and zero-sized ones', () => {
    mem = new GuestMemory();
    const fd1 = native.memfdCreate('vhostd-test', MFD_CLOEXEC);
    expect(() => mem!.add({ guestPhysAddr: 1n << 60n, memorySize: 4096n, userspaceAddr: 0n, mmapOffset: 0n, fd: fd1 })).toThrow(/beyond 2\^53/);
    const fd2 = native.memfdCreate('vhostd-test', MFD_CLOEXEC);
    expect(() => mem!.add({ guestPhysAddr: 0n, memorySize: 0n, userspaceAddr: 0n, mmapOffset: 0n, fd: fd2 })).toThrow(/size 0/);
  });

  it('unmaps everything and detaches views on clear()', () => {
    const before = memfdMappings();
    mem = makeMemory([
      { gpa: 0, size: 4 * MiB, uva: 0x100000000 },
      { gpa: 0x1_0000_0000, size: 4 * MiB, uva: 0x200000000 },
    ]);
    const view = mem.small(0, 16)!.bytes;
    expect(memfdMappings()).toBe(before + 2);
    mem.clear();
    expect(memfdMappings()).toBe(before);
    expect(view.length).toBe(0); // detached: touching it cannot fault
    expect(mem.regionCount).toBe(0);
  });

  it('removes one region by address (REM_MEM_REG)', () => {
    mem = makeMemory([
      { gpa: 0, size: MiB, uva: 0x100000 },
      { gpa: 0x200000, size: MiB, uva: 0x300000 },
    ]);
    expect(mem.remove({ guestPhysAddr: 0x200000n, memorySize: BigInt(MiB), userspaceAddr: 0x300000n })).toBe(true);
    expect(mem.remove({ guestPhysAddr: 0x200000n, memorySize: BigInt(MiB), userspaceAddr: 0x300000n })).toBe(false);
    expect(mem.small(0x200000, 1)).toBeUndefined();
    expect(mem.small(0, 1)).toBeDefined();
  });
});

describe('guest memory shared by several vhost devices', () => {
  it('counts identical ADD_MEM_REG regions and unmaps on the last REM_MEM_REG', () => {
    mem = makeMemory([{ gpa: 0, size: MiB, uva: 0x100000 }]);
    const fd = native.memfdCreate('vhostd-test', MFD_CLOEXEC);
    const again = mem.add({ guestPhysAddr: 0n, memorySize: BigInt(MiB), userspaceAddr: 0x100000n, mmapOffset: 0n, fd });
    expect(again.refs).toBe(2);
    expect(mem.regionCount).toBe(1);
    expect(native.close(fd)).toBeLessThan(0); // the duplicate's fd was closed at once
    const spec = { guestPhysAddr: 0n, memorySize: BigInt(MiB), userspaceAddr: 0x100000n };
    expect(mem.remove(spec)).toBe(true);
    expect(mem.small(0, 1)).toBeDefined();
    expect(mem.remove(spec)).toBe(true);
    expect(mem.small(0, 1)).toBeUndefined();
  });
});
