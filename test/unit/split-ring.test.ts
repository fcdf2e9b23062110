import { afterEach, describe, expect, it } from 'vitest';
import type { GuestMemory } from '../../src/ring/guest-memory.js';
import {
  Chain,
  ChainError,
  DESC_F_INDIRECT,
  DESC_F_NEXT,
  DESC_F_WRITE,
  needEvent,
  RingError,
  SplitRing,
  type RingFeatures,
} from '../../src/ring/split-ring.js';
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

/** The error a pop reports: thrown for a broken ring, on the chain for a malformed chain. */
function popError(ring: SplitRing): Error {
  const c = new Chain();
  try {
    ring.pop(c);
  } catch (e) {
    return e as Error;
  }
  if (c.error) return new ChainError(c.error);
  throw new Error('pop succeeded');
}

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
    const c = new Chain();
    expect(ring.pop(c)).toBe(true);
    expect(c.head).toBe(0);
    expect(c.readableBytes).toBe(16);
    expect(c.writableBytes).toBe(4097);
    expect(c.writable.map((s) => s.length)).toEqual([4096, 1]);
    expect(ring.pop(c)).toBe(false);
    ring.push(0, 4097);
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
    const c = new Chain();
    expect(ring.pop(c)).toBe(true);
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
    const c = new Chain();
    const heads: number[] = [];
    while (ring.pop(c)) heads.push(c.head);
    expect(heads).toEqual([0, 1, 2]);
    expect(ring.lastAvail).toBe(1);
  });

  describe('hostile layouts', () => {
    it('detects a descriptor loop', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_NEXT, 1);
      writeDesc(lay.desc, 1, DATA_AT, 1, DESC_F_NEXT, 0);
      lay.publish(0);
      expect(popError(ring)).toBeInstanceOf(ChainError);
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
      expect(popError(ring).message).toMatch(/nested/);
    });

    it('rejects indirect tables with bad lengths, NEXT, or without the feature', () => {
      for (const [len, flags, features, re] of [
        [24, DESC_F_INDIRECT, ALL, /multiple of 16/],
        [0, DESC_F_INDIRECT, ALL, /multiple of 16/],
        [16 * 2 ** 20, DESC_F_INDIRECT, ALL, /too large/],
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
      expect(popError(ring)).toBeInstanceOf(ChainError);
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
        expect(popError(ring)).toBeInstanceOf(ChainError);
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
      const c = new Chain();
      lay.setUsedEvent(2); // driver wants an interrupt once used idx passes 2
      ring.pop(c);
      ring.push(c.head, 1);
      expect(ring.needsNotify()).toBe(true); // the first decision always signals
      ring.pop(c);
      ring.push(c.head, 1);
      expect(ring.needsNotify()).toBe(false); // used idx 2: event 2 not yet passed
      ring.pop(c);
      ring.push(c.head, 1);
      expect(ring.needsNotify()).toBe(true); // used idx 3 crosses event 2
      ring.pop(c);
      ring.push(c.head, 1);
      expect(ring.needsNotify()).toBe(false);
    });

    it('publishes avail_event and reports entries that raced in', () => {
      const { ring, lay } = setup();
      writeDesc(lay.desc, 0, DATA_AT, 1, DESC_F_WRITE, 0);
      lay.publish(0);
      const c = new Chain();
      ring.pop(c);
      expect(ring.enableKicks()).toBe(false);
      expect(lay.availEvent()).toBe(1);
      lay.publish(0);
      expect(ring.enableKicks()).toBe(true);
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
