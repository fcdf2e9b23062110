// vhost-user wire constants and payload builders for the test front-end.
// Written from the specification (QEMU docs/interop/vhost-user.rst), not from
// vhostd's own codec, so a codec bug in vhostd cannot hide behind a shared one.

export const HDR = 12;
export const VERSION = 0x1;
export const F_REPLY = 0x4;
export const F_NEED_REPLY = 0x8;
export const REPLY_FLAGS = VERSION | F_REPLY;

export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SET_BACKEND_REQ_FD: 21,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  RESET_DEVICE: 34,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

export function reqName(r: number): string {
  for (const [k, v] of Object.entries(Req)) if (v === r) return k;
  return `REQ_${r}`;
}

export const PF = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio feature bits (device-independent and virtio-blk). */
export const VF = {
  BLK_SIZE_MAX: 1,
  BLK_SEG_MAX: 2,
  BLK_GEOMETRY: 4,
  BLK_RO: 5,
  BLK_BLK_SIZE: 6,
  BLK_FLUSH: 9,
  BLK_TOPOLOGY: 10,
  BLK_CONFIG_WCE: 11,
  BLK_MQ: 12,
  BLK_DISCARD: 13,
  BLK_WRITE_ZEROES: 14,
  NOTIFY_ON_EMPTY: 24,
  LOG_ALL: 26,
  ANY_LAYOUT: 27,
  INDIRECT_DESC: 28,
  EVENT_IDX: 29,
  PROTOCOL_FEATURES: 30,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
} as const;

export const bit = (n: number): bigint => 1n << BigInt(n);
export const has = (mask: bigint, n: number): boolean => (mask & bit(n)) !== 0n;

export const VRING_NOFD = 0x100;

export function header(request: number, flags: number, size: number): Uint8Array {
  const b = new Uint8Array(HDR);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, size, true);
  return b;
}

export function frame(request: number, flags: number, payload: Uint8Array, size = payload.length): Uint8Array {
  const out = new Uint8Array(HDR + payload.length);
  out.set(header(request, flags, size));
  out.set(payload, HDR);
  return out;
}

export function u64(v: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
  return b;
}

export function readU64(p: Uint8Array, off = 0): bigint {
  return new DataView(p.buffer, p.byteOffset, p.byteLength).getBigUint64(off, true);
}

export function vringState(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, index, true);
  dv.setUint32(4, num, true);
  return b;
}

export interface VringAddrMsg {
  index: number;
  flags?: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log?: bigint;
}

export function vringAddr(a: VringAddrMsg): Uint8Array {
  const b = new Uint8Array(40);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, a.index, true);
  dv.setUint32(4, a.flags ?? 0, true);
  dv.setBigUint64(8, a.desc, true);
  dv.setBigUint64(16, a.used, true);
  dv.setBigUint64(24, a.avail, true);
  dv.setBigUint64(32, a.log ?? 0n, true);
  return b;
}

export interface RegionMsg {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
}

function putRegion(dv: DataView, off: number, r: RegionMsg): void {
  dv.setBigUint64(off, r.guestPhysAddr, true);
  dv.setBigUint64(off + 8, r.memorySize, true);
  dv.setBigUint64(off + 16, r.userspaceAddr, true);
  dv.setBigUint64(off + 24, r.mmapOffset, true);
}

export function memTable(regions: RegionMsg[]): Uint8Array {
  const b = new Uint8Array(8 + 32 * regions.length);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => putRegion(dv, 8 + 32 * i, r));
  return b;
}

export function singleRegion(r: RegionMsg): Uint8Array {
  const b = new Uint8Array(40);
  putRegion(new DataView(b.buffer), 8, r);
  return b;
}

export function configMsg(offset: number, size: number, flags: number, data?: Uint8Array): Uint8Array {
  const b = new Uint8Array(12 + (data ? data.length : size));
  const dv = new DataView(b.buffer);
  dv.setUint32(0, offset, true);
  dv.setUint32(4, size, true);
  dv.setUint32(8, flags, true);
  if (data) b.set(data, 12);
  return b;
}

/** VhostUserInflight: {u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size}, padded to 24 bytes. */
export interface InflightMsg {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

export const INFLIGHT_MSG_SIZE = 24;

export function inflightMsg(m: InflightMsg): Uint8Array {
  const b = new Uint8Array(INFLIGHT_MSG_SIZE);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, m.mmapSize, true);
  dv.setBigUint64(8, m.mmapOffset, true);
  dv.setUint16(16, m.numQueues, true);
  dv.setUint16(18, m.queueSize, true);
  return b;
}

export function readInflightMsg(p: Uint8Array): InflightMsg {
  const dv = new DataView(p.buffer, p.byteOffset, p.byteLength);
  return {
    mmapSize: dv.getBigUint64(0, true),
    mmapOffset: dv.getBigUint64(8, true),
    numQueues: dv.getUint16(16, true),
    queueSize: dv.getUint16(18, true),
  };
}
