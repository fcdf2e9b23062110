import { describe, expect, it } from 'vitest';
import { CONFIG_SIZE, encodeBlkConfig } from '../../src/backends/blk/config.js';

describe('virtio-blk config space', () => {
  it('puts every field at its VIRTIO 1.x offset', () => {
    const b = encodeBlkConfig({
      capacitySectors: 0x1_2345_6789n,
      sizeMax: 0x100000,
      segMax: 126,
      blkSize: 4096,
      physicalBlockExp: 3,
      minIoSize: 1,
      optIoSize: 64,
      writeback: true,
      numQueues: 4,
      maxDiscardSectors: 0x3fffff,
      maxDiscardSeg: 16,
      discardSectorAlignment: 8,
      maxWriteZeroesSectors: 0x3ffffe,
      maxWriteZeroesSeg: 15,
      writeZeroesMayUnmap: true,
    });
    const dv = new DataView(b.buffer);
    expect(b.length).toBe(CONFIG_SIZE);
    expect(dv.getBigUint64(0, true)).toBe(0x1_2345_6789n);
    expect(dv.getUint32(8, true)).toBe(0x100000);
    expect(dv.getUint32(12, true)).toBe(126);
    expect(dv.getUint32(16, true)).toBe(0); // geometry not offered
    expect(dv.getUint32(20, true)).toBe(4096);
    expect(dv.getUint8(24)).toBe(3);
    expect(dv.getUint8(25)).toBe(0);
    expect(dv.getUint16(26, true)).toBe(1);
    expect(dv.getUint32(28, true)).toBe(64);
    expect(dv.getUint8(32)).toBe(1);
    expect(dv.getUint16(34, true)).toBe(4);
    expect(dv.getUint32(36, true)).toBe(0x3fffff);
    expect(dv.getUint32(40, true)).toBe(16);
    expect(dv.getUint32(44, true)).toBe(8);
    expect(dv.getUint32(48, true)).toBe(0x3ffffe);
    expect(dv.getUint32(52, true)).toBe(15);
    expect(dv.getUint8(56)).toBe(1);
    expect(Array.from(b.subarray(57))).toEqual(new Array(CONFIG_SIZE - 57).fill(0));
  });

  it('encodes writeback off as 0', () => {
    const b = encodeBlkConfig({
      capacitySectors: 8n, sizeMax: 0, segMax: 0, blkSize: 512, physicalBlockExp: 0, minIoSize: 0, optIoSize: 0,
      writeback: false, numQueues: 1, maxDiscardSectors: 0, maxDiscardSeg: 0, discardSectorAlignment: 0,
      maxWriteZeroesSectors: 0, maxWriteZeroesSeg: 0, writeZeroesMayUnmap: false,
    });
    expect(b[32]).toBe(0);
    expect(b[56]).toBe(0);
  });
});
