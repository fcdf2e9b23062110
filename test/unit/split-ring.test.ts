import { afterEach, describe, expect, it } from 'vitest';
import type { GuestMemory } from '../../src/ring/guest-memory.js';
import { ChainReader, ChainWriter, DescriptorChain } from '../../src/ring/chain.js';
import {
  DESC_F_INDIRECT,
  DESC_F_NEXT,
  DESC_F_WRITE,
  needEvent,
  RingError,
  SplitRing,
  type RingFeatures,
} from '../../src/ring/split-ring.js';
import { MAX_CHAIN_SEGMENTS } from '../../src/limits.js';
import { gview, makeMemory, RingLayout, writeDesc } from './fixtures.js';

const ALL: RingFeatures = { eventIdx: true, indirect: true, notifyOnEmpty: false };
const RING_AT = 0x10000;
const DATA_AT = 0x100000;
let mem: GuestMemory | undefined;
afterEach(() => mem?.clear());

function setup(size = 8, features = ALL, lastAvail = 0): { ring: SplitRing; lay: RingLayout } {
  mem = makeMemory([{ gpa: 0, size: 4 << 20, uva: 0 }]);
  const lay = new RingLayout(mem, size, RING_AT);
  lay.setAvailIdx(lastAvail);
  return { ring: new SplitRing(mem, size, lay.addrs, features, lastAvail), lay };
}

/** Take the next chain (as the executor does: peek, then take). */
function pop(ring: SplitRing, c: DescriptorChain): boolean {
  if (ring.pending() === 0) return false;
  ring.peek(0, c);
  ring.take(1);
  return true;
}

function push(ring: SplitRing, head: number, len: number): void {
  ring.add(head, len);
  ring.publish();
}

/** The fault a chain carries (or the RingError a broken ring throws). */
function popError(ring: SplitRing): Error {
  const c = new DescriptorChain();
  try {
    ring.pending();
    ring.peek(0, c);
  } catch (e) {
    return e as Error;
  }
  if (c.fault) return new Error(c.fault);
  throw new Error('chain is well formed');
}

const writableLengths = (c: DescriptorChain): number[] => c.segs.slice(c.readableSegs, c.count).map((v) => v.length);

describe('event index arithmetic', () => {
  it('notifies exactly when used_event lies in [old, new)', () => {
    expect(needEvent(4, 5, 4)).toBe(true);
    expect(needEvent(5, 5, 4)).toBe(false); // event is the index after new
    expect(needEvent(3, 5, 4)).toBe(false); // already passed before old
    expect(needEvent(0, 10, 0)).toBe(true);
    expect(needEvent(9, 10, 0)).toBe(true);
    expect(needEvent(10, 10, 0)).toBe(false);
  });

  it('handles u16 wraparound', () => {
    expect(needEvent(0xffff, 2, 0xfffe)).toBe(true);
    expect(needEvent(0, 2, 0xfffe)).toBe(true);
    expect(needEvent(1, 2, 0xfffe)).toBe(true);
    expect(needEvent(2, 2, 0xfffe)).toBe(false);
    expect(needEvent(0xfffd, 2, 0xfffe)).toBe(false);
    expect(needEvent(0xfffe, 0, 0xfffe)).toBe(true); // event == old is inside [old, new)
    expect(needEvent(0xfffe, 0xfffe, 0xfffe)).toBe(false); // nothing new
  });
});

