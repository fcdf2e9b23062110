// What each front-end request looks like on the wire, and who handles it.
// Connection checks a message against its entry (payload size, fds, protocol
// feature) before the handler runs, so handlers only see well-formed messages.
import type { Handlers } from './handlers.js';
import {
  decodeConfig,
  decodeMemTable,
  ProtocolError,
  ProtocolFeature,
  Req,
  requestName,
  SIZE_INFLIGHT,
  SIZE_LOG,
  SIZE_SINGLE_REGION,
  SIZE_U64,
  SIZE_VRING_ADDR,
  SIZE_VRING_STATE,
  VRING_NOFD_MASK,
} from './messages.js';

export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  /** Received with the message; whatever the handler leaves here is closed after it. */
  fds: number[];
}

/**
 * How many fds a request carries:
 * - none;
 * - one: exactly one;
 * - optional: zero or one (REM_MEM_REG: QEMU sends the fd, which is unused);
 * - vring: one, or none when the payload has the no-fd flag (KICK/CALL/ERR);
 * - regions: one per region of the table (SET_MEM_TABLE).
 */
export type FdRule = 'none' | 'one' | 'optional' | 'vring' | 'regions';

export interface RequestSpec {
  /** Exact payload size, or a validator that throws ProtocolError. */
  readonly size: number | ((request: number, payload: Uint8Array) => void);
  readonly fds: FdRule;
  /** Protocol feature that must be negotiated first. */
  readonly feature?: number;
  /**
   * The handler may wait (rings draining, a queue thread answering) and then
   * returns a promise; reading stops until it settles. Others run synchronously.
   */
  readonly waits?: boolean;
  readonly handle: (h: Handlers, msg: Message) => void | Promise<void>;
}

/** SET_LOG_FD carries its fd alone; the kernel's ioctl form has an int, so a u64 payload is accepted and ignored. */
function sizeNoneOrU64(request: number, payload: Uint8Array): void {
  if (payload.length !== 0 && payload.length !== SIZE_U64) {
    throw new ProtocolError(`${requestName(request)}: payload is ${payload.length} bytes, expected 0 or ${SIZE_U64}`);
  }
}

const entries: [Req, RequestSpec][] = [
  [Req.GET_FEATURES, { size: 0, fds: 'none', handle: (h, m) => h.getFeatures(m) }],
  [Req.SET_FEATURES, { size: SIZE_U64, fds: 'none', waits: true, handle: (h, m) => h.setFeatures(m) }],
  [Req.SET_OWNER, { size: 0, fds: 'none', handle: (h, m) => h.setOwner(m) }],
  [Req.RESET_OWNER, { size: 0, fds: 'none', waits: true, handle: (h, m) => h.resetOwner(m) }],
  [Req.SET_MEM_TABLE, { size: (_, p) => void decodeMemTable(p), fds: 'regions', waits: true, handle: (h, m) => h.setMemTable(m) }],
  [Req.SET_LOG_BASE, { size: SIZE_LOG, fds: 'one', feature: ProtocolFeature.LOG_SHMFD, waits: true, handle: (h, m) => h.setLogBase(m) }],
  [Req.SET_LOG_FD, { size: sizeNoneOrU64, fds: 'one', feature: ProtocolFeature.LOG_SHMFD, waits: true, handle: (h, m) => h.setLogFd(m) }],
  [Req.SET_VRING_NUM, { size: SIZE_VRING_STATE, fds: 'none', handle: (h, m) => h.setVringNum(m) }],
  [Req.SET_VRING_ADDR, { size: SIZE_VRING_ADDR, fds: 'none', waits: true, handle: (h, m) => h.setVringAddr(m) }],
  [Req.SET_VRING_BASE, { size: SIZE_VRING_STATE, fds: 'none', handle: (h, m) => h.setVringBase(m) }],
  [Req.GET_VRING_BASE, { size: SIZE_VRING_STATE, fds: 'none', waits: true, handle: (h, m) => h.getVringBase(m) }],
  [Req.SET_VRING_KICK, { size: SIZE_U64, fds: 'vring', waits: true, handle: (h, m) => h.setVringKick(m) }],
  [Req.SET_VRING_CALL, { size: SIZE_U64, fds: 'vring', waits: true, handle: (h, m) => h.setVringCall(m) }],
  [Req.SET_VRING_ERR, { size: SIZE_U64, fds: 'vring', waits: true, handle: (h, m) => h.setVringErr(m) }],
  [Req.GET_PROTOCOL_FEATURES, { size: 0, fds: 'none', handle: (h, m) => h.getProtocolFeatures(m) }],
  [Req.SET_PROTOCOL_FEATURES, { size: SIZE_U64, fds: 'none', handle: (h, m) => h.setProtocolFeatures(m) }],
  [Req.GET_QUEUE_NUM, { size: 0, fds: 'none', handle: (h, m) => h.getQueueNum(m) }],
  // Accepted before SET_FEATURES, without checking for PROTOCOL_FEATURES: QEMU's net front-end sends it that early.
  [Req.SET_VRING_ENABLE, { size: SIZE_VRING_STATE, fds: 'none', waits: true, handle: (h, m) => h.setVringEnable(m) }],
  [Req.SEND_RARP, { size: SIZE_U64, fds: 'none', feature: ProtocolFeature.RARP, handle: (h, m) => h.sendRarp(m) }],
  [Req.NET_SET_MTU, { size: SIZE_U64, fds: 'none', feature: ProtocolFeature.MTU, handle: (h, m) => h.netSetMtu(m) }],
  [Req.GET_CONFIG, { size: (r, p) => void decodeConfig(r, p), fds: 'none', feature: ProtocolFeature.CONFIG, handle: (h, m) => h.getConfig(m) }],
  [Req.SET_CONFIG, { size: (r, p) => void decodeConfig(r, p), fds: 'none', feature: ProtocolFeature.CONFIG, handle: (h, m) => h.setConfig(m) }],
  [Req.SET_BACKEND_REQ_FD, { size: 0, fds: 'one', feature: ProtocolFeature.BACKEND_REQ, handle: (h, m) => h.setBackendReqFd(m) }],
  [Req.GET_INFLIGHT_FD, { size: SIZE_INFLIGHT, fds: 'none', feature: ProtocolFeature.INFLIGHT_SHMFD, handle: (h, m) => h.getInflightFd(m) }],
  [Req.SET_INFLIGHT_FD, { size: SIZE_INFLIGHT, fds: 'one', feature: ProtocolFeature.INFLIGHT_SHMFD, handle: (h, m) => h.setInflightFd(m) }],
  [Req.RESET_DEVICE, { size: 0, fds: 'none', feature: ProtocolFeature.RESET_DEVICE, waits: true, handle: (h, m) => h.resetDevice(m) }],
  [Req.GET_MAX_MEM_SLOTS, { size: 0, fds: 'none', handle: (h, m) => h.getMaxMemSlots(m) }],
  [Req.ADD_MEM_REG, { size: SIZE_SINGLE_REGION, fds: 'one', feature: ProtocolFeature.CONFIGURE_MEM_SLOTS, waits: true, handle: (h, m) => h.addMemReg(m) }],
  [Req.REM_MEM_REG, { size: SIZE_SINGLE_REGION, fds: 'optional', feature: ProtocolFeature.CONFIGURE_MEM_SLOTS, waits: true, handle: (h, m) => h.remMemReg(m) }],
  [Req.SET_STATUS, { size: SIZE_U64, fds: 'none', feature: ProtocolFeature.STATUS, waits: true, handle: (h, m) => h.setStatus(m) }],
  [Req.GET_STATUS, { size: 0, fds: 'none', feature: ProtocolFeature.STATUS, handle: (h, m) => h.getStatus(m) }],
];

