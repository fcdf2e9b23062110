import { describe, expect, it } from 'vitest';
import {
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemTable,
  encodeMessage,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  HEADER_SIZE,
  ProtocolError,
  Req,
} from '../../src/protocol/messages.js';

describe('vhost-user message codec', () => {
  it('encodes the 12-byte header little-endian', () => {
    const m = encodeMessage(Req.GET_VRING_BASE, 0x5, encodeVringState({ index: 3, num: 0xbeef }));
    expect(m.length).toBe(HEADER_SIZE + 8);
    expect(Array.from(m.subarray(0, 12))).toEqual([11, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
    expect(decodeHeader(m)).toEqual({ request: 11, flags: 5, size: 8 });
  });

  it('round-trips u64 at full width', () => {
    for (const v of [0n, 1n, 0xffffffffn, 0x1_0000_0000n, 0xffff_ffff_ffff_ffffn]) {
      expect(decodeU64(encodeU64(v))).toBe(v);
    }
  });

  it('round-trips vring state and address (40 bytes)', () => {
    expect(decodeVringState(encodeVringState({ index: 7, num: 1024 }))).toEqual({ index: 7, num: 1024 });
    const a = { index: 1, flags: 1, desc: 0x7f00_0000_1000n, used: 0x7f00_0000_3000n, avail: 0x7f00_0000_2000n, log: 0xdead_beef_0000n };
    const enc = encodeVringAddr(a);
    expect(enc.length).toBe(40);
    expect(decodeVringAddr(enc)).toEqual(a);
  });

  it('round-trips a memory table with 64-bit fields', () => {
    const regions = [
      { guestPhysAddr: 0n, memorySize: 0xc0000000n, userspaceAddr: 0x7f12_0000_0000n, mmapOffset: 0n },
      { guestPhysAddr: 0x1_0000_0000n, memorySize: 0x1_4000_0000n, userspaceAddr: 0x7f12_c000_0000n, mmapOffset: 0xc0000000n },
    ];
    const enc = encodeMemTable(regions);
    expect(enc.length).toBe(8 + 32 * 2);
    expect(decodeMemTable(enc)).toEqual(regions);
  });

  it('rejects memory tables with a bad count or size', () => {
    const enc = encodeMemTable([{ guestPhysAddr: 0n, memorySize: 4096n, userspaceAddr: 0n, mmapOffset: 0n }]);
    expect(() => decodeMemTable(enc.subarray(0, 39))).toThrow(ProtocolError);
    const zero = new Uint8Array(8);
    expect(() => decodeMemTable(zero)).toThrow(/0 regions/);
    const nine = new Uint8Array(8 + 32 * 9);
    nine[0] = 9;
    expect(() => decodeMemTable(nine)).toThrow(/9 regions/);
    expect(() => decodeMemTable(new Uint8Array(4))).toThrow(/too short/);
  });

  it('round-trips a single region (40 bytes with leading padding)', () => {
    const r = { guestPhysAddr: 0x1_0000_0000n, memorySize: 0x8000_0000n, userspaceAddr: 0x7f00_0000_0000n, mmapOffset: 0xc000_0000n };
    const enc = encodeSingleRegion(r);
    expect(enc.length).toBe(40);
    expect(Array.from(enc.subarray(0, 8))).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect(decodeSingleRegion(enc)).toEqual(r);
  });

  it('round-trips config messages and enforces 12 + size', () => {
    const data = Uint8Array.from({ length: 57 }, (_, i) => i);
    const enc = encodeConfig({ offset: 0, size: 57, flags: 0, data });
    expect(enc.length).toBe(69);
    expect(decodeConfig(Req.GET_CONFIG, enc)).toEqual({ offset: 0, size: 57, flags: 0, data });
    expect(() => decodeConfig(Req.GET_CONFIG, enc.subarray(0, 68))).toThrow(/expected 69/);
    const huge = encodeConfig({ offset: 0, size: 257, flags: 0, data: new Uint8Array(257) });
    expect(() => decodeConfig(Req.GET_CONFIG, huge)).toThrow(/exceeds 256/);
  });

  it('round-trips the inflight description', () => {
    const m = { mmapSize: 0x21000n, mmapOffset: 0n, numQueues: 4, queueSize: 256 };
    const enc = encodeInflight(m);
    expect(enc.length).toBe(24);
    expect(decodeInflight(enc)).toEqual(m);
  });
});