describe('split ring', () => {
  it('walks a direct chain and returns it through the used ring', () => {
    const { ring, lay } = setup();
    writeDesc(lay.desc, 0, DATA_AT, 16, DESC_F_NEXT, 1);
    writeDesc(lay.desc, 1, DATA_AT + 4096, 4096, DESC_F_NEXT | DESC_F_WRITE, 2);
    writeDesc(lay.desc, 2, DATA_AT + 8192, 1, DESC_F_WRITE, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    expect(pop(ring, c)).toBe(true);
    expect(c.head).toBe(0);
    expect(c.readableBytes).toBe(16);
    expect(c.writableBytes).toBe(4097);
    expect(writableLengths(c)).toEqual([4096, 1]);
    expect(c.fault).toBeUndefined();
    expect(c.statusBytes).toBeDefined();
    expect(pop(ring, c)).toBe(false);
    push(ring, 0, 4097);
    expect(lay.usedIdx()).toBe(1);
    expect(lay.usedElem(0)).toEqual({ id: 0, len: 4097 });
  });

  it('follows an indirect table', () => {
    const { ring, lay } = setup();
    const table = gview(mem!, 0x20000, 48);
    writeDesc(table, 0, DATA_AT, 16, DESC_F_NEXT, 1);
    writeDesc(table, 1, DATA_AT + 512, 512, DESC_F_NEXT, 2);
    writeDesc(table, 2, DATA_AT + 1024, 1, DESC_F_WRITE, 0);
    writeDesc(lay.desc, 5, 0x20000, 48, DESC_F_INDIRECT, 0);
    lay.publish(5);
    const c = new DescriptorChain();
    expect(pop(ring, c)).toBe(true);
    expect(c.head).toBe(5);
    expect(c.readableBytes).toBe(528);
    expect(c.writableBytes).toBe(1);
  });

  it('resumes from a base index and wraps the u16 avail counter', () => {
    const { ring, lay } = setup(8, ALL, 0xfffe);
    for (let i = 0; i < 3; i++) {
      writeDesc(lay.desc, i, DATA_AT, 1, DESC_F_WRITE, 0);
      lay.publish(i);
    }
    const c = new DescriptorChain();
    const heads: number[] = [];
    while (pop(ring, c)) heads.push(c.head);
    expect(heads).toEqual([0, 1, 2]);
    expect(ring.nextAvail).toBe(1);
  });

  describe('hostile layouts', () => {
    it('detects a descriptor loop', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_NEXT, 1);
      writeDesc(lay.desc, 1, DATA_AT, 1, DESC_F_NEXT, 0);
      lay.publish(0);
      expect(popError(ring)).not.toBeInstanceOf(RingError);
    });

    it('detects a self loop inside an indirect table', () => {
      const { ring, lay } = setup();
      const table = gview(mem!, 0x20000, 32);
      writeDesc(table, 0, DATA_AT, 1, DESC_F_NEXT, 1);
      writeDesc(table, 1, DATA_AT, 1, DESC_F_NEXT, 1);
      writeDesc(lay.desc, 0, 0x20000, 32, DESC_F_INDIRECT, 0);
      lay.publish(0);
      expect(popError(ring).message).toMatch(/loop/);
    });

    it('rejects next out of range', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_NEXT, 8);
      lay.publish(0);
      expect(popError(ring).message).toMatch(/next 8/);
    });

    it('rejects a head out of range as a ring error', () => {
      const { ring, lay } = setup();
      lay.publish(9);
      expect(popError(ring)).toBeInstanceOf(RingError);
    });

    it('rejects nested indirect tables', () => {
      const { ring, lay } = setup();
      const table = gview(mem!, 0x20000, 16);
      writeDesc(table, 0, 0x21000, 16, DESC_F_INDIRECT, 0);
      writeDesc(lay.desc, 0, 0x20000, 16, DESC_F_INDIRECT, 0);
      lay.publish(0);
      expect(popError(ring).message).toMatch(/inside an indirect table/);
    });

    it('rejects indirect tables with bad lengths, NEXT, or without the feature', () => {
      for (const [len, flags, features, re] of [
        [24, DESC_F_INDIRECT, ALL, /multiple of 16/],
        [0, DESC_F_INDIRECT, ALL, /multiple of 16/],
        [16 * 2 ** 20, DESC_F_INDIRECT, ALL, /larger than the queue/],
        [16, DESC_F_INDIRECT | DESC_F_NEXT, ALL, /NEXT/],
        [16, DESC_F_INDIRECT, { ...ALL, indirect: false }, /INDIRECT_DESC/],
      ] as const) {
        mem?.clear();
        const { ring, lay } = setup(8, features);
        writeDesc(lay.desc, 0, 0x20000, len, flags, 1);
        lay.publish(0);
        expect(popError(ring).message).toMatch(re);
      }
    });

    it('rejects lengths that sum past 4 GiB', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 0xffffffff, DESC_F_NEXT, 1);
      writeDesc(lay.desc, 1, DATA_AT, 0xffffffff, 0, 0);
      lay.publish(0);
      expect(popError(ring)).not.toBeInstanceOf(RingError);
    });

    it('rejects addresses outside memory, straddling its end, or beyond 2^53', () => {
      for (const [addr, len] of [
        [64 << 20, 16],
        [(4 << 20) - 8, 16],
        [2 ** 60, 16],
        [2 ** 53 - 8, 16],
      ]) {
        mem?.clear();
        const { ring, lay } = setup();
        writeDesc(lay.desc, 0, addr!, len!, 0, 0);
        lay.publish(0);
        expect(popError(ring)).not.toBeInstanceOf(RingError);
      }
    });

    it('rejects an avail idx more than a queue ahead', () => {
      const { ring, lay } = setup();
      lay.setAvailIdx(9);
      expect(popError(ring)).toBeInstanceOf(RingError);
    });

    it('rejects a readable descriptor after a writable one', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
      writeDesc(lay.desc, 1, DATA_AT, 1, 0, 0);
      lay.publish(0);
      expect(popError(ring).message).toMatch(/readable descriptor after a writable/);
    });

    it('rejects ring addresses outside memory and bad sizes', () => {
      mem = makeMemory([{ gpa: 0, size: 1 << 20, uva: 0 }]);
      expect(() => new SplitRing(mem!, 256, { desc: (1 << 20) - 16, avail: 0, used: 0x1000 }, ALL, 0)).toThrow(RingError);
      expect(() => new SplitRing(mem!, 3, { desc: 0, avail: 0x1000, used: 0x2000 }, ALL, 0)).toThrow(/power of two/);
      expect(() => new SplitRing(mem!, 8, { desc: 8, avail: 0x1000, used: 0x2000 }, ALL, 0)).toThrow(/misaligned/);
    });

    it('rejects aligned ring addresses that land at odd offsets of the mapping', () => {
      // The region's front-end address is odd while its file offset is page aligned:
      // an aligned ring address then sits at an odd byte of the mapping.
      mem = makeMemory([{ gpa: 0, size: 1 << 20, uva: 0x10001 }]);
      expect(() => new SplitRing(mem!, 8, { desc: 0x20000, avail: 0x21000, used: 0x22000 }, ALL, 0)).toThrow(/misaligned memory/);
      mem.clear();
      // Same low bits on both sides: fine.
      mem = makeMemory([{ gpa: 0, size: 1 << 20, uva: 0x10000 }]);
      expect(() => new SplitRing(mem!, 8, { desc: 0x20000, avail: 0x21000, used: 0x22000 }, ALL, 0)).not.toThrow();
    });
  });

  describe('notifications', () => {
    it('with EVENT_IDX signals only when used_event is crossed', () => {
      const { ring, lay } = setup();
      for (let i = 0; i < 4; i++) {
        writeDesc(lay.desc, i, DATA_AT, 1, DESC_F_WRITE, 0);
        lay.publish(i);
      }
      const c = new DescriptorChain();
      lay.setUsedEvent(2); // driver wants an interrupt once used idx passes 2
      pop(ring, c);
      push(ring, c.head, 1);
      expect(ring.needsNotify()).toBe(true); // the first decision always signals
      pop(ring, c);
      push(ring, c.head, 1);
      expect(ring.needsNotify()).toBe(false); // used idx 2: event 2 not yet passed
      pop(ring, c);
      push(ring, c.head, 1);
      expect(ring.needsNotify()).toBe(true); // used idx 3 crosses event 2
      pop(ring, c);
      push(ring, c.head, 1);
      expect(ring.needsNotify()).toBe(false);
    });

    it('publishes avail_event and reports entries that raced in', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_WRITE, 0);
      lay.publish(0);
      const c = new DescriptorChain();
      pop(ring, c);
      expect(ring.enableNotifications(0)).toBe(false);
      expect(lay.availEvent()).toBe(1);
      lay.publish(0);
      expect(ring.enableNotifications(0)).toBe(true);
      // Asking for more than the one entry already seen: the driver's next one is what we wait for.
      expect(ring.enableNotifications(1)).toBe(false);
      expect(lay.availEvent()).toBe(2);
    });

    it('without EVENT_IDX honours NO_INTERRUPT, and NOTIFY_ON_EMPTY overrides it when empty', () => {
      const { ring, lay } = setup(8, { eventIdx: false, indirect: true, notifyOnEmpty: false });
      lay.avail.setUint16(0, 1, true);
      expect(ring.needsNotify()).toBe(false);
      lay.avail.setUint16(0, 0, true);
      expect(ring.needsNotify()).toBe(true);
      mem!.clear();
      const s2 = setup(8, { eventIdx: false, indirect: true, notifyOnEmpty: true });
      s2.lay.avail.setUint16(0, 1, true);
      expect(s2.ring.needsNotify()).toBe(true);
    });
  });
});

