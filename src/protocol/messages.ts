// vhost-user wire format (QEMU docs/interop/vhost-user.rst): a 12-byte header
// {request u32, flags u32, size u32} and a payload whose size is fixed per request.

export const HEADER_SIZE = 12;
export { MAX_PAYLOAD } from '../limits.js';
export const MAX_FDS = 8;
export const VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

export enum Req {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  RESET_DEVICE = 34,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
}

/** Requests the back-end sends on the BACKEND_REQ channel. */
export const BackendReq = {
  CONFIG_CHANGE_MSG: 2,
} as const;

export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Virtio feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
export { VHOST_USER_F_PROTOCOL_FEATURES as F_PROTOCOL_FEATURES } from '../features.js';

export { bit } from '../features.js';

export const SIZE_U64 = 8;
export const SIZE_VRING_STATE = 8;
export const SIZE_VRING_ADDR = 40;
export const SIZE_REGION = 32;
export const SIZE_MEM_TABLE_HEADER = 8;
export const SIZE_SINGLE_REGION = 40;
export const SIZE_CONFIG_HEADER = 12;
export const MAX_CONFIG_SIZE = 256;
export const SIZE_LOG = 16;
export const SIZE_INFLIGHT = 24;
/** Regions in one SET_MEM_TABLE: one fd each, and at most 8 fds per message. */
export const MAX_TABLE_REGIONS = 8;

/** SET_VRING_ADDR flags: log_guest_addr is valid, and used ring writes are logged there. */
export const VRING_F_LOG = 1;

/** Bits 0-7 of a KICK/CALL/ERR payload: the queue; bit 8: no fd, poll instead. */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

export class ProtocolError extends Error {}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(buf: Uint8Array): Header {
  const dv = new DataView(buf.buffer, buf.byteOffset, HEADER_SIZE);
  return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
}

export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

function view(p: Uint8Array): DataView {
  return new DataView(p.buffer, p.byteOffset, p.byteLength);
}

export function expectSize(request: number, payload: Uint8Array, size: number): void {
  if (payload.length !== size) {
    throw new ProtocolError(`${Req[request] ?? request}: payload is ${payload.length} bytes, expected ${size}`);
  }
}

// ---- u64 ----
export function encodeU64(v: bigint): Uint8Array {
  const out = new Uint8Array(8);
  view(out).setBigUint64(0, v, true);
  return out;
}
export function decodeU64(p: Uint8Array): bigint {
  return view(p).getBigUint64(0, true);
}

// ---- vring state ----
export interface VringState {
  index: number;
  num: number;
}
export function encodeVringState(s: VringState): Uint8Array {
  const out = new Uint8Array(SIZE_VRING_STATE);
  const dv = view(out);
  dv.setUint32(0, s.index, true);
  dv.setUint32(4, s.num, true);
  return out;
}
export function decodeVringState(p: Uint8Array): VringState {
  const dv = view(p);
  return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
}

// ---- vring addresses (front-end virtual addresses) ----
export interface VringAddr {
  index: number;
  flags: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}
export const VRING_ADDR_F_LOG = 0x1;
export function encodeVringAddr(a: VringAddr): Uint8Array {
  const out = new Uint8Array(SIZE_VRING_ADDR);
  const dv = view(out);
  dv.setUint32(0, a.index, true);
  dv.setUint32(4, a.flags, true);
  dv.setBigUint64(8, a.desc, true);
  dv.setBigUint64(16, a.used, true);
  dv.setBigUint64(24, a.avail, true);
  dv.setBigUint64(32, a.log, true);
  return out;
}
export function decodeVringAddr(p: Uint8Array): VringAddr {
  const dv = view(p);
  return {
    index: dv.getUint32(0, true),
    flags: dv.getUint32(4, true),
    desc: dv.getBigUint64(8, true),
    used: dv.getBigUint64(16, true),
    avail: dv.getBigUint64(24, true),
    log: dv.getBigUint64(32, true),
  };
}

export interface LogBase {
  mmapSize: bigint;
  mmapOffset: bigint;
}

export function decodeLogBase(p: Uint8Array): LogBase {
  const dv = view(p);
  return { mmapSize: dv.getBigUint64(0, true), mmapOffset: dv.getBigUint64(8, true) };
}

export function encodeLogBase(l: LogBase): Uint8Array {
  const out = new Uint8Array(SIZE_LOG);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, l.mmapSize, true);
  dv.setBigUint64(8, l.mmapOffset, true);
  return out;
}

