// Shared by inflight.test.ts and lifecycle.test.ts: starting a device with an
// inflight area in QEMU's order, raw blk chains whose buffers the test can
// inspect, playing the part of a crashed back-end, and /proc probes of the
// daemon.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { native } from '../../src/native/index.js';
import { POISON, SECTOR } from '../driver/blk.js';
import type { FrontEnd } from '../driver/frontend.js';
import type { GuestMemory } from '../driver/guest.js';
import { InflightAreaView } from '../driver/inflight.js';
import { DRIVER_PROTOCOL, type Session } from '../driver/session.js';
import { SplitQueue, type Buf } from '../driver/virtqueue.js';
import { bit, has, PF, VF, type InflightMsg } from '../driver/wire.js';

export const INFLIGHT_PROTOCOL = DRIVER_PROTOCOL | bit(PF.INFLIGHT_SHMFD) | bit(PF.RESET_DEVICE);

export interface InflightHandle {
  desc: InflightMsg;
  fd: number;
  area: InflightAreaView;
  close(): void;
}

/** GET_INFLIGHT_FD and map the area; the handle owns the fd. */
export async function getInflight(fe: FrontEnd, numQueues: number, queueSize: number): Promise<InflightHandle> {
  const r = await fe.getInflightFd(numQueues, queueSize);
  const desc: InflightMsg = { mmapSize: r.mmapSize, mmapOffset: r.mmapOffset, numQueues: r.numQueues, queueSize: r.queueSize };
  let area: InflightAreaView;
  try {
    area = new InflightAreaView(r.fd, Number(r.mmapSize), r.numQueues, r.queueSize, Number(r.mmapOffset));
  } catch (e) {
    native.close(r.fd);
    throw e;
  }
  let closed = false;
  return {
    desc,
    fd: r.fd,
    area,
    close() {
      if (closed) return;
      closed = true;
      area.destroy();
      native.close(r.fd);
    },
  };
}

/** New rings in guest memory, registered with the session (as startDevice would). */
export function addQueues(s: Session, n: number, size: number, startIndex?: number): SplitQueue[] {
  const regions = [0, 2, 1, 0];
  const out: SplitQueue[] = [];
  for (let i = 0; i < n; i++) {
    const q = new SplitQueue(s.mem, s.queues.length, size, regions[i % regions.length]! % s.mem.regions.length);
    if (startIndex !== undefined) q.startAt(startIndex);
    q.eventIdx = has(s.features, VF.EVENT_IDX);
    s.queues.push(q);
    out.push(q);
  }
  return out;
}

export interface InflightStart {
  queues?: number;
  queueSize?: number;
  startIndex?: number;
  /** Protocol features to ask for (default INFLIGHT_PROTOCOL). */
  protocolFeatures?: bigint;
  /** Between GET_INFLIGHT_FD and SET_INFLIGHT_FD: publish requests, forge the area. */
  craft?: (h: InflightHandle, queues: SplitQueue[]) => void | Promise<void>;
}

/**
 * QEMU's vhost-user-blk start with INFLIGHT_SHMFD: negotiation, GET_INFLIGHT_FD
 * (once per device), SET_INFLIGHT_FD, then SET_FEATURES, SET_MEM_TABLE and the rings.
 */
export async function startWithInflight(s: Session, opts: InflightStart = {}): Promise<InflightHandle> {
  await s.negotiate({ protocolFeatures: opts.protocolFeatures ?? INFLIGHT_PROTOCOL });
  if (!has(s.protocol, PF.INFLIGHT_SHMFD)) throw new Error('back-end does not offer INFLIGHT_SHMFD');
  const size = opts.queueSize ?? 128;
  const qs = addQueues(s, opts.queues ?? 1, size, opts.startIndex);
  const h = await getInflight(s.fe, qs.length, size);
  try {
    await opts.craft?.(h, qs);
    await s.fe.setInflightFd(h.desc, h.fd);
    await s.startRings();
  } catch (e) {
    h.close();
    throw e;
  }
  return h;
}

// ---- raw blk requests: the test keeps every gpa, so it can play the back-end ----

export interface RawReq {
  head: number;
  type: number;
  sector: number;
  statusGpa: number;
  dataGpa: number;
  dataLen: number;
  out?: Uint8Array;
}

/** Header, optional data, status; published (not kicked). */
export function rawBlk(mem: GuestMemory, q: SplitQueue, type: number, sector: number, opts: { out?: Uint8Array; inLen?: number } = {}): RawReq {
  const hdr = mem.alloc(16, 16);
  const h = new Uint8Array(16);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, type, true);
  dv.setBigUint64(8, BigInt(sector), true);
  mem.write(hdr, h);
  const bufs: Buf[] = [{ gpa: hdr, len: 16, write: false }];
  const dataLen = opts.out?.length ?? opts.inLen ?? 0;
  let dataGpa = 0;
  if (dataLen) {
    dataGpa = mem.alloc(dataLen, SECTOR);
    if (opts.out) mem.write(dataGpa, opts.out);
    else mem.fill(dataGpa, dataLen, POISON);
    bufs.push({ gpa: dataGpa, len: dataLen, write: !opts.out });
  }
  const statusGpa = mem.alloc(1, 1);
  mem.fill(statusGpa, 1, POISON);
  bufs.push({ gpa: statusGpa, len: 1, write: true });
  const head = q.submit(bufs);
  return { head, type, sector, statusGpa, dataGpa, dataLen, out: opts.out };
}

export function status(mem: GuestMemory, r: RawReq): number {
  return mem.read(r.statusGpa, 1)[0]!;
}

/**
 * Play a back-end that completed these chains: used elements, then used->idx.
 * Returns the new used idx. The driver still has to collect() them.
 */
export function forgeUsed(mem: GuestMemory, q: SplitQueue, reqs: RawReq[], st = 0): number {
  const bytes = mem.view(q.usedGpa, 6 + 8 * q.size);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  let idx = Atomics.load(u16, 1);
  for (const r of reqs) {
    mem.fill(r.statusGpa, 1, st);
    const slot = idx % q.size;
    dv.setUint32(4 + slot * 8, r.head, true);
    dv.setUint32(8 + slot * 8, r.type === 0 ? r.dataLen + 1 : 1, true);
    idx = (idx + 1) & 0xffff;
  }
  Atomics.store(u16, 1, idx);
  return idx;
}

/** Fisher-Yates with a fixed seed: shuffled, yet the same every run. */
export function shuffled<T>(xs: readonly T[], seed = 12345): T[] {
  const a = xs.slice();
  let x = seed >>> 0;
  const rnd = (): number => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

// ---- /proc probes of the daemon ----

export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** What each fd points at, for failure messages. */
export function fdTargets(pid: number): string[] {
  const out: string[] = [];
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    try {
      out.push(`${n} -> ${readlinkSync(`/proc/${pid}/fd/${n}`)}`);
    } catch {
      /* closed meanwhile */
    }
  }
  return out;
}

/** Lines of /proc/pid/maps that map a memfd. */
export function memfdMaps(pid: number): string[] {
  return readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.includes('memfd:'));
}

export function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]);
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