describe('NOTIFY_ON_EMPTY under EVENT_IDX', () => {
  it('notifies when the ring runs empty even if used_event says no', () => {
    const { ring, lay } = setup(8, { eventIdx: true, indirect: true, notifyOnEmpty: true });
    for (let i = 0; i < 2; i++) {
      writeDesc(lay.desc, i, DATA_AT, 1, DESC_F_WRITE, 0);
      lay.publish(i);
    }
    const c = new DescriptorChain();
    lay.setUsedEvent(100); // far away: event index alone would suppress
    pop(ring, c);
    push(ring, c.head, 1);
    expect(ring.needsNotify()).toBe(true); // first decision
    pop(ring, c);
    push(ring, c.head, 1);
    expect(ring.needsNotify()).toBe(true); // the ring is empty now
  });
});

describe('peek and take', () => {
  it('peek changes nothing; take consumes in order', () => {
    const { ring, lay } = setup();
    for (let i = 0; i < 3; i++) {
      writeDesc(lay.desc, i, DATA_AT + 512 * i, 512, DESC_F_WRITE, 0);
      lay.publish(i);
    }
    const c = new DescriptorChain();
    ring.peek(2, c);
    expect(c.head).toBe(2);
    ring.peek(0, c);
    expect(c.head).toBe(0);
    expect(ring.pending()).toBe(3);
    expect(ring.nextAvail).toBe(0);
    ring.take(2);
    expect(ring.pending()).toBe(1);
    ring.peek(0, c);
    expect(c.head).toBe(2);
  });
});