// ---- memory regions ----
export interface MemRegion {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
}
function writeRegion(dv: DataView, off: number, r: MemRegion): void {
  dv.setBigUint64(off, r.guestPhysAddr, true);
  dv.setBigUint64(off + 8, r.memorySize, true);
  dv.setBigUint64(off + 16, r.userspaceAddr, true);
  dv.setBigUint64(off + 24, r.mmapOffset, true);
}
function readRegion(dv: DataView, off: number): MemRegion {
  return {
    guestPhysAddr: dv.getBigUint64(off, true),
    memorySize: dv.getBigUint64(off + 8, true),
    userspaceAddr: dv.getBigUint64(off + 16, true),
    mmapOffset: dv.getBigUint64(off + 24, true),
  };
}
export function encodeMemTable(regions: MemRegion[]): Uint8Array {
  const out = new Uint8Array(SIZE_MEM_TABLE_HEADER + SIZE_REGION * regions.length);
  const dv = view(out);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => writeRegion(dv, SIZE_MEM_TABLE_HEADER + i * SIZE_REGION, r));
  return out;
}
export function decodeMemTable(p: Uint8Array): MemRegion[] {
  if (p.length < SIZE_MEM_TABLE_HEADER) throw new ProtocolError(`SET_MEM_TABLE: payload is ${p.length} bytes, too short`);
  const dv = view(p);
  const n = dv.getUint32(0, true);
  if (n === 0 || n > MAX_TABLE_REGIONS) throw new ProtocolError(`SET_MEM_TABLE: ${n} regions, must be 1..${MAX_TABLE_REGIONS}`);
  expectSize(Req.SET_MEM_TABLE, p, SIZE_MEM_TABLE_HEADER + n * SIZE_REGION);
  return Array.from({ length: n }, (_, i) => readRegion(dv, SIZE_MEM_TABLE_HEADER + i * SIZE_REGION));
}
export function encodeSingleRegion(r: MemRegion): Uint8Array {
  const out = new Uint8Array(SIZE_SINGLE_REGION);
  writeRegion(view(out), 8, r);
  return out;
}
export function decodeSingleRegion(p: Uint8Array): MemRegion {
  return readRegion(view(p), 8);
}

// ---- device config space ----
export interface ConfigMsg {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array;
}
export const CONFIG_FLAG_WRITABLE = 0x0;
export const CONFIG_FLAG_MIGRATION = 0x1;
export function encodeConfig(c: ConfigMsg): Uint8Array {
  const out = new Uint8Array(SIZE_CONFIG_HEADER + c.data.length);
  const dv = view(out);
  dv.setUint32(0, c.offset, true);
  dv.setUint32(4, c.size, true);
  dv.setUint32(8, c.flags, true);
  out.set(c.data, SIZE_CONFIG_HEADER);
  return out;
}
export function decodeConfig(request: number, p: Uint8Array): ConfigMsg {
  if (p.length < SIZE_CONFIG_HEADER) throw new ProtocolError(`${Req[request]}: payload is ${p.length} bytes, too short`);
  const dv = view(p);
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE) throw new ProtocolError(`${Req[request]}: config size ${size} exceeds ${MAX_CONFIG_SIZE}`);
  expectSize(request, p, SIZE_CONFIG_HEADER + size);
  return { offset, size, flags, data: p.slice(SIZE_CONFIG_HEADER) };
}

// ---- inflight tracking area ----
export interface InflightMsg {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}
export function encodeInflight(m: InflightMsg): Uint8Array {
  const out = new Uint8Array(SIZE_INFLIGHT);
  const dv = view(out);
  dv.setBigUint64(0, m.mmapSize, true);
  dv.setBigUint64(8, m.mmapOffset, true);
  dv.setUint16(16, m.numQueues, true);
  dv.setUint16(18, m.queueSize, true);
  return out;
}
export function decodeInflight(p: Uint8Array): InflightMsg {
  const dv = view(p);
  return {
    mmapSize: dv.getBigUint64(0, true),
    mmapOffset: dv.getBigUint64(8, true),
    numQueues: dv.getUint16(16, true),
    queueSize: dv.getUint16(18, true),
  };
}

export function requestName(request: number): string {
  return Req[request] ?? `UNKNOWN(${request})`;
}
