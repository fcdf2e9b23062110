// virtio-blk feature bits, request types and the config space layout (VIRTIO 1.x §5.2).

export const BLK_F_SIZE_MAX = 1;
export const BLK_F_SEG_MAX = 2;
export const BLK_F_RO = 5;
export const BLK_F_BLK_SIZE = 6;
export const BLK_F_FLUSH = 9;
export const BLK_F_TOPOLOGY = 10;
export const BLK_F_CONFIG_WCE = 11;
export const BLK_F_MQ = 12;
export const BLK_F_DISCARD = 13;
export const BLK_F_WRITE_ZEROES = 14;

export const T_IN = 0;
export const T_OUT = 1;
export const T_FLUSH = 4;
export const T_GET_ID = 8;
export const T_DISCARD = 11;
export const T_WRITE_ZEROES = 13;

export const S_OK = 0;
export const S_IOERR = 1;
export const S_UNSUPP = 2;

export const SECTOR = 512;
export const REQ_HEADER_SIZE = 16;
export const DISCARD_SEGMENT_SIZE = 16;
export const WRITE_ZEROES_F_UNMAP = 1;
export const ID_BYTES = 20;

/** Config space bytes we model; reads past it (up to 256) see zeros, as for fields not offered. */
export const CONFIG_SIZE = 64;
export const CONFIG_SPACE_LIMIT = 256;
export const OFF_WRITEBACK = 32;

export interface BlkConfig {
  capacitySectors: bigint;
  sizeMax: number;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  minIoSize: number;
  optIoSize: number;
  writeback: boolean;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: boolean;
}

export function encodeBlkConfig(c: BlkConfig): Uint8Array {
  const out = new Uint8Array(CONFIG_SIZE);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, c.capacitySectors, true);
  dv.setUint32(8, c.sizeMax, true);
  dv.setUint32(12, c.segMax, true);
  // 16..19: geometry, not offered.
  dv.setUint32(20, c.blkSize, true);
  dv.setUint8(24, c.physicalBlockExp);
  dv.setUint8(25, 0); // alignment_offset
  dv.setUint16(26, c.minIoSize, true);
  dv.setUint32(28, c.optIoSize, true);
  dv.setUint8(OFF_WRITEBACK, c.writeback ? 1 : 0);
  dv.setUint16(34, c.numQueues, true);
  dv.setUint32(36, c.maxDiscardSectors, true);
  dv.setUint32(40, c.maxDiscardSeg, true);
  dv.setUint32(44, c.discardSectorAlignment, true);
  dv.setUint32(48, c.maxWriteZeroesSectors, true);
  dv.setUint32(52, c.maxWriteZeroesSeg, true);
  dv.setUint8(56, c.writeZeroesMayUnmap ? 1 : 0);
  return out;
}