describe('chain limits (the worst a guest can post)', () => {
  it('refuses an indirect table longer than the queue, but still finds its status byte', () => {
    const { ring, lay } = setup(8);
    const n = 32; // 4x the queue
    const table = gview(mem!, 0x20000, 16 * n);
    writeDesc(table, 0, DATA_AT, 16, DESC_F_NEXT, 1);
    writeDesc(table, 1, DATA_AT + 4096, 1, DESC_F_WRITE, 0);
    writeDesc(lay.desc, 0, 0x20000, 16 * n, DESC_F_INDIRECT, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    ring.peek(0, c);
    expect(c.fault).toMatch(/larger than the queue/);
    expect(c.statusBytes).toBeDefined();
  });

  it('walks a chained table larger than the queue to its end, so the request can still fail with a status', () => {
    const { ring, lay } = setup(8);
    const n = 64;
    const table = gview(mem!, 0x20000, 16 * n);
    for (let i = 0; i < n; i++) writeDesc(table, i, DATA_AT + 512 * i, 512, (i < n - 1 ? DESC_F_NEXT : 0) | DESC_F_WRITE, i + 1);
    writeDesc(lay.desc, 0, 0x20000, 16 * n, DESC_F_INDIRECT, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    ring.peek(0, c);
    expect(c.fault).toMatch(/larger than the queue/);
    expect(c.descriptors).toBe(n + 1);
    expect(c.statusBytes).toBeDefined();
  });

  it('a loop inside a large table ends the walk at the table length, without a status byte', () => {
    const { ring, lay } = setup(8);
    const n = 4096;
    const table = gview(mem!, 0x20000, 16 * n);
    for (let i = 0; i < n; i++) writeDesc(table, i, DATA_AT, 512, DESC_F_NEXT | DESC_F_WRITE, (i + 1) % n);
    writeDesc(lay.desc, 0, 0x20000, 16 * n, DESC_F_INDIRECT, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    ring.peek(0, c);
    expect(c.statusBytes).toBeUndefined();
    expect(c.descriptors).toBeLessThanOrEqual(n + 1);
    expect(c.count).toBeLessThanOrEqual(MAX_CHAIN_SEGMENTS);
  });

  it('counts splits at region boundaries against the segment limit', () => {
    // 2048 regions of 4 KiB back to back: one 8 MiB buffer becomes 2048 pieces.
    const plans = [{ gpa: 0, size: 4 << 20, uva: 0 }];
    for (let i = 0; i < 2048; i++) plans.push({ gpa: (16 << 20) + i * 4096, size: 4096, uva: (16 << 20) + i * 4096 });
    mem = makeMemory(plans);
    const lay = new RingLayout(mem, 8, RING_AT);
    const ring = new SplitRing(mem, 8, lay.addrs, ALL, 0);
    writeDesc(lay.desc, 0, DATA_AT, 16, DESC_F_NEXT, 1);
    writeDesc(lay.desc, 1, 16 << 20, 2048 * 4096, DESC_F_WRITE | DESC_F_NEXT, 2);
    writeDesc(lay.desc, 2, DATA_AT + 4096, 1, DESC_F_WRITE, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    ring.peek(0, c);
    expect(c.fault).toMatch(new RegExp(`more than ${MAX_CHAIN_SEGMENTS} segments`));
    expect(c.count).toBe(MAX_CHAIN_SEGMENTS);
    expect(c.statusBytes).toBeDefined(); // blk can still answer IOERR
  });

  it('a data buffer outside memory is a fault with a status byte; a status outside memory has none', () => {
    const { ring, lay } = setup();
    writeDesc(lay.desc, 0, DATA_AT, 16, DESC_F_NEXT, 1);
    writeDesc(lay.desc, 1, 64 << 20, 4096, DESC_F_WRITE | DESC_F_NEXT, 2);
    writeDesc(lay.desc, 2, DATA_AT + 4096, 1, DESC_F_WRITE, 0);
    lay.publish(0);
    writeDesc(lay.desc, 3, DATA_AT, 16, DESC_F_NEXT, 4);
    writeDesc(lay.desc, 4, 64 << 20, 1, DESC_F_WRITE, 0);
    lay.publish(3);
    const c = new DescriptorChain();
    ring.peek(0, c);
    expect(c.fault).toMatch(/outside guest memory/);
    expect(c.statusBytes).toBeDefined();
    c.writeStatus(1);
    expect(gview(mem!, DATA_AT + 4096, 1).getUint8(0)).toBe(1);
    ring.peek(1, c);
    expect(c.fault).toMatch(/outside guest memory/);
    expect(c.statusBytes).toBeUndefined();
  });
});

describe('chain reader and writer', () => {
  it('reads a header across segments, hands out views, writes at the end and counts what it wrote', () => {
    const { ring, lay } = setup();
    gview(mem!, DATA_AT, 8).setUint32(0, 0x11223344, true);
    gview(mem!, DATA_AT + 0x1000, 8).setUint32(0, 0x55667788, true);
    writeDesc(lay.desc, 0, DATA_AT, 8, DESC_F_NEXT, 1);
    writeDesc(lay.desc, 1, DATA_AT + 0x1000, 8 + 512, DESC_F_NEXT, 2);
    writeDesc(lay.desc, 2, DATA_AT + 0x2000, 512, DESC_F_WRITE | DESC_F_NEXT, 3);
    writeDesc(lay.desc, 3, DATA_AT + 0x3000, 1, DESC_F_WRITE, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    pop(ring, c);
    const r = new ChainReader().reset(c);
    const hdr = new Uint8Array(16);
    expect(r.read(hdr)).toBe(true);
    const dv = new DataView(hdr.buffer);
    expect(dv.getUint32(0, true)).toBe(0x11223344);
    expect(dv.getUint32(8, true)).toBe(0x55667788);
    const views: Uint8Array[] = [];
    expect(r.views(512, views)).toBe(true);
    expect(views.map((v) => v.length)).toEqual([512]);
    expect(r.remaining).toBe(0);
    expect(r.read(new Uint8Array(1))).toBe(false);
    const w = new ChainWriter().reset(c);
    expect(w.reserveTail(1)).toBe(true);
    expect(w.write(new Uint8Array(513))).toBe(false); // the status byte is reserved
    expect(w.views(512, [])).toBe(true);
    expect(w.spanDescriptors).toBe(1);
    expect(w.spanLargest).toBe(512);
    expect(w.written).toBe(512);
    expect(c.writeStatus(7)).toBe(true);
    expect(gview(mem!, DATA_AT + 0x3000, 1).getUint8(0)).toBe(7);
  });

  it('pokes a u16 split across two segments', () => {
    const { ring, lay } = setup();
    writeDesc(lay.desc, 0, DATA_AT + 0x1000 - 11, 11, DESC_F_WRITE | DESC_F_NEXT, 1);
    writeDesc(lay.desc, 1, DATA_AT + 0x3000, 16, DESC_F_WRITE, 0);
    lay.publish(0);
    const c = new DescriptorChain();
    pop(ring, c);
    expect(new ChainWriter().reset(c).pokeU16(10, 0xabcd)).toBe(true);
    expect(gview(mem!, DATA_AT + 0x1000 - 1, 1).getUint8(0)).toBe(0xcd);
    expect(gview(mem!, DATA_AT + 0x3000, 1).getUint8(0)).toBe(0xab);
  });
});