/** The requests this back-end implements; anything else closes the connection. */
export const REQUESTS: ReadonlyMap<number, RequestSpec> = new Map(entries);

const featureName = (bit: number): string =>
  Object.entries(ProtocolFeature).find(([, v]) => v === bit)?.[0] ?? `bit ${bit}`;

/** How many fds the message must carry: [min, max]. The size check has passed. */
function fdRange(rule: FdRule, payload: Uint8Array): [number, number] {
  switch (rule) {
    case 'none':
      return [0, 0];
    case 'one':
      return [1, 1];
    case 'optional':
      return [0, 1];
    case 'vring':
      return payload[1]! & (VRING_NOFD_MASK >> 8) ? [0, 0] : [1, 1];
    case 'regions': {
      const n = new DataView(payload.buffer, payload.byteOffset, 4).getUint32(0, true);
      return [n, n];
    }
  }
}

/**
 * The checks every message passes before its handler: known request, protocol
 * feature negotiated, payload size, fd count. Returns the entry to run.
 */
export function checkMessage(msg: Message, ackedProtocol: bigint): RequestSpec {
  const name = requestName(msg.request);
  const spec = REQUESTS.get(msg.request);
  if (!spec) throw new ProtocolError(`${name}: request not supported by this back-end`);
  if (spec.feature !== undefined && !(ackedProtocol & (1n << BigInt(spec.feature)))) {
    throw new ProtocolError(`${name} without the ${featureName(spec.feature)} protocol feature negotiated`);
  }
  if (typeof spec.size === 'number') {
    if (msg.payload.length !== spec.size) {
      throw new ProtocolError(`${name}: payload is ${msg.payload.length} bytes, expected ${spec.size}`);
    }
  } else {
    spec.size(msg.request, msg.payload);
  }
  const [min, max] = fdRange(spec.fds, msg.payload);
  const n = msg.fds.length;
  if (n < min || n > max) {
    const want = min === max ? `${min}` : `${min} or ${max}`;
    const why = spec.fds === 'vring' && max === 0 ? ' (the no-fd flag is set)' : spec.fds === 'regions' ? ` (one per region)` : '';
    throw new ProtocolError(`${name}: carries ${n} fds, expected ${want}${why}`);
  }
  return spec;
}
