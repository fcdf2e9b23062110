// Ring fuzzer: a hostile guest. A healthy protocol session runs two queues;
// queue 0 gets random and adversarial descriptor layouts (loops, next out of
// range, nested or oversized indirect tables, lengths past 4 GiB, buffers
// outside or straddling memory, avail idx jumps, heads out of range, chains
// without a status byte, sectors past the end, random types, random bytes in
// the descriptor table) while queue 1 keeps doing verified I/O.
//
// Each input is judged against a model of the split ring (VIRTIO 1.x 2.7) and
// of virtio-blk (5.2.6) written here, not taken from vhostd: a malformed chain
// must fail the queue (err eventfd, log line) and consume nothing after it; a
// well-formed one must complete with the right status and used length; and
// no byte may change, in the image or in guest memory, unless a request the
// device reported OK was allowed to change it.
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { native, EFD_CLOEXEC, EFD_NONBLOCK, POLL_READABLE, type WatchHandle } from '../../src/native/index.js';
import { BlkQueue, POISON as POISON_BLK, S, T } from '../driver/blk.js';
import { GiB, GuestMemory, KiB, MiB } from '../driver/guest.js';
import { DRIVER_FEATURES, DRIVER_PROTOCOL } from '../driver/session.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SplitQueue } from '../driver/virtqueue.js';
import { bit, configMsg, F_NEED_REPLY, has, memTable, PF, readU64, Req, reqName, u64, VERSION, VF, vringAddr, vringState } from '../driver/wire.js';
import { frame, RawConn } from './client.js';
import {
  checkLeaks,
  connectAccepted,
  describeFailure,
  withDefaults,
  idleState,
  sleep,
  Suppressor,
  Ticker,
  type Baseline,
  type Failure,
  type FuzzStats,
  type RunOptions,
} from './common.js';
import { FuzzDaemon, summarizeLogLine } from './daemon.js';
import { Rng } from './prng.js';

// ---------------------------------------------------------------- layout

const SECTOR = 512;
const IMAGE_BYTES = 4 * MiB;
const CAPACITY = IMAGE_BYTES / SECTOR;
/** Sectors [0, Q1_SECTORS) belong to queue 1's verified traffic; queue 0 writes only above. */
const Q1_SECTORS = 64;
const SERIAL = 'vhostd-fuzz';
const POISON = 0xa5;
const WAIT_MS = 2_000;
/**
 * Peak RSS (VmHWM) the daemon may reach while the ring fuzzer runs: measured
 * at about 100 MiB with 16 MiB of guest memory mapped (see README.md). A
 * layer that held whole walks of 65,536-entry tables per avail entry went
 * past 4 GB.
 */
export const RSS_BOUND = 256 * MiB;

// Guest memory: r0 and r1 are adjacent (0..8 MiB), r2 and r3 too (4 GiB..4 GiB+8 MiB); nothing between.
const R0 = 0;
const R1 = 4 * MiB;
const LOW_END = 8 * MiB;
const R2 = 4 * GiB;
const R3 = 4 * GiB + 4 * MiB;
const HIGH_END = 4 * GiB + 8 * MiB;
/** Device-writable buffers: r0's unallocated tail guard and all of r1, so buffers can straddle r0/r1. */
const W_START = R1 - 64 * KiB;
const W_END = LOW_END;
/** Request headers and discard segments, written per input. */
const H_START = R2;
const H_END = R2 + 256 * KiB;
/** Static random bytes: OUT data (straddles r2/r3). */
const S_START = H_END;
const S_END = R3 + 2 * MiB;
/** Indirect tables. */
const T_START = S_END;
const T_END = HIGH_END;


function pattern(sector: number, out: Uint8Array, off = 0): void {
  const dv = new DataView(out.buffer, out.byteOffset + off, SECTOR);
  for (let i = 0; i < SECTOR / 4; i++) dv.setUint32(i * 4, (Math.imul(sector + 1, 0x9e3779b1) ^ Math.imul(i + 7, 0x01000193)) >>> 0, true);
}

const PATTERN_IMAGE = (() => {
  const b = new Uint8Array(IMAGE_BYTES);
  for (let s = 0; s < CAPACITY; s++) pattern(s, b, s * SECTOR);
  return b;
})();
const ZERO_SECTOR = new Uint8Array(SECTOR);

// ---------------------------------------------------------------- the guest

/** A bump allocator over [start, end). */
class Arena {
  cur: number;
  constructor(
    readonly start: number,
    readonly end: number,
  ) {
    this.cur = start;
  }
  alloc(len: number, align = 1): number | undefined {
    const a = Math.ceil(this.cur / align) * align;
    if (a + len > this.end) return undefined;
    this.cur = a + len;
    return a;
  }
  reset(): void {
    this.cur = this.start;
  }
}

interface DescRec {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** Guest memory plus fast accessors and shadows of everything the device may only read. */
class Guest {
  readonly mem: GuestMemory;
  /** Region bytes by index. */
  private readonly r: Uint8Array[];
  /** What H, S and T must contain (the device never writes readable buffers). */
  readonly shadowH = new Uint8Array(H_END - H_START);
  readonly shadowS: Uint8Array;
  readonly shadowT = new Uint8Array(T_END - T_START);

  constructor(rng: Rng) {
    this.mem = new GuestMemory([
      { gpa: R0, size: 4 * MiB, mmapOffset: 0 },
      { gpa: R1, size: 4 * MiB, mmapOffset: 2 * MiB },
      { gpa: R2, size: 4 * MiB, mmapOffset: 3 * GiB },
      { gpa: R3, size: 4 * MiB, mmapOffset: 1 * GiB },
    ]);
    this.r = this.mem.regions.map((x) => x.bytes);
    this.shadowS = rng.bytes(S_END - S_START);
    this.mem.write(S_START, this.shadowS);
    this.mem.fill(W_START, W_END - W_START, POISON);
  }

  /** Bytes and offset of gpa, within one region. */
  at(gpa: number): [Uint8Array, number] {
    if (gpa < R1) return [this.r[0]!, gpa];
    if (gpa < LOW_END) return [this.r[1]!, gpa - R1];
    if (gpa >= R2 && gpa < R3) return [this.r[2]!, gpa - R2];
    return [this.r[3]!, gpa - R3];
  }

  dv(gpa: number, len: number): DataView {
    const [b, o] = this.at(gpa);
    return new DataView(b.buffer, b.byteOffset + o, len);
  }

  /** Write readable bytes (H or T), keeping the shadow in step. */
  writeRO(gpa: number, data: Uint8Array): void {
    this.mem.write(gpa, data);
    if (gpa >= H_START && gpa + data.length <= H_END) this.shadowH.set(data, gpa - H_START);
    else if (gpa >= T_START && gpa + data.length <= T_END) this.shadowT.set(data, gpa - T_START);
    else throw new Error(`fuzzer bug: read-only write at 0x${gpa.toString(16)}`);
  }

  writeTable(gpa: number, descs: DescRec[]): void {
    const b = new Uint8Array(16 * descs.length);
    const v = new DataView(b.buffer);
    descs.forEach((d, i) => putDesc(v, i, d));
    this.writeRO(gpa, b);
  }

  read(gpa: number, len: number): Uint8Array {
    return this.mem.read(gpa, len);
  }
}

function putDesc(v: DataView, i: number, d: DescRec): void {
  v.setBigUint64(i * 16, BigInt.asUintN(64, d.addr), true);
  v.setUint32(i * 16 + 8, d.len >>> 0, true);
  v.setUint16(i * 16 + 12, d.flags & 0xffff, true);
  v.setUint16(i * 16 + 14, d.next & 0xffff, true);
}

function getDesc(v: DataView, i: number): DescRec {
  return { addr: v.getBigUint64(i * 16, true), len: v.getUint32(i * 16 + 8, true), flags: v.getUint16(i * 16 + 12, true), next: v.getUint16(i * 16 + 14, true) };
}

// ---------------------------------------------------------------- the model

interface Seg {
  gpa: number;
  len: number;
}

/** Where a descriptor's buffer lies: the region pieces it resolves to, or 0 if any byte is outside guest memory. */
function pieces2(a: number, len: number): number {
  const regions: [number, number][] = [[R0, R1], [R1, LOW_END], [R2, R3], [R3, HIGH_END]];
  let n = 0;
  for (let at = a, end = a + len; at < end; ) {
    const r = regions.find(([s, e]) => at >= s && at < e);
    if (!r) return 0;
    n++;
    at = r[1];
  }
  return n;
}

/** Inside one region (indirect tables must be: vhostd maps each through one view). */
const inOneRegion = (a: number, len: number): boolean =>
  [[R0, R1], [R1, LOW_END], [R2, R3], [R3, HIGH_END]].some(([s, e]) => a >= s! && a + len <= e!);

interface Walk {
  /** Why the device must refuse to serve the chain as the driver meant it (IOERR when it has a status byte). */
  fault?: string;
  /** The status byte: the chain's last byte, when the walk reached its end and the last non-empty descriptor is writable and in memory. */
  status?: number;
  /** Non-empty buffers, one per descriptor, in chain order. */
  readable: Seg[];
  writable: Seg[];
  rBytes: number;
  wBytes: number;
  /** Views the chain resolves to (split at region boundaries). */
  segments: number;
  /** Buffer descriptors (not the indirect one). */
  descriptors: number;
}

const MAX_SEGMENTS = 1024;
const SEG_MAX = 126;
const SIZE_MAX = 1 << 20;
const REACHABLE = 65536;

/**
 * Walk a chain as VIRTIO 1.x 2.7.5 defines it, with the bounds vhostd
 * documents (src/limits.ts): a chain is at most queue-size descriptors and
 * MAX_CHAIN_SEGMENTS views, an indirect table at most queue-size entries, and
 * a faulty chain is still followed to its end (when it has one) to find the
 * status byte. Loops, next out of range, nested or malformed indirect
 * descriptors and tables outside memory end the walk with no status byte.
 */
function walk(desc: DataView, size: number, head: number, indirectOk: boolean, g: Guest): Walk {
  const w: Walk = { readable: [], writable: [], rBytes: 0, wBytes: 0, segments: 0, descriptors: 0 };
  let table = desc;
  let tableLen = size;
  let budget = size;
  let idx = head;
  let inIndirect = false;
  let writing = false;
  let total = 0;
  let status = -1;
  const fault = (why: string): void => {
    w.fault ??= why;
  };
  const end = (why: string): Walk => {
    fault(why);
    return w; // no status byte
  };
  for (;;) {
    if (budget-- === 0) return end(`loop: chain from head ${head} does not end within its table`);
    const d = getDesc(table, idx);
    if (d.flags & DESC_F_INDIRECT) {
      if (!indirectOk) return end('indirect descriptor without INDIRECT_DESC');
      if (inIndirect) return end('nested indirect table');
      if (d.flags & DESC_F_NEXT) return end('indirect descriptor with NEXT');
      if (d.len === 0 || d.len % 16) return end(`indirect table length ${d.len}`);
      const entries = d.len / 16;
      if (entries > size) fault(`indirect table of ${entries} entries, queue size ${size}`);
      const reach = Math.min(entries, REACHABLE);
      if (d.addr >= 2n ** 53n || !inOneRegion(Number(d.addr), reach * 16)) return end('indirect table outside guest memory (or across regions)');
      table = g.dv(Number(d.addr), reach * 16);
      tableLen = reach;
      budget = reach;
      idx = 0;
      inIndirect = true;
      continue;
    }
    const writable = (d.flags & DESC_F_WRITE) !== 0;
    if (writable) writing = true;
    else if (writing) fault('readable descriptor after a writable one');
    total += d.len;
    if (total > 2 ** 32 - 1) fault('chain moves more than 4 GiB');
    if (d.len > 0) {
      const a = Number(d.addr);
      const n = d.addr < 2n ** 53n && a + d.len <= Number.MAX_SAFE_INTEGER ? pieces2(a, d.len) : 0;
      if (!n) fault(`buffer 0x${d.addr.toString(16)} +${d.len} outside guest memory`);
      else {
        w.segments += n;
        (writable ? w.writable : w.readable).push({ gpa: a, len: d.len });
      }
      status = writable && n ? a + d.len - 1 : -1;
      if (writable) w.wBytes += d.len;
      else w.rBytes += d.len;
    }
    if (++w.descriptors === size + 1) fault(`chain longer than the queue (${size})`);
    if (!(d.flags & DESC_F_NEXT)) break;
    if (d.next >= tableLen) return end(`next ${d.next} beyond a table of ${tableLen}`);
    idx = d.next;
  }
  if (w.segments > MAX_SEGMENTS) fault(`${w.segments} segments, more than ${MAX_SEGMENTS}`);
  if (status >= 0) w.status = status;
  return w;
}

type Effect = { kind: 'write'; sector: number; data: Uint8Array } | { kind: 'zero'; ranges: [number, number][] };

interface BlkExpect {
  /** 'ok'; 'err' (IOERR or UNSUPP, used length 1); 'either' (a known bug class, tolerated). */
  outcome: 'ok' | 'err' | 'either';
  /** Bug class this request belongs to, if any (see Suppressor). */
  tag?: string;
  /** Used length when OK. */
  usedLen: number;
  why: string;
  type: number;
  effect?: Effect;
  /** OK IN: sector and the writable segments holding the data. */
  readCheck?: { sector: number; len: number };
  getId?: boolean;
  status: Seg;
}

function gatherSegs(g: Guest, segs: Seg[], skip: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  let got = 0;
  for (const s of segs) {
    if (got === len) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    const n = Math.min(s.len - skip, len - got);
    out.set(g.read(s.gpa + skip, n), got);
    got += n;
    skip = 0;
  }
  return out;
}

/** Descriptors a data range [skip, skip+len) of one direction spans, and the most bytes it takes from one (seg_max, size_max). */
function span(segs: Seg[], skip: number, len: number): { descs: number; largest: number } {
  let descs = 0;
  let largest = 0;
  for (const s of segs) {
    if (len <= 0) break;
    if (skip >= s.len) {
      skip -= s.len;
      continue;
    }
    const n = Math.min(s.len - skip, len);
    descs++;
    largest = Math.max(largest, n);
    len -= n;
    skip = 0;
  }
  return { descs, largest };
}

/** virtio-blk (VIRTIO 1.x 5.2.6) for a chain with a status byte, as vhostd advertises it (seg_max 126, size_max 1 MiB). */
function blkModel(g: Guest, w: Walk, features: bigint, avoid?: Set<string>): BlkExpect {
  const status: Seg = { gpa: w.status!, len: 1 };
  const e = (why: string, type = -1): BlkExpect => ({ outcome: 'err', usedLen: 1, why, type, status });
  if (w.fault) return e(`faulty chain: ${w.fault}`);
  if (w.rBytes < 16) return e(`header of ${w.rBytes} bytes`);
  const hdr = new DataView(gatherSegs(g, w.readable, 0, 16).buffer);
  const type = hdr.getUint32(0, true);
  const sector = hdr.getBigUint64(8, true);
  const range = (len: number): string | undefined => {
    if (len % SECTOR) return `length ${len} not a multiple of 512`;
    if (sector * 512n + BigInt(len) > BigInt(IMAGE_BYTES)) return `sector ${sector} +${len} past the end`;
    return undefined;
  };
  const limits = (segs: Seg[], skip: number, len: number): string | undefined => {
    const sp = span(segs, skip, len);
    if (sp.descs > SEG_MAX) return `${sp.descs} data descriptors, seg_max ${SEG_MAX}`;
    if (sp.largest > SIZE_MAX) return `a data descriptor of ${sp.largest} bytes, size_max ${SIZE_MAX}`;
    return undefined;
  };
  switch (type) {
    case T.IN: {
      const len = w.wBytes - 1;
      const r = range(len) ?? limits(w.writable, 0, len);
      if (r) return e(r, type);
      return { outcome: 'ok', usedLen: len + 1, why: 'read', type, status, readCheck: { sector: Number(sector), len } };
    }
    case T.OUT: {
      const len = w.rBytes - 16;
      const r = range(len) ?? limits(w.readable, 16, len);
      if (r) return e(r, type);
      return { outcome: 'ok', usedLen: 1, why: 'write', type, status, effect: { kind: 'write', sector: Number(sector), data: gatherSegs(g, w.readable, 16, len) } };
    }
    case T.FLUSH:
      return { outcome: 'ok', usedLen: 1, why: 'flush', type, status };
    case T.GET_ID:
      if (w.wBytes - 1 < 20) return e(`GET_ID buffer of ${w.wBytes - 1} bytes`, type);
      return { outcome: 'ok', usedLen: 21, why: 'get id', type, status, getId: true };
    case T.DISCARD:
    case T.WRITE_ZEROES: {
      if (!has(features, type === T.DISCARD ? VF.BLK_DISCARD : VF.BLK_WRITE_ZEROES)) return e('feature not negotiated', type);
      const bytes = w.rBytes - 16;
      if (bytes === 0 || bytes % 16 || bytes / 16 > 16) return e(`${bytes} bytes of segments`, type);
      const segs = new DataView(gatherSegs(g, w.readable, 16, bytes).buffer);
      const ranges: [number, number][] = [];
      for (let i = 0; i < bytes / 16; i++) {
        const s = segs.getBigUint64(i * 16, true);
        const n = segs.getUint32(i * 16 + 8, true);
        const flags = segs.getUint32(i * 16 + 12, true);
        if (n > 0x3fffff) return e('segment larger than max_discard_sectors', type);
        if (flags & ~(type === T.WRITE_ZEROES ? 1 : 0)) return e(`segment flags 0x${flags.toString(16)}`, type);
        if (s * 512n + BigInt(n) * 512n > BigInt(IMAGE_BYTES)) return e('segment past the end', type);
        ranges.push([Number(s), n]);
      }
      const why = type === T.DISCARD ? 'discard' : 'write zeroes';
      // A segment of zero sectors is a no-op (QEMU completes it OK). Once a run has confirmed that
      // vhostd fails it, tolerate either status (and the earlier segments it already applied).
      if (ranges.some(([, n]) => n === 0)) {
        const tag = 'zero-sector-segment';
        if (avoid?.has(tag)) return { outcome: 'either', usedLen: 1, why: `${why} with a zero-sector segment`, type, status, tag, effect: { kind: 'zero', ranges } };
        return { outcome: 'ok', usedLen: 1, why: `${why} with a zero-sector segment`, type, status, tag, effect: { kind: 'zero', ranges } };
      }
      return { outcome: 'ok', usedLen: 1, why, type, status, effect: { kind: 'zero', ranges } };
    }
    default:
      return { ...e(`unknown type ${type}`, type) };
  }
}

// ---------------------------------------------------------------- inputs

interface Planned {
  /** Heads in avail order (may include out-of-range ones). */
  heads: number[];
  /** What each published head is, for failure messages. */
  notes: string[];
  /** avail idx set this far past the published entries (a jump). */
  jump?: number;
  /** used_event / flags set to hostile values: interrupts may not come. */
  noInterrupts?: boolean;
  /** A GET_ID whose buffer covers the avail ring (guest feeding the device its own writes). */
  selfFeed?: boolean;
  tags: Set<string>;
  /** W's allocation cursor before this input: buffers from here on are fresh (poisoned). */
  wFrom: number;
}

interface Q0 {
  size: number;
  descGpa: number;
  availGpa: number;
  usedGpa: number;
  desc: DataView;
  avail: Uint16Array;
  used: Uint16Array;
  usedDv: DataView;
  /** Next avail idx to publish at / what SET_VRING_BASE gives. */
  availIdx: number;
  lastUsed: number;
  kick: number;
  call: number;
  err: number;
}

class Gen {
  readonly h = new Arena(H_START, H_END);
  readonly t = new Arena(T_START, T_END);
  readonly w = new Arena(W_START, W_END);
  /** Writable ranges handed out since W was last poisoned. */
  wRanges: Seg[] = [];
  /** Bug classes not to generate (see Suppressor). */
  avoid = new Set<string>();
  private free: number[] = [];

  constructor(
    readonly g: Guest,
    readonly rng: Rng,
    readonly q: Q0,
    readonly indirectOk: boolean,
  ) {
    this.free = rng.shuffle(Array.from({ length: q.size }, (_, i) => i));
    this.h.reset();
    this.t.reset();
  }

  /** A writable buffer (poisoned); undefined when W is full for this epoch. */
  wbuf(len: number, straddle = false): number | undefined {
    if (straddle) {
      // Across the r0/r1 boundary, once per epoch at most (the spot is fixed).
      if (this.w.cur <= R1 - len && len <= 32 * KiB) {
        this.w.cur = R1 + len; // everything below is now used
        const a = R1 - this.rng.range(1, len - 1 || 1);
        this.wRanges.push({ gpa: a, len });
        return a;
      }
    }
    const a = this.w.alloc(len, this.rng.pick([1, 2, 8, 512]));
    if (a === undefined) return undefined;
    if (len) this.wRanges.push({ gpa: a, len });
    return a;
  }

  /** Bytes of static random data (readable), optionally across the r2/r3 boundary. */
  sbuf(len: number): number {
    const { rng } = this;
    if (len <= 64 * KiB && rng.chance(0.1)) return R3 - rng.range(1, Math.max(1, len - 1));
    return S_START + rng.int(S_END - S_START - len + 1);
  }

  header(type: number, sector: bigint | number, extra?: Uint8Array): number {
    const b = new Uint8Array(16 + (extra?.length ?? 0));
    const v = new DataView(b.buffer);
    v.setUint32(0, type >>> 0, true);
    v.setUint32(4, this.rng.chance(0.05) ? this.rng.u32() : 0, true);
    v.setBigUint64(8, BigInt.asUintN(64, BigInt(sector)), true);
    if (extra) b.set(extra, 16);
    const a = this.h.alloc(b.length, this.rng.pick([1, 8, 16]));
    if (a === undefined) throw new Error('fuzzer bug: header arena full');
    this.g.writeRO(a, b);
    return a;
  }

  get freeSlots(): number {
    return this.free.length;
  }

  takeSlots(n: number): number[] | undefined {
    if (this.free.length < n) return undefined;
    return this.free.splice(0, n);
  }

  /** Split [gpa, gpa+len) into 1..k pieces, some of zero length. */
  split(gpa: number, len: number, write: boolean, maxPieces: number): DescRec[] {
    const { rng } = this;
    const k = Math.min(maxPieces, rng.weighted([[6, 1], [3, 2], [2, 3], [1, rng.range(4, 8)]] as const));
    const cuts = new Set<number>([0, len]);
    for (let i = 1; i < k; i++) cuts.add(rng.int(len + 1));
    const c = [...cuts].sort((a, b) => a - b);
    const out: DescRec[] = [];
    for (let i = 0; i + 1 < c.length; i++) out.push({ addr: BigInt(gpa + c[i]!), len: c[i + 1]! - c[i]!, flags: write ? DESC_F_WRITE : 0, next: 0 });
    if (rng.chance(0.05)) out.splice(rng.int(out.length + 1), 0, { addr: BigInt(gpa), len: 0, flags: write ? DESC_F_WRITE : 0, next: 0 });
    return out;
  }

  /** Lay pieces out as a chain (direct, indirect or both) and write it; returns the head. */
  place(pieces: DescRec[], corrupt?: (layout: Layout) => void): number | undefined {
    const { rng, q } = this;
    let mode = rng.weighted([[5, 'direct'], [3, 'indirect'], [1, 'mixed']] as const);
    if (!this.indirectOk && rng.chance(0.95)) mode = 'direct';
    if (mode === 'direct' && pieces.length > Math.min(q.size, this.free.length)) mode = 'indirect';
    let nDirect = mode === 'direct' ? pieces.length : mode === 'indirect' ? 0 : rng.int(pieces.length);
    if (mode !== 'direct' && nDirect + 1 > this.free.length) return undefined;
    const slots = this.takeSlots(mode === 'direct' ? pieces.length : nDirect + 1);
    if (!slots) return undefined;
    const layout: Layout = { direct: [], slots };
    for (let i = 0; i < nDirect; i++) layout.direct.push({ ...pieces[i]!, flags: pieces[i]!.flags | DESC_F_NEXT, next: slots[i + 1]! });
    if (mode === 'direct') {
      const lastD = layout.direct[layout.direct.length - 1]!;
      lastD.flags &= ~DESC_F_NEXT;
      lastD.next = rng.chance(0.5) ? 0 : rng.int(q.size);
    } else {
      const rest = pieces.slice(nDirect).map((p, i, a) => ({ ...p, flags: p.flags | (i < a.length - 1 ? DESC_F_NEXT : 0), next: i < a.length - 1 ? i + 1 : 0 }));
      // Indirect tables may list their descriptors in any order.
      if (rest.length > 2 && rng.chance(0.2)) shuffleTable(rng, rest);
      const tgpa = this.t.alloc(16 * rest.length, 16);
      if (tgpa === undefined) return undefined;
      layout.table = { gpa: tgpa, descs: rest };
      layout.direct.push({ addr: BigInt(tgpa), len: 16 * rest.length, flags: DESC_F_INDIRECT | (rng.chance(0.05) ? DESC_F_WRITE : 0), next: 0 });
      nDirect++;
    }
    corrupt?.(layout);
    layout.direct.forEach((d, i) => putDesc(q.desc, layout.slots[i]!, d));
    if (layout.table) this.g.writeTable(layout.table.gpa, layout.table.descs);
    return layout.slots[0]!;
  }
}

interface Layout {
  direct: DescRec[];
  slots: number[];
  table?: { gpa: number; descs: DescRec[] };
}

/** Reorder a table's descriptors keeping the chain: entry 0 stays the first. */
function shuffleTable(rng: Rng, t: DescRec[]): void {
  const order = [0, ...rng.shuffle(Array.from({ length: t.length - 1 }, (_, i) => i + 1))];
  const pos = new Map(order.map((old, nw) => [old, nw]));
  const out = order.map((old) => ({ ...t[old]! }));
  for (const d of out) if (d.flags & DESC_F_NEXT) d.next = pos.get(d.next)!;
  t.splice(0, t.length, ...out);
}

/** A well-formed request's pieces, or with bad contents ('semantic'). */
function request(gen: Gen, semantic: boolean): { pieces: DescRec[]; note: string } | undefined {
  const { rng } = gen;
  const type = rng.weighted([[5, T.IN], [5, T.OUT], [1, T.FLUSH], [1, T.GET_ID], [1, T.DISCARD], [1, T.WRITE_ZEROES]] as const);
  let n = rng.weighted([[4, rng.range(1, 8)], [2, rng.range(9, 64)], [1, 0], [1, rng.range(65, 128)]] as const);
  let sector: bigint = BigInt(Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS - n + 1));
  let bad = '';
  let extraBytes = 0; // data length not a multiple of 512
  let noStatus = false;
  let shortHeader = 0;
  let typeField: number = type;
  let idRoom = 20;
  let segs: { s: bigint; n: number; f: number }[] | undefined;
  if (type === T.DISCARD || type === T.WRITE_ZEROES) {
    segs = Array.from({ length: rng.range(1, 4) }, () => {
      const k = rng.chance(0.03) && !gen.avoid.has('zero-sector-segment') ? 0 : rng.range(1, 64);
      return { s: BigInt(Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS - k + 1)), n: k, f: type === T.WRITE_ZEROES && rng.chance(0.5) ? 1 : 0 };
    });
  }
  if (semantic) {
    bad = rng.pick(['past-end', 'straddle-end', 'huge-sector', 'odd-length', 'no-status', 'short-header', 'type', 'get-id-small', 'segments']);
    switch (bad) {
      case 'past-end':
        sector = BigInt(CAPACITY + rng.int(1000));
        if (n === 0) n = 1;
        break;
      case 'straddle-end':
        n = Math.max(n, 2);
        sector = BigInt(CAPACITY - rng.range(1, n - 1));
        break;
      case 'huge-sector':
        sector = rng.pick([2n ** 55n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 8n, 2n ** 54n + 1n]);
        break;
      case 'odd-length':
        extraBytes = rng.range(1, 511);
        break;
      case 'no-status':
        noStatus = true;
        break;
      case 'short-header':
        shortHeader = rng.range(1, 15);
        break;
      case 'type':
        typeField = rng.pick([2, 3, 5, 6, 7, 9, 10, 12, 14, 15, 16, 0xff, 0x80000000, rng.u32()]);
        break;
      case 'get-id-small':
        typeField = T.GET_ID;
        idRoom = rng.int(20);
        break;
      case 'segments': {
        typeField = rng.pick([T.DISCARD, T.WRITE_ZEROES]);
        const k = rng.pick([0, 17, 20]);
        segs = Array.from({ length: k }, () => ({ s: BigInt(Q1_SECTORS), n: 1, f: 0 }));
        if (k === 0 || rng.chance(0.5)) {
          segs.push(rng.pick([
            { s: BigInt(Q1_SECTORS), n: 0x400000, f: 0 },
            { s: BigInt(CAPACITY - 1), n: 2, f: 0 },
            { s: 2n ** 63n, n: 1, f: 0 },
            { s: BigInt(Q1_SECTORS), n: 1, f: typeField === T.DISCARD ? 1 : 2 },
            { s: BigInt(Q1_SECTORS), n: 1, f: rng.u32() | 2 },
          ]));
        }
        break;
      }
    }
  }
  const pieces: DescRec[] = [];
  const segBytes = segs ? (() => {
    const b = new Uint8Array(16 * segs.length);
    const v = new DataView(b.buffer);
    segs.forEach((s, i) => {
      v.setBigUint64(i * 16, BigInt.asUintN(64, s.s), true);
      v.setUint32(i * 16 + 8, s.n, true);
      v.setUint32(i * 16 + 12, s.f, true);
    });
    return rng.chance(0.1) && b.length > 1 ? b.subarray(0, b.length - rng.range(1, 15)) : b;
  })() : undefined;
  const isSegType = typeField === T.DISCARD || typeField === T.WRITE_ZEROES;
  const mergeHeader = rng.chance(0.3);
  const dataLen = n * SECTOR + extraBytes;
  // Readable: header (+ segments) (+ OUT data).
  if (shortHeader) {
    const h = gen.header(typeField, sector);
    pieces.push({ addr: BigInt(h), len: shortHeader, flags: 0, next: 0 });
  } else if (isSegType && segBytes) {
    const h = gen.header(typeField, sector, segBytes);
    pieces.push(...(mergeHeader ? [{ addr: BigInt(h), len: 16 + segBytes.length, flags: 0, next: 0 }] : gen.split(h, 16 + segBytes.length, false, 4)));
  } else {
    const h = gen.header(typeField, sector);
    pieces.push(...gen.split(h, 16, false, rng.chance(0.1) ? 3 : 1));
  }
  if (typeField === T.OUT && !shortHeader) {
    const d = gen.sbuf(dataLen);
    pieces.push(...gen.split(d, dataLen, false, 6));
  }
  // Writable: IN data / GET_ID buffer, then the status byte.
  let wLen = 0;
  if (typeField === T.IN || (type === T.IN && bad === 'type')) wLen = dataLen;
  if (typeField === T.GET_ID) wLen = idRoom;
  if (!noStatus) {
    const mergedStatus = wLen > 0 && rng.chance(0.3);
    if (wLen > 0) {
      const a = gen.wbuf(wLen + (mergedStatus ? 1 : 0), rng.chance(0.05));
      if (a === undefined) return undefined;
      gen.g.mem.fill(a, wLen + (mergedStatus ? 1 : 0), POISON);
      pieces.push(...gen.split(a, wLen + (mergedStatus ? 1 : 0), true, 6));
    }
    if (!mergedStatus) {
      const a = gen.wbuf(1);
      if (a === undefined) return undefined;
      pieces.push({ addr: BigInt(a), len: 1, flags: DESC_F_WRITE, next: 0 });
    }
  } else if (typeField === T.IN) {
    // Data but no room for a status byte past it: make the data readable so nothing is writable.
    for (const p of pieces) p.flags &= ~DESC_F_WRITE;
  }
  if (semantic && bad === 'short-header' && rng.chance(0.3)) {
    // The header in a device-writable buffer: nothing readable at all.
    pieces[0]!.flags |= DESC_F_WRITE;
    const a = gen.wbuf(pieces[0]!.len);
    if (a === undefined) return undefined;
    pieces[0]!.addr = BigInt(a);
  }
  return { pieces, note: `${semantic ? `semantic:${bad} ` : ''}type ${typeField} sector ${sector} ${n} sectors` };
}

/** Corruptions that make a chain malformed. */
const STRUCTURAL = [
  'loop', 'self-loop', 'next-oor', 'nested', 'indirect-next', 'indirect-len', 'indirect-outside', 'buf-outside', 'buf-gap-straddle',
  'wrap', 'read-after-write', 'too-long', 'huge-len', 'beyond-2^53', 'indirect-huge',
] as const;

function structural(gen: Gen): { head: number; note: string } | undefined {
  const { rng, q } = gen;
  const kind = rng.pick(STRUCTURAL);
  if (kind === 'too-long') {
    // Readable buffers summing past 4 GiB, each inside memory (6 MiB of static data, many times).
    if (!gen.indirectOk) return undefined;
    const k = rng.range(690, 800);
    const h = gen.header(T.OUT, Q1_SECTORS);
    const descs: DescRec[] = [{ addr: BigInt(h), len: 16, flags: DESC_F_NEXT, next: 1 }];
    for (let i = 1; i < k; i++) descs.push({ addr: BigInt(S_START), len: S_END - S_START, flags: DESC_F_NEXT, next: i + 1 });
    const st = gen.wbuf(1);
    if (st === undefined) return undefined;
    descs.push({ addr: BigInt(st), len: 1, flags: DESC_F_WRITE, next: 0 });
    const t = gen.t.alloc(16 * descs.length, 16);
    const slots = gen.takeSlots(1);
    if (t === undefined || !slots) return undefined;
    gen.g.writeTable(t, descs);
    putDesc(q.desc, slots[0]!, { addr: BigInt(t), len: 16 * descs.length, flags: DESC_F_INDIRECT, next: 0 });
    return { head: slots[0]!, note: `structural:too-long ${k} x 6 MiB` };
  }
  if (kind === 'indirect-huge') {
    // An indirect table of 140000 descriptors (2.2 MiB of static random bytes): more than any queue.
    if (!gen.indirectOk) return undefined;
    const slots = gen.takeSlots(1);
    if (!slots) return undefined;
    putDesc(q.desc, slots[0]!, { addr: BigInt(S_START), len: 16 * 140_000, flags: DESC_F_INDIRECT, next: 0 });
    return { head: slots[0]!, note: 'structural:indirect-huge 140000 random descriptors' };
  }
  const req = request(gen, false);
  if (!req) return undefined;
  const { pieces } = req;
  const pickPiece = (pred: (d: DescRec) => boolean = () => true): DescRec | undefined => {
    const c = pieces.filter(pred);
    return c.length ? rng.pick(c) : undefined;
  };
  switch (kind) {
    case 'buf-outside': {
      const p = pickPiece((d) => d.len > 0) ?? pieces[0]!;
      p.addr = rng.pick([BigInt(LOW_END), BigInt(LOW_END + rng.int(GiB)), 3n * BigInt(GiB), BigInt(HIGH_END), BigInt(HIGH_END) + BigInt(rng.int(GiB)), 1n << 40n]);
      if (p.len === 0) p.len = 1;
      break;
    }
    case 'buf-gap-straddle': {
      const p = pickPiece((d) => d.len > 0) ?? pieces[0]!;
      const len = Math.max(p.len, 2);
      p.len = len;
      p.addr = BigInt((p.flags & DESC_F_WRITE ? LOW_END : HIGH_END) - rng.range(1, len - 1));
      break;
    }
    case 'wrap': {
      const p = pickPiece() ?? pieces[0]!;
      p.addr = rng.pick([2n ** 64n - 4096n, 2n ** 64n - 1n, 2n ** 64n - BigInt(p.len || 1)]);
      p.len = Math.max(p.len, 8192);
      break;
    }
    case 'beyond-2^53': {
      const p = pickPiece() ?? pieces[0]!;
      p.addr = rng.pick([2n ** 53n, 2n ** 53n - 8n, 2n ** 60n]);
      p.len = Math.max(p.len, 64);
      break;
    }
    case 'huge-len': {
      const p = pickPiece((d) => !(d.flags & DESC_F_WRITE)) ?? pieces[0]!;
      p.len = rng.pick([0xffffffff, 0x80000000, 0x10000000, 64 * MiB]);
      break;
    }
    case 'read-after-write': {
      const w = pieces.findIndex((d) => (d.flags & DESC_F_WRITE) !== 0 && d.len > 0);
      if (w < 0) return undefined;
      pieces.splice(rng.range(w + 1, pieces.length), 0, { addr: BigInt(gen.sbuf(512)), len: rng.range(1, 512), flags: 0, next: 0 });
      break;
    }
    default:
      break;
  }
  const head = gen.place(pieces, (l) => {
    const inTable = l.table && rng.chance(0.5);
    const list = inTable ? l.table!.descs : l.direct;
    const tableLen = inTable ? l.table!.descs.length : q.size;
    const slotOf = (i: number): number => (inTable ? i : l.slots[i]!);
    switch (kind) {
      case 'loop': {
        const i = list.length - 1;
        const last = list[i]!;
        if (last.flags & DESC_F_INDIRECT) {
          // Loop inside the table instead.
          const t = l.table!.descs;
          t[t.length - 1]!.flags |= DESC_F_NEXT;
          t[t.length - 1]!.next = rng.int(t.length);
        } else {
          last.flags |= DESC_F_NEXT;
          last.next = slotOf(rng.int(list.length));
        }
        break;
      }
      case 'self-loop': {
        const i = rng.int(list.length);
        const d = list[i]!;
        if (d.flags & DESC_F_INDIRECT) return;
        d.flags |= DESC_F_NEXT;
        d.next = slotOf(i);
        break;
      }
      case 'next-oor': {
        const d = list[rng.int(list.length)]!;
        if (d.flags & DESC_F_INDIRECT) {
          d.flags |= DESC_F_NEXT; // indirect + next is malformed too
          d.next = tableLen + rng.int(100);
        } else {
          d.flags |= DESC_F_NEXT;
          d.next = rng.pick([tableLen, tableLen + 1, 0xffff, tableLen + rng.int(1000)]) & 0xffff;
          if (d.next < tableLen) d.next = 0xffff;
        }
        break;
      }
      case 'nested': {
        if (!l.table) {
          // Make the last direct descriptor point at a table that itself holds an indirect descriptor.
          const inner = gen.t.alloc(32, 16);
          const outer = gen.t.alloc(16, 16);
          if (inner === undefined || outer === undefined) return;
          gen.g.writeTable(inner, [{ addr: BigInt(gen.sbuf(16)), len: 16, flags: 0, next: 0 }, { addr: 0n, len: 0, flags: 0, next: 0 }]);
          gen.g.writeTable(outer, [{ addr: BigInt(inner), len: 32, flags: DESC_F_INDIRECT, next: 0 }]);
          const last = l.direct[l.direct.length - 1]!;
          last.flags = (last.flags | DESC_F_NEXT) & ~DESC_F_WRITE;
          const extra = gen.takeSlots(1);
          if (!extra) return;
          l.slots.push(extra[0]!);
          last.next = extra[0]!;
          l.direct.push({ addr: BigInt(outer), len: 16, flags: DESC_F_INDIRECT, next: 0 });
        } else {
          const t = l.table.descs;
          const inner = gen.t.alloc(16 * 2, 16);
          if (inner === undefined) return;
          gen.g.writeTable(inner, [{ addr: BigInt(gen.sbuf(8)), len: 8, flags: DESC_F_NEXT, next: 1 }, { addr: 0n, len: 0, flags: 0, next: 0 }]);
          const i = rng.int(t.length);
          t[i] = { addr: BigInt(inner), len: 32, flags: DESC_F_INDIRECT | (t[i]!.flags & DESC_F_NEXT), next: t[i]!.next };
        }
        break;
      }
      case 'indirect-next':
      case 'indirect-len':
      case 'indirect-outside': {
        const ind = l.direct[l.direct.length - 1]!;
        if (!(ind.flags & DESC_F_INDIRECT)) {
          // No table: corrupt a buffer instead (outside memory).
          const d = l.direct[rng.int(l.direct.length)]!;
          d.addr = BigInt(LOW_END + 4096);
          d.len = Math.max(d.len, 1);
          return;
        }
        if (kind === 'indirect-next') {
          ind.flags |= DESC_F_NEXT;
          ind.next = rng.int(q.size);
        } else if (kind === 'indirect-len') {
          ind.len = rng.pick([0, 8, 24, ind.len + 1, ind.len - 1, ind.len + 8]) >>> 0;
          if (ind.len % 16 === 0 && ind.len !== 0) ind.len += 4;
        } else {
          ind.addr = rng.pick([BigInt(HIGH_END - 8), BigInt(LOW_END - 8), BigInt(LOW_END + 4096), 2n ** 53n, 2n ** 64n - 16n]);
          if (rng.chance(0.3)) ind.len = 0xfffffff0;
        }
        break;
      }
      default:
        break;
    }
  });
  if (head === undefined) return undefined;
  return { head, note: `structural:${kind} (${req.note})` };
}

/** Random bytes in the descriptor table (and in tables it points to), loosely shaped into chains. */
function randomDescs(gen: Gen): { head: number; note: string } | undefined {
  const { rng, q } = gen;
  const n = Math.min(rng.range(1, 12), gen.freeSlots);
  const slots = n > 0 ? gen.takeSlots(n) : undefined;
  if (!slots) return undefined;
  const randDesc = (nextPool: number[], tableLen: number, depth: number): DescRec => {
    if (rng.chance(0.08)) {
      const b = rng.bytes(16);
      const v = new DataView(b.buffer);
      return { addr: v.getBigUint64(0, true), len: v.getUint32(8, true), flags: v.getUint16(12, true), next: v.getUint16(14, true) };
    }
    const flags = rng.weighted([
      [4, DESC_F_NEXT], [3, DESC_F_NEXT | DESC_F_WRITE], [2, DESC_F_WRITE], [2, 0], [depth === 0 && gen.indirectOk ? 2 : 0.3, DESC_F_INDIRECT],
      [1, rng.int(8)], [0.5, rng.int(0x10000)],
    ] as const);
    const next = rng.weighted([[8, rng.pick(nextPool)], [1, rng.int(tableLen)], [1, tableLen + rng.int(0x10000 - tableLen)]] as const) & 0xffff;
    let len = rng.weighted([[5, rng.skewed(4096)], [2, 16], [2, 512 * rng.range(1, 8)], [1, 0], [1, 1], [0.5, 0xffffffff], [0.5, rng.u32()]] as const);
    let addr: bigint;
    if (flags & DESC_F_INDIRECT && depth === 0) {
      const k = rng.range(1, 8);
      const inner = Array.from({ length: k }, (_, i) => i);
      const tdescs = Array.from({ length: k }, () => randDesc(inner, k, 1));
      const t = gen.t.alloc(16 * k, 16);
      if (t === undefined) return { addr: 0n, len: 0, flags: 0, next: 0 };
      gen.g.writeTable(t, tdescs);
      addr = BigInt(t);
      len = rng.chance(0.8) ? 16 * k : rng.pick([0, 16 * k + 8, 16 * (k + 1), 0xfffffff0]);
    } else if (flags & DESC_F_WRITE && !(flags & DESC_F_INDIRECT)) {
      const a = len <= 64 * KiB ? gen.wbuf(len) : undefined;
      addr = a !== undefined ? BigInt(a) : BigInt(LOW_END - rng.int(4096)); // too big: runs off the end of memory
      if (a !== undefined) gen.g.mem.fill(a, len, POISON);
    } else if (rng.chance(0.3)) {
      // A plausible header.
      addr = BigInt(gen.header(rng.pick([T.IN, T.OUT, T.FLUSH, T.GET_ID, T.DISCARD, T.WRITE_ZEROES, rng.u32()]), rng.chance(0.8) ? Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS) : rng.u64()));
      len = rng.pick([16, 16, 8, 32]);
      if (len > 16) addr = BigInt(gen.header(T.IN, Q1_SECTORS, new Uint8Array(len - 16)));
    } else {
      addr = len <= S_END - S_START ? BigInt(gen.sbuf(len)) : rng.pick([BigInt(S_START), rng.u64(), BigInt(LOW_END)]);
      if (rng.chance(0.05)) addr = rng.u64();
    }
    return { addr, len, flags, next };
  };
  for (const s of slots) putDesc(q.desc, s, randDesc(slots, q.size, 0));
  return { head: slots[0]!, note: `random descriptors in slots ${slots.join(',')}` };
}

/**
 * One indirect table of 1 to 65,536 chained descriptors behind many avail
 * entries (up to all of them): a request (OUT, FLUSH or GET_ID) whose
 * readable part is stretched to the table's length, with a status byte at
 * the end, none, or a loop back into the table. The daemon must walk it
 * once per entry within its budgets and answer each (IOERR for a table
 * larger than the queue) or fail the queue at the first entry.
 */
function bigTable(gen: Gen, p: Planned): boolean {
  const { rng, q } = gen;
  if (!gen.indirectOk) return false;
  const len = rng.weighted([
    [3, rng.range(1, 16)], [3, rng.range(100, 1100)], [1, q.size], [1, q.size + 1], [1, q.size - 1],
    [2, 4096], [2, 65536], [1, rng.range(1, 65536)],
  ] as const);
  const variant = len < 2 ? 'status' : rng.weighted([[5, 'status'], [2, 'no-status'], [2, 'loop']] as const);
  const type = rng.pick([T.OUT, T.OUT, T.FLUSH, T.GET_ID]);
  const descs: DescRec[] = [];
  const data = gen.sbuf(512);
  const n = Math.max(0, len - 2);
  const sector = Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS - Math.min(n, 126) + 1);
  if (len >= 2) descs.push({ addr: BigInt(gen.header(type, sector)), len: 16, flags: DESC_F_NEXT, next: 1 });
  const filler = type === T.OUT ? 512 : rng.range(1, 64);
  for (let i = 0; i < n; i++) descs.push({ addr: BigInt(data), len: filler, flags: DESC_F_NEXT, next: descs.length + 1 });
  if (variant === 'no-status') {
    descs.push({ addr: BigInt(data), len: 16, flags: 0, next: 0 });
  } else {
    const room = type === T.GET_ID ? 21 : 1;
    const st = gen.wbuf(room);
    if (st === undefined) return false;
    gen.g.mem.fill(st, room, POISON);
    descs.push({ addr: BigInt(st), len: room, flags: DESC_F_WRITE | (variant === 'loop' ? DESC_F_NEXT : 0), next: variant === 'loop' ? rng.int(descs.length + 1) : 0 });
  }
  const t = gen.t.alloc(16 * descs.length, 16);
  if (t === undefined) return false;
  gen.g.writeTable(t, descs);
  // Several ring descriptors may name the same table; the avail entries cycle through them.
  const m = Math.min(rng.weighted([[3, 1], [1, rng.range(2, 4)]] as const), gen.freeSlots);
  const slots = gen.takeSlots(m);
  if (!slots) return false;
  for (const s of slots) putDesc(q.desc, s, { addr: BigInt(t), len: 16 * descs.length, flags: DESC_F_INDIRECT, next: 0 });
  // The daemon walks every entry: keep an input's work to a few million descriptors.
  const budget = rng.chance(0.2) ? 1 << 23 : 1 << 21;
  let repeats = rng.weighted([[2, 1], [2, rng.range(2, 16)], [3, q.size], [1, rng.range(1, q.size)]] as const);
  // No more entries than the ring holds: more is an avail idx a ring ahead (a ring error, generated elsewhere).
  repeats = Math.max(1, Math.min(repeats, q.size, Math.floor(budget / descs.length)));
  for (let i = 0; i < repeats; i++) {
    p.heads.push(slots[i % m]!);
    p.notes.push(`big table: ${descs.length} descriptors (${variant}, type ${type}), entry ${i + 1} of ${repeats}`);
  }
  return true;
}

/**
 * A chain of about 1,000 or more segments: many small readable pieces after
 * the header (some across the r2/r3 boundary, two segments each), so the
 * segment count lands around MAX_CHAIN_SEGMENTS (1024). GET_ID and FLUSH
 * ignore the extra bytes, so they must succeed up to the limit and fail past
 * it; IN and OUT also meet seg_max.
 */
function manySegments(gen: Gen): { head: number; note: string } | undefined {
  const { rng } = gen;
  const target = rng.weighted([[4, rng.range(1020, 1028)], [2, rng.range(1000, 1100)], [1, rng.range(127, 400)], [1, rng.range(1100, 2100)]] as const);
  const type = rng.weighted([[3, T.GET_ID], [2, T.FLUSH], [1, T.IN], [1, T.OUT]] as const);
  const straddle = rng.pick([0, 0.1, 0.5, 1]);
  const pieces: DescRec[] = [{ addr: BigInt(gen.header(type, Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS - 4))), len: 16, flags: 0, next: 0 }];
  // The writable end: GET_ID's 20 bytes and the status, IN's one shared 512-byte buffer (it fails seg_max anyway), or the status alone.
  const tail: DescRec[] = [];
  const wlen = type === T.GET_ID ? 21 : 1;
  const st = gen.wbuf(wlen, rng.chance(0.2));
  if (st === undefined) return undefined;
  gen.g.mem.fill(st, wlen, POISON);
  tail.push({ addr: BigInt(st), len: wlen, flags: DESC_F_WRITE, next: 0 });
  let inBuf: number | undefined;
  if (type === T.IN) {
    inBuf = gen.wbuf(512, rng.chance(0.5));
    if (inBuf === undefined) return undefined;
    gen.g.mem.fill(inBuf, 512, POISON);
  }
  const segsOf = (d: DescRec): number => pieces2(Number(d.addr), d.len);
  let segs = segsOf(pieces[0]!) + segsOf(tail[0]!);
  const body: DescRec[] = [];
  // IN's buffers all alias one 512-byte buffer, whose final content no model can judge: keep it past seg_max, refused.
  while (segs < target || (type === T.IN && body.length <= SEG_MAX)) {
    const two = target - segs >= 2 && rng.chance(straddle);
    const len = type === T.OUT || type === T.IN ? 512 : rng.range(1, 64);
    let addr: number;
    if (type === T.IN) addr = inBuf!;
    else addr = two ? R3 - rng.range(1, len - 1 || 1) : S_START + rng.int(S_END - S_START - len);
    if (two && len < 2) addr = R3 - 1;
    const d: DescRec = { addr: BigInt(addr), len: two && len < 2 ? 2 : len, flags: type === T.IN ? DESC_F_WRITE : 0, next: 0 };
    body.push(d);
    segs += segsOf(d);
  }
  const head = gen.place([...pieces, ...body, ...tail]);
  if (head === undefined) return undefined;
  return { head, note: `many segments: type ${type}, ${pieces.length + body.length + tail.length} descriptors, ${segs} segments` };
}

/** Requests at seg_max (126 data descriptors) and size_max (1 MiB per descriptor), on either side. */
function limitsRequest(gen: Gen): { head: number; note: string } | undefined {
  const { rng } = gen;
  const kind = rng.pick(['seg_max', 'size_max'] as const);
  let type = rng.pick([T.IN, T.OUT]);
  const data: number[] = [];
  if (kind === 'seg_max') {
    const d = rng.weighted([[3, 126], [2, 127], [2, 125], [1, rng.range(1, 140)]] as const);
    for (let i = 0; i < d; i++) data.push(type === T.IN ? rng.pick([512, 512, 1024]) : 512 * rng.range(1, 2));
  } else {
    const big = rng.pick([SIZE_MAX - 512, SIZE_MAX, SIZE_MAX + 512, SIZE_MAX + 4096, 2 * SIZE_MAX]);
    if (type === T.IN && big > 2 * MiB) type = T.OUT;
    data.push(big);
    if (rng.chance(0.3)) data.push(512 * rng.range(1, 8));
    if (rng.chance(0.3)) data.unshift(512 * rng.range(1, 8));
  }
  const total = data.reduce((a, b) => a + b, 0);
  const sector = Q1_SECTORS + rng.int(CAPACITY - Q1_SECTORS - total / SECTOR + 1);
  const pieces: DescRec[] = [];
  const h = gen.header(type, sector);
  pieces.push({ addr: BigInt(h), len: 16, flags: 0, next: 0 });
  for (const len of data) {
    if (type === T.OUT) {
      pieces.push({ addr: BigInt(gen.sbuf(len)), len, flags: 0, next: 0 });
    } else {
      const a = gen.wbuf(len, rng.chance(0.1));
      if (a === undefined) return undefined;
      gen.g.mem.fill(a, len, POISON);
      pieces.push({ addr: BigInt(a), len, flags: DESC_F_WRITE, next: 0 });
    }
  }
  const st = gen.wbuf(1);
  if (st === undefined) return undefined;
  pieces.push({ addr: BigInt(st), len: 1, flags: DESC_F_WRITE, next: 0 });
  const head = gen.place(pieces);
  if (head === undefined) return undefined;
  return { head, note: `${kind}: type ${type}, data descriptors ${data.join('+')} bytes, sector ${sector}` };
}

function plan(gen: Gen, avoid: Set<string>): Planned {
  const { rng, q } = gen;
  gen.avoid = avoid;
  const p: Planned = { heads: [], notes: [], tags: new Set(), wFrom: gen.w.cur };
  if (rng.chance(0.01) && bigTable(gen, p)) return p;
  const nChains = rng.weighted([[6, 1], [4, rng.range(2, 4)], [2, rng.range(5, 16)], [0.1, Math.min(q.size, 256)]] as const);
  for (let i = 0; i < nChains; i++) {
    const kind = rng.weighted([[35, 'valid'], [20, 'semantic'], [20, 'structural'], [15, 'random'], [1, 'many-segments'], [2, 'limits']] as const);
    let r: { head: number; note: string } | undefined;
    if (kind === 'many-segments') r = manySegments(gen);
    else if (kind === 'limits') r = limitsRequest(gen);
    else if (kind === 'valid' || kind === 'semantic') {
      const req = request(gen, kind === 'semantic');
      const head = req && gen.place(req.pieces);
      if (head !== undefined) r = { head, note: req!.note };
    } else if (kind === 'structural') r = structural(gen);
    else r = randomDescs(gen);
    if (!r) break;
    p.heads.push(r.head);
    p.notes.push(r.note);
  }
  // Ring-level hostility.
  const ring = rng.weighted([[88, 'none'], [3, 'jump'], [3, 'head-oor'], [3, 'dup-head'], [2, 'no-interrupts'], [1, 'self-feed']] as const);
  if (ring === 'jump') {
    p.jump = q.size + 1 + rng.int(0x10000 - q.size - 1 - p.heads.length);
    p.notes.push(`avail idx jumps ${p.jump} entries ahead`);
  } else if (ring === 'head-oor' && p.heads.length < q.size) {
    const at = rng.int(p.heads.length + 1);
    p.heads.splice(at, 0, rng.pick([q.size, q.size + 1, 0xffff, q.size + rng.int(0x10000 - q.size)]));
    p.notes.splice(at, 0, 'head out of range');
  } else if (ring === 'dup-head' && p.heads.length && p.heads.length < q.size) {
    const i = rng.int(p.heads.length);
    p.heads.push(p.heads[i]!);
    p.notes.push(`head ${p.heads[i]} again`);
  } else if (ring === 'no-interrupts') {
    p.noInterrupts = true;
  } else if (ring === 'self-feed' && !avoid.has('avail-overlap')) {
    p.selfFeed = true;
    p.tags.add('avail-overlap');
  }
  return p;
}

// ---------------------------------------------------------------- the device session

/** Requests on the control connection, each acked (REPLY_ACK). */
class Ctl {
  private constructor(readonly conn: RawConn) {}

  static async open(socket: string): Promise<Ctl> {
    const c = await connectAccepted(socket);
    if (!c) throw new Error('vhostd did not accept the control connection within 5 s');
    return new Ctl(c);
  }

  private async reply(request: number): Promise<Uint8Array> {
    const n = this.conn.replies.length;
    const ok = await this.conn.until(() => this.conn.replies.length > n, WAIT_MS);
    if (!ok || this.conn.replies.length <= n) throw new Error(`control connection: no reply to ${reqName(request)} within ${WAIT_MS} ms${this.conn.eof ? ' (closed)' : ''}`);
    const r = this.conn.replies[n]!;
    if (r.flags !== 0x5 || r.request !== request) throw new Error(`control connection: bad reply to ${reqName(request)}: request ${r.request} flags 0x${r.flags.toString(16)}`);
    return r.payload;
  }

  async get(request: number, payload: Uint8Array = new Uint8Array(0)): Promise<Uint8Array> {
    if ((await this.conn.send(frame(request, VERSION, payload))) !== 'ok') throw new Error(`control connection closed sending ${reqName(request)}`);
    return this.reply(request);
  }

  async cmd(request: number, payload: Uint8Array, fds: number[] = [], ack = true): Promise<void> {
    if ((await this.conn.send(frame(request, VERSION | (ack ? F_NEED_REPLY : 0), payload), fds)) !== 'ok') {
      throw new Error(`control connection closed sending ${reqName(request)}`);
    }
    if (!ack) return;
    const v = readU64(await this.reply(request));
    if (v !== 0n) throw new Error(`${reqName(request)} nacked (${v})`);
  }

  /** Several requests written back to back, then every reply checked: one round trip. */
  async pipeline(msgs: { req: number; payload: Uint8Array; fds?: number[]; get?: boolean }[]): Promise<Uint8Array[]> {
    const n0 = this.conn.replies.length;
    for (const m of msgs) {
      if ((await this.conn.send(frame(m.req, VERSION | (m.get ? 0 : F_NEED_REPLY), m.payload), m.fds ?? [])) !== 'ok') {
        throw new Error(`control connection closed sending ${reqName(m.req)}`);
      }
    }
    const ok = await this.conn.until(() => this.conn.replies.length >= n0 + msgs.length, WAIT_MS);
    if (!ok || this.conn.replies.length < n0 + msgs.length) throw new Error(`control connection: ${this.conn.replies.length - n0} of ${msgs.length} replies within ${WAIT_MS} ms${this.conn.eof ? ' (closed)' : ''}`);
    return msgs.map((m, i) => {
      const r = this.conn.replies[n0 + i]!;
      if (r.flags !== 0x5 || r.request !== m.req) throw new Error(`control connection: bad reply to ${reqName(m.req)}: request ${r.request} flags 0x${r.flags.toString(16)}`);
      if (!m.get && readU64(r.payload) !== 0n) throw new Error(`${reqName(m.req)} nacked`);
      return r.payload;
    });
  }

  close(): void {
    this.conn.close();
  }
}

// ---------------------------------------------------------------- the run


class RingFuzzer {
  readonly g: Guest;
  readonly q0: Q0;
  q1!: SplitQueue;
  blk1!: BlkQueue;
  ctl: Ctl | undefined;
  features = 0n;
  /** Per sector: contents allowed at the next check (null: only the current one). */
  allowed: (Uint8Array[] | null)[] = new Array<Uint8Array[] | null>(CAPACITY).fill(null);
  /** Last verified contents of the image. */
  image = PATTERN_IMAGE.slice();
  private callWatch: WatchHandle | undefined;
  private errWatch: WatchHandle | undefined;
  private wake: (() => void) | undefined;
  errSignals = 0;
  callSignals = 0;
  private readonly counter = new BigUint64Array(1);
  /** Queue 1 traffic in flight. */
  q1Work: Promise<void> | undefined;
  q1Error: string | undefined;
  q1Ops = 0;

  constructor(
    public d: FuzzDaemon,
    readonly seed: number,
  ) {
    const rng = new Rng(seed, 0xffffffff);
    this.g = new Guest(rng);
    const mem = this.g.mem;
    const descGpa = mem.alloc(16 * 1024, 4096, 0);
    const availGpa = mem.alloc(6 + 2 * 1024, 4096, 0);
    const usedGpa = mem.alloc(6 + 8 * 1024, 4096, 0);
    const view = (gpa: number, len: number): Uint8Array => mem.view(gpa, len);
    const dv = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);
    const u16 = (b: Uint8Array): Uint16Array => new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
    this.q0 = {
      size: 128,
      descGpa,
      availGpa,
      usedGpa,
      desc: dv(view(descGpa, 16 * 1024)),
      avail: u16(view(availGpa, 6 + 2 * 1024)),
      used: u16(view(usedGpa, 6 + 8 * 1024 + 2)),
      usedDv: dv(view(usedGpa, 6 + 8 * 1024 + 2)),
      availIdx: 0,
      lastUsed: 0,
      kick: native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC),
      call: native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC),
      err: native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC),
    };
    this.newQueue1();
    this.callWatch = native.watch(this.q0.call, POLL_READABLE, () => {
      if (native.read(this.q0.call, this.counter) === 8) this.callSignals += Number(this.counter[0]);
      this.poke();
    });
    this.errWatch = native.watch(this.q0.err, POLL_READABLE, () => {
      if (native.read(this.q0.err, this.counter) === 8) this.errSignals += Number(this.counter[0]);
      this.poke();
    });
  }

  private newQueue1(): void {
    this.q1?.destroy();
    this.q1 = new SplitQueue(this.g.mem, 1, 128, 0);
    this.blk1 = new BlkQueue(this.q1, this.g.mem);
    this.blk1.timeoutMs = WAIT_MS;
  }

  private poke(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  timeouts = 0;
  traceOn = false;

  /** Until the call or err fd fires, or ms pass. */
  waitEvent(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        if (ms >= 20) this.timeouts++;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  get q0Size(): number {
    return this.q0.size;
  }

  /** Full start in the QEMU 7.2 order, both queues; `rng` picks the session's variations. */
  async connect(rng: Rng, queueSize: number): Promise<void> {
    const ctl = await Ctl.open(this.d.socket);
    this.ctl = ctl;
    const offered = readU64(ctl.conn.replies[0]!.payload);
    const pf = readU64(await ctl.get(Req.GET_PROTOCOL_FEATURES)) & DRIVER_PROTOCOL;
    if (!has(pf, PF.REPLY_ACK)) throw new Error('vhostd does not offer REPLY_ACK');
    await ctl.cmd(Req.SET_PROTOCOL_FEATURES, u64(pf), [], false);
    await ctl.get(Req.GET_QUEUE_NUM);
    await ctl.cmd(Req.SET_OWNER, new Uint8Array(0));
    const cfg = await ctl.get(Req.GET_CONFIG, configMsg(0, 57, 0));
    if (cfg.length !== 12 + 57 || readU64(cfg, 12) !== BigInt(CAPACITY)) throw new Error(`GET_CONFIG: ${cfg.length} bytes, capacity ${cfg.length >= 20 ? readU64(cfg, 12) : '?'}`);
    let f = offered & DRIVER_FEATURES;
    if (rng.chance(0.3)) f &= ~bit(VF.EVENT_IDX);
    if (rng.chance(0.15)) f &= ~bit(VF.INDIRECT_DESC);
    this.features = f;
    this.q1.eventIdx = has(f, VF.EVENT_IDX);
    await ctl.cmd(Req.SET_FEATURES, u64(f));
    const regions = this.g.mem.table();
    await ctl.cmd(Req.SET_MEM_TABLE, memTable(regions), regions.map((r) => r.fd));
    // Queue 1: the driver's own ring.
    const q1 = this.q1;
    await ctl.cmd(Req.SET_VRING_NUM, vringState(1, q1.size));
    await ctl.cmd(Req.SET_VRING_BASE, vringState(1, q1.base));
    await ctl.cmd(Req.SET_VRING_ADDR, vringAddr({ index: 1, ...q1.addrs() }));
    await ctl.cmd(Req.SET_VRING_KICK, u64(1), [q1.kickFd]);
    await ctl.cmd(Req.SET_VRING_CALL, u64(1), [q1.callFd]);
    await ctl.cmd(Req.SET_VRING_ERR, u64(0), [this.q0.err]);
    await ctl.cmd(Req.SET_VRING_CALL, u64(0), [this.q0.call]);
    await this.startQueue0(queueSize);
    await ctl.cmd(Req.SET_VRING_ENABLE, vringState(0, 1));
    await ctl.cmd(Req.SET_VRING_ENABLE, vringState(1, 1));
  }

  /** NUM, BASE, ADDR, KICK for queue 0 (also its restart after a failure). */
  async startQueue0(size: number): Promise<void> {
    const q = this.q0;
    const ctl = this.ctl!;
    this.prepareQueue0(size);
    const mem = this.g.mem;
    await ctl.cmd(Req.SET_VRING_NUM, vringState(0, size));
    await ctl.cmd(Req.SET_VRING_BASE, vringState(0, q.availIdx));
    await ctl.cmd(Req.SET_VRING_ADDR, vringAddr({ index: 0, desc: mem.uva(q.descGpa), avail: mem.uva(q.availGpa), used: mem.uva(q.usedGpa) }));
    await ctl.cmd(Req.SET_VRING_KICK, u64(0), [q.kick]);
  }

  /**
   * After a failure: GET_VRING_BASE and a restart at `expect` in one round
   * trip. Returns what GET_VRING_BASE said; if it differs, the ring restarted
   * at the wrong place and the caller must stop and start it again.
   */
  async restartQueue0(size: number, expect: number): Promise<number> {
    const q = this.q0;
    q.availIdx = expect;
    this.prepareQueue0(size);
    const mem = this.g.mem;
    const r = await this.ctl!.pipeline([
      { req: Req.GET_VRING_BASE, payload: vringState(0, 0), get: true },
      { req: Req.SET_VRING_NUM, payload: vringState(0, size) },
      { req: Req.SET_VRING_BASE, payload: vringState(0, expect) },
      { req: Req.SET_VRING_ADDR, payload: vringAddr({ index: 0, desc: mem.uva(q.descGpa), avail: mem.uva(q.availGpa), used: mem.uva(q.usedGpa) }) },
      { req: Req.SET_VRING_KICK, payload: u64(0), fds: [q.kick] },
      { req: Req.SET_VRING_ENABLE, payload: vringState(0, 1) },
    ]);
    return new DataView(r[0]!.buffer, r[0]!.byteOffset, 8).getUint32(4, true);
  }

  private prepareQueue0(size: number): void {
    const q = this.q0;
    q.size = size;
    // Fresh table; avail idx back to the base; the device reads used idx from memory.
    new Uint8Array(q.desc.buffer, q.desc.byteOffset, 16 * 1024).fill(0);
    Atomics.store(q.avail, 0, 0);
    Atomics.store(q.avail, 1, q.availIdx);
    q.lastUsed = Atomics.load(q.used, 1);
  }

  /** GET_VRING_BASE for queue 0: the device's next avail index. */
  async stopQueue0(): Promise<number> {
    const p = await this.ctl!.get(Req.GET_VRING_BASE, vringState(0, 0));
    const v = new DataView(p.buffer, p.byteOffset, 8);
    if (v.getUint32(0, true) !== 0) throw new Error(`GET_VRING_BASE(0) reply names queue ${v.getUint32(0, true)}`);
    return v.getUint32(4, true);
  }

  /** Stop order, then close: both queues' bases kept for the next session. */
  async disconnect(): Promise<void> {
    const ctl = this.ctl!;
    await ctl.cmd(Req.SET_VRING_ENABLE, vringState(0, 0));
    await ctl.cmd(Req.SET_VRING_ENABLE, vringState(1, 0));
    this.q0.availIdx = await this.stopQueue0();
    const p = await ctl.get(Req.GET_VRING_BASE, vringState(1, 0));
    this.q1.base = new DataView(p.buffer, p.byteOffset, 8).getUint32(4, true);
    ctl.close();
    this.ctl = undefined;
  }

  /**
   * Queue 0 writes that landed in queue 1's sectors, per sector. Queue 0 aims above them, but a
   * hostile chain can still legally reach them: a header split across descriptors takes its
   * sector from the next descriptor's bytes, and discard segments read from another header.
   */
  readonly q0InQ1 = new Uint32Array(Q1_SECTORS);

  /** Allow `data` (512 bytes) as the next contents of `sector`. */
  allow(sector: number, data: Uint8Array): void {
    const l = (this.allowed[sector] ??= [this.image.subarray(sector * SECTOR, (sector + 1) * SECTOR)]);
    if (l.length < 64) l.push(data);
  }

  /**
   * Sectors two requests wrote concurrently since the last verify: their bytes may be any
   * mixture of both (I/O is not atomic below the page cache's copy), so any content passes.
   */
  readonly mixed = new Set<number>();

  matches(sector: number, got: Uint8Array): boolean {
    if (this.mixed.has(sector)) return true;
    const l = this.allowed[sector];
    const cur = this.image.subarray(sector * SECTOR, (sector + 1) * SECTOR);
    if (!l) return Buffer.compare(got, cur) === 0;
    return l.some((x) => Buffer.compare(got, x) === 0);
  }

  /** Queue 1: a write and its read-back, verified, in the background. */
  queue1Traffic(rng: Rng): void {
    const prev = this.q1Work;
    const sector = 8 * rng.int(Q1_SECTORS / 8);
    const data = rng.bytes(4096);
    this.q1Work = (async () => {
      await prev;
      if (this.q1Error) return;
      try {
        const touched = this.q0InQ1.slice(sector, sector + 8);
        const w = await this.blk1.write(sector, data, { region: 0 });
        if (w.status !== S.OK) throw new Error(`queue 1 write: status ${w.status}`);
        for (let i = 0; i < 8; i++) this.allow(sector + i, data.slice(i * SECTOR, (i + 1) * SECTOR));
        const r = await this.blk1.read(sector, 4096, { region: 0, split: rng.chance(0.5) ? [512, 3584] : undefined });
        if (r.status !== S.OK) throw new Error(`queue 1 read: status ${r.status}`);
        if (Buffer.compare(r.data, data) !== 0 && this.q1Mismatches.length < 5) {
          // Judged at the checkpoint, once every queue 0 request that ran meanwhile has been judged.
          const why = `queue 1 read back differs from what it wrote at sector ${sector}: ${this.describeMismatch(sector, r, data)}`;
          this.q1Mismatches.push({ sector, touched, got: r.data, wrote: data, why });
        }
        this.q1Ops++;
      } catch (e) {
        this.q1Error = (e as Error).message;
      }
    })();
  }

  /** Every sector that reads back differently was meanwhile written by an OK queue 0 request (racing queue 1's own). */
  private q0Explains(sector: number, before: Uint32Array, got: Uint8Array, wrote: Uint8Array): boolean {
    for (let i = 0; i < 8; i++) {
      const g = got.subarray(i * SECTOR, (i + 1) * SECTOR);
      if (Buffer.compare(g, wrote.subarray(i * SECTOR, (i + 1) * SECTOR)) === 0) continue;
      if (this.q0InQ1[sector + i] === before[i]) return false; // nothing of queue 0 landed there meanwhile
    }
    this.q1Overwritten++;
    return true;
  }

  q1Overwritten = 0;
  q1Mismatches: { sector: number; touched: Uint32Array; got: Uint8Array; wrote: Uint8Array; why: string }[] = [];

  /** Queue 1 mismatches that no queue 0 write explains. */
  unexplainedQ1(): string[] {
    const out = this.q1Mismatches.filter((m) => !this.q0Explains(m.sector, m.touched, m.got, m.wrote)).map((m) => m.why);
    this.q1Mismatches = [];
    return out;
  }

  /** What a queue 1 read returned instead of the data just written, for the failure report. */
  private describeMismatch(sector: number, r: { data: Uint8Array; usedLen: number; head: number }, wrote: Uint8Array): string {
    let first = -1;
    let count = 0;
    for (let i = 0; i < wrote.length; i++) {
      if (r.data[i] !== wrote[i]) {
        if (first < 0) first = i;
        count++;
      }
    }
    const sectors: string[] = [];
    for (let i = 0; i < 8; i++) {
      const got = r.data.subarray(i * SECTOR, (i + 1) * SECTOR);
      const same = (x: Uint8Array): boolean => Buffer.compare(got, x) === 0;
      const kind = same(wrote.subarray(i * SECTOR, (i + 1) * SECTOR)) ? 'ok'
        : got.every((b) => b === POISON_BLK) ? 'poison (never written)'
        : got.every((b) => b === 0) ? 'zeros'
        : same(PATTERN_IMAGE.subarray((sector + i) * SECTOR, (sector + i + 1) * SECTOR)) ? 'original pattern'
        : this.allowed[sector + i]?.some(same) ? 'an earlier allowed version'
        : `other (${Buffer.from(got.subarray(0, 8)).toString('hex')}...)`;
      sectors.push(kind);
    }
    let onDisk = 'unreadable';
    try {
      const fd = openSync(this.d.image, 'r');
      const b = new Uint8Array(wrote.length);
      readSync(fd, b, 0, b.length, sector * SECTOR);
      closeSync(fd);
      onDisk = Buffer.compare(b, wrote) === 0 ? 'the written data' : 'something else';
    } catch {
      /* keep 'unreadable' */
    }
    return `${count} bytes differ from byte ${first}; used len ${r.usedLen}, head ${r.head}; sectors: ${sectors.join(', ')}; the image now holds ${onDisk}`;
  }

  /** The image and the guest's read-only and unused memory, against what was allowed. */
  verify(): string | undefined {
    const errors: string[] = [];
    const img = new Uint8Array(IMAGE_BYTES);
    const fd = openSync(this.d.image, 'r');
    try {
      readSync(fd, img, 0, IMAGE_BYTES, 0);
    } finally {
      closeSync(fd);
    }
    for (let s = 0; s < CAPACITY; s++) {
      const got = img.subarray(s * SECTOR, (s + 1) * SECTOR);
      if (!this.matches(s, got)) {
        if (errors.length < 5) {
          const isPattern = Buffer.compare(got, PATTERN_IMAGE.subarray(s * SECTOR, (s + 1) * SECTOR)) === 0;
          errors.push(`image sector ${s} holds data no OK request wrote there (${isPattern ? 'the original pattern' : Buffer.from(got.subarray(0, 16)).toString('hex')}..., ${this.allowed[s]?.length ?? 1} allowed versions)`);
        }
      }
      this.allowed[s] = null;
      this.mixed.delete(s);
    }
    this.image = img;
    const g = this.g;
    if (Buffer.compare(g.read(S_START, S_END - S_START), g.shadowS) !== 0) errors.push('static readable guest memory (OUT data) was modified by the device');
    if (Buffer.compare(g.read(H_START, H_END - H_START), g.shadowH) !== 0) errors.push('request headers in guest memory were modified by the device');
    if (Buffer.compare(g.read(T_START, T_END - T_START), g.shadowT) !== 0) errors.push('indirect tables in guest memory were modified by the device');
    return errors.length ? errors.join('\n') : undefined;
  }

  /** Bytes of W outside every writable buffer handed out must still be POISON; then re-poison W. */
  checkW(gen: Gen): string | undefined {
    const ranges = gen.wRanges.slice().sort((a, b) => a.gpa - b.gpa);
    let at = W_START;
    let bad: string | undefined;
    const w = this.g.read(W_START, W_END - W_START);
    const check = (from: number, to: number): void => {
      for (let a = from; a < to && !bad; a++) {
        if (w[a - W_START] !== POISON) {
          let to = a;
          while (to < W_END && w[to - W_START] !== POISON) to++;
          const near = ranges.filter((r) => Math.abs(r.gpa - a) < 4096).map((r) => `0x${r.gpa.toString(16)}+${r.len}`).join(' ');
          bad = `guest memory at 0x${a.toString(16)} (${to - a} bytes: ${Buffer.from(w.subarray(a - W_START, Math.min(to, a + 16) - W_START)).toString('hex')}) changed, outside every device-writable buffer (buffers near: ${near || 'none'})`;
        }
      }
    };
    for (const r of ranges) {
      if (r.gpa > at) check(at, r.gpa);
      at = Math.max(at, r.gpa + r.len);
    }
    check(at, W_END);
    this.g.mem.fill(W_START, W_END - W_START, POISON);
    gen.w.reset();
    gen.wRanges = [];
    return bad;
  }

  destroy(): void {
    if (this.callWatch) native.unwatch(this.callWatch);
    if (this.errWatch) native.unwatch(this.errWatch);
    this.callWatch = this.errWatch = undefined;
    this.ctl?.close();
    for (const fd of [this.q0.kick, this.q0.call, this.q0.err]) native.close(fd);
    this.q1.destroy();
    this.g.mem.destroy();
  }
}

interface Judged {
  kind: 'ok' | 'failed-queue';
  error?: string;
  /** The daemon stopped answering. */
  hung?: boolean;
  /** After a failure: what GET_VRING_BASE must return (nothing past the failing entry consumed). */
  expectBase?: number;
}

const ONE = new BigUint64Array([1n]);

/** Publish, kick, wait for the device, and check every completion against the model. */
async function runInput(fz: RingFuzzer, gen: Gen, p: Planned): Promise<Judged> {
  const q = fz.q0;
  const g = fz.g;
  const eventIdx = has(fz.features, VF.EVENT_IDX);
  const indirectOk = has(fz.features, VF.INDIRECT_DESC);
  const base = q.availIdx;
  if (p.selfFeed) return selfFeed(fz, gen);
  // The model, in avail order.
  interface Exp {
    head: number;
    note: string;
    walk?: Walk;
    blk?: BlkExpect;
  }
  const exp: Exp[] = [];
  // Index in exp of the entry that fails the queue: a ring error (head out of range, avail idx
  // jump) or a chain without a status byte. It gets no used entry and nothing after it is taken.
  let failAt = -1;
  const writableTaken: Seg[] = [];
  /** Writable layouts already published: the same chain again (one table behind many entries) races only with itself. */
  const published = new Set<string>();
  const overlaps = (segs: Seg[]): boolean => segs.some((s) => writableTaken.some((t) => s.gpa < t.gpa + t.len && t.gpa < s.gpa + s.len));
  const walks = new Map<number, Walk>();
  const heads: number[] = [];
  const notes: string[] = [];
  for (let i = 0; i < p.heads.length; i++) {
    const head = p.heads[i]!;
    if (failAt >= 0) break;
    if (head >= q.size) {
      exp.push({ head, note: p.notes[i]! });
      heads.push(head);
      notes.push(p.notes[i]!);
      if (!p.jump) failAt = exp.length - 1;
      continue;
    }
    let w = walks.get(head);
    if (!w) walks.set(head, (w = walk(q.desc, q.size, head, indirectOk, g)));
    // The same chain (same buffers, same verdict) may race only with itself: both write the same bytes.
    const sig = `${w.fault ? 'fault' : 'sound'}|${w.readable.map((s) => `${s.gpa}+${s.len}`).join(',')}|${w.writable.map((s) => `${s.gpa}+${s.len}`).join(',')}`;
    if (w.status !== undefined && !published.has(sig)) {
      // Two different chains sharing a device-writable byte would race for it: publish only the first.
      if (overlaps(w.writable)) continue;
      writableTaken.push(...w.writable);
      published.add(sig);
    }
    // A chain may run into stale descriptors of earlier inputs, whose buffers were handed out in an
    // earlier epoch of W: what it reaches is device-writable all the same.
    if (w.status !== undefined) for (const s of w.writable) if (s.gpa < W_END && s.gpa + s.len > W_START) gen.wRanges.push(s);
    const e: Exp = { head, note: p.notes[i]!, walk: w };
    if (w.status !== undefined) e.blk = blkModel(g, w, fz.features, gen.avoid);
    if (e.blk?.tag) p.tags.add(e.blk.tag);
    exp.push(e);
    heads.push(head);
    notes.push(p.notes[i]!);
    if (w.status === undefined) failAt = exp.length - 1;
  }
  if (p.jump) failAt = 0;
  // Publish.
  const availRing = (i: number): number => 2 + (i % q.size);
  heads.forEach((h, i) => (q.avail[availRing(base + i)] = h));
  const newIdx = (base + heads.length + (p.jump ?? 0)) & 0xffff;
  if (eventIdx) Atomics.store(q.avail, 2 + q.size, p.noInterrupts ? (q.lastUsed + 0x8000) & 0xffff : q.lastUsed);
  Atomics.store(q.avail, 0, p.noInterrupts ? 1 : 0);
  Atomics.store(q.avail, 1, newIdx);
  q.availIdx = newIdx;
  const errBefore = fz.errSignals;
  native.write(q.kick, ONE);

  // Wait: every chain before the failing entry back, and the err fd if the queue must fail.
  const processed = failAt < 0 ? exp.length : failAt;
  const used = (): number => (Atomics.load(q.used, 1) - q.lastUsed) & 0xffff;
  // Big tables behind many entries take the device a while to walk: allow for it.
  const walked = exp.reduce((a, e) => a + (e.walk?.descriptors ?? 1), 0);
  const deadline = Date.now() + WAIT_MS + Math.floor(walked / 5_000);
  const failedNow = (): boolean => fz.errSignals > errBefore;
  const finalState = (): boolean => {
    const n = used();
    return failAt >= 0 ? failedNow() && n >= processed : n >= exp.length;
  };
  let lastSeen = -1;
  let progressWithoutCall = 0;
  // More used entries than the model allows can only be wrong; a short grace for the rest to show.
  let graceUntil = 0;
  for (;;) {
    if (finalState()) break;
    if (eventIdx && !p.noInterrupts) {
      // Like Linux's virtqueue_enable_cb: interrupt on the next used entry, then re-check. If the
      // device published more between the load and the store, the stored used_event is already
      // behind its last decision and no interrupt would come: look again before sleeping.
      const u = Atomics.load(q.used, 1);
      Atomics.store(q.avail, 2 + q.size, u);
      if (finalState()) break;
      if (Atomics.load(q.used, 1) !== u) {
        lastSeen = used();
        continue;
      }
    }
    if (used() > processed || (failAt >= 0 && !failedNow() && used() >= processed && graceUntil)) {
      if (!graceUntil) graceUntil = Date.now() + 200;
      else if (Date.now() > graceUntil) break;
    } else if (failAt >= 0 && !failedNow() && used() >= processed) {
      // The err fd comes right after the earlier chains were taken; a daemon starved of CPU by other
      // work on the machine may take a while to get there, so wait the full bound for it.
      graceUntil = Date.now() + WAIT_MS;
    }
    const left = deadline - Date.now();
    if (left <= 0) break;
    const callsSeen = fz.callSignals;
    await fz.waitEvent(Math.min(left, p.noInterrupts || graceUntil ? 2 : 50));
    const n = used();
    if (n !== lastSeen && fz.callSignals === callsSeen && !failedNow() && !p.noInterrupts && !graceUntil) {
      // The device publishes used->idx at once and signals at the end of its loop turn: on a loaded
      // machine a poll can land in between. A signal that comes late still came; none at all is the bug.
      await fz.waitEvent(500);
      if (fz.callSignals === callsSeen) progressWithoutCall++;
    }
    lastSeen = n;
  }
  const n = used();
  const failed = failedNow();
  const describe = (): string =>
    `queue size ${q.size}, base ${base}, published ${heads.length}${p.jump ? ` (+ jump ${p.jump})` : ''}: ` +
    describeExp(exp) +
    (p.noInterrupts ? '\n    (used_event and flags ask for no interrupts)' : '');
  if (process.env.VHOSTD_FUZZ_TRACE && fz.traceOn) console.log(`  model: ${describe()}\n  n=${n} failed=${failed}`);
  if (n > processed && n <= q.size) {
    return {
      kind: failed ? 'failed-queue' : 'ok',
      error: `${n} used entries, the model allows ${processed}${failAt >= 0 ? ` (entry [${failAt}] must fail the queue untaken: ${exp[failAt]!.walk?.fault ?? 'ring error'})` : ''}; ${describe()}`,
      expectBase: failed ? (base + processed) & 0xffff : undefined,
    };
  }
  if (!finalState()) {
    const hung = failAt < 0 || failed || n < processed;
    return {
      kind: failed ? 'failed-queue' : 'ok',
      error: failAt >= 0 && !failed && n >= processed
        ? `entry [${failAt}] had to fail the queue (${exp[failAt]!.walk?.fault ?? 'ring error'}) but the err fd stayed silent; ${describe()}`
        : `no final state in time: ${n} used entries, err fd ${failed ? 'signalled' : 'silent'}, expected ${failAt >= 0 ? `the queue to fail at entry ${failAt} after ${processed} completions` : `${exp.length} completions`}; ${describe()}`,
      hung,
    };
  }
  if (failed && failAt < 0) return { kind: 'failed-queue', error: `the queue failed, but every chain had a status byte and the ring was sound; ${describe()}`, expectBase: (base + n) & 0xffff };
  // Judge completions: match used entries to published chains by head.
  const pending = new Map<number, number[]>();
  for (let i = 0; i < processed; i++) {
    const e = exp[i]!;
    const l = pending.get(e.head) ?? [];
    l.push(i);
    pending.set(e.head, l);
  }
  const errors: string[] = [];
  const effects: Effect[] = [];
  const reads: { e: Exp; }[] = [];
  for (let k = 0; k < n; k++) {
    const slot = (q.lastUsed + k) % q.size;
    const id = q.usedDv.getUint32(4 + slot * 8, true);
    const len = q.usedDv.getUint32(8 + slot * 8, true);
    const l = pending.get(id);
    if (!l || !l.length) {
      errors.push(`used entry ${k} names head ${id}, which was not published or already returned`);
      continue;
    }
    const i = l.shift()!;
    const e = exp[i]!;
    const b = e.blk!;
    const st = g.read(b.status.gpa, 1)[0]!;
    if (b.outcome === 'ok') {
      if (st !== S.OK) {
        errors.push(`chain [${i}] (${e.note}: ${b.why}) is valid but got status ${st}`);
        // It may have changed the image anyway: allow that, so one bug is reported once, not again by every later check.
        if (b.effect) effects.push(b.effect);
      }
      else if (len !== b.usedLen) errors.push(`chain [${i}] (${b.why}) used length ${len}, expected ${b.usedLen}`);
      else {
        if (b.effect) effects.push(b.effect);
        if (b.readCheck) reads.push({ e });
        if (b.getId) {
          const id20 = gatherSegs(g, e.walk!.writable, 0, 20);
          const want = new Uint8Array(20);
          want.set(new TextEncoder().encode(SERIAL));
          if (Buffer.compare(id20, want) !== 0) errors.push(`chain [${i}] GET_ID returned ${Buffer.from(id20).toString('hex')}`);
        }
      }
    } else if (b.outcome === 'either') {
      if (st !== S.OK && st !== S.IOERR && st !== S.UNSUPP) errors.push(`chain [${i}] (${b.why}) got status ${st}`);
      else if (len !== 1) errors.push(`chain [${i}] (${b.why}) used length ${len}`);
      else if (b.effect) effects.push(b.effect);
    } else {
      if (st !== S.IOERR && st !== S.UNSUPP) errors.push(`chain [${i}] (${e.note}: ${b.why}) must fail, got status ${st}${st === S.OK ? ' (OK!)' : ''}`);
      else if (len !== 1) errors.push(`chain [${i}] (${b.why}) failed with used length ${len}, not 1`);
      else {
        // A refused request writes nothing but its status byte.
        // Only buffers allocated (poisoned) for this input: a chain can reach stale descriptors whose buffers earlier requests filled.
        const bad = e.walk!.writable.find((s) => s.gpa >= p.wFrom && s.gpa + s.len <= gen.w.cur && g.read(s.gpa, s.len).some((x, j) => x !== POISON && s.gpa + j !== b.status.gpa));
        if (bad) errors.push(`chain [${i}] (${b.why}) failed but its buffer 0x${bad.gpa.toString(16)} +${bad.len} was written`);
      }
    }
  }
  q.lastUsed = (q.lastUsed + n) & 0xffff;
  if (progressWithoutCall > 1 && !failed) errors.push(`completions arrived without a call-fd interrupt ${progressWithoutCall} times`);
  // Image effects of OK requests become allowed; then OK reads must show allowed data.
  // Requests of one input run concurrently: a sector two of them write, or one that queue 1's
  // traffic writes meanwhile, may end up holding any mixture; a read of a sector written in the
  // same input may see one.
  const writers = new Map<number, number>();
  const touch = (sector: number): void => {
    writers.set(sector, (writers.get(sector) ?? 0) + 1);
    if (writers.get(sector)! > 1) fz.mixed.add(sector);
    if (sector < Q1_SECTORS) {
      fz.q0InQ1[sector]!++;
      fz.mixed.add(sector);
    }
  };
  for (const ef of effects) {
    if (ef.kind === 'write') {
      for (let j = 0; j < ef.data.length / SECTOR; j++) {
        fz.allow(ef.sector + j, ef.data.slice(j * SECTOR, (j + 1) * SECTOR));
        touch(ef.sector + j);
      }
    } else {
      for (const [s, k] of ef.ranges) {
        for (let j = 0; j < k; j++) {
          fz.allow(s + j, ZERO_SECTOR);
          touch(s + j);
        }
      }
    }
  }
  for (const { e } of reads) {
    const rc = e.blk!.readCheck!;
    const data = gatherSegs(g, e.walk!.writable, 0, rc.len);
    for (let j = 0; j < rc.len / SECTOR; j++) {
      const sector = rc.sector + j;
      if (writers.has(sector) || sector < Q1_SECTORS) continue; // raced a write: undefined
      if (!fz.matches(sector, data.subarray(j * SECTOR, (j + 1) * SECTOR))) {
        errors.push(`read of sector ${sector} (${e.note}) returned data the image never held`);
        break;
      }
    }
  }
  const expectBase = failed ? (base + processed) & 0xffff : undefined;
  if (errors.length) return { kind: failed ? 'failed-queue' : 'ok', error: `${errors.slice(0, 4).join('\n  ')}\n  ${describe()}`, expectBase };
  return { kind: failed ? 'failed-queue' : 'ok', expectBase };
}

/** The model's entries for a failure report (long rings summarised). */
function describeExp(exp: { head: number; note: string; walk?: Walk; blk?: BlkExpect }[]): string {
  const line = (e: (typeof exp)[number], i: number): string =>
    `\n    [${i}] head ${e.head}: ${e.note}${e.walk?.fault ? ` => fault: ${e.walk.fault}` : ''}${e.walk ? (e.walk.status === undefined ? ' => no status byte: fails the queue untaken' : ` => status byte at 0x${e.walk.status.toString(16)}, ${e.walk.descriptors} descriptors, ${e.walk.segments} segments`) : ''}${e.blk ? ` => ${e.blk.outcome} (${e.blk.why})` : ''}`;
  if (exp.length <= 24) return exp.map(line).join('');
  return [...exp.slice(0, 12).map(line), `\n    ... ${exp.length - 24} more ...`, ...exp.slice(-12).map((e, j) => line(e, exp.length - 12 + j))].join('');
}

/**
 * A guest that programs its used ring on top of its avail ring: every
 * completion the device writes is also a new avail index. The device may fail
 * the queue or keep going, but it must keep answering.
 */
async function selfFeed(fz: RingFuzzer, gen: Gen): Promise<Judged> {
  const q = fz.q0;
  const mem = fz.g.mem;
  const ctl = fz.ctl!;
  q.availIdx = await fz.stopQueue0();
  q.size = 64;
  new Uint8Array(q.desc.buffer, q.desc.byteOffset, 16 * 1024).fill(0);
  const h = gen.header(T.GET_ID, 0);
  // W may be full this late in an epoch: check it and start a new one, as the main loop does.
  let buf = gen.wbuf(21);
  if (buf === undefined) {
    const bad = fz.checkW(gen);
    if (bad) return { kind: 'ok', error: bad };
    buf = gen.wbuf(21)!;
  }
  putDesc(q.desc, 0, { addr: BigInt(h), len: 16, flags: DESC_F_NEXT, next: 1 });
  putDesc(q.desc, 1, { addr: BigInt(buf), len: 21, flags: DESC_F_WRITE, next: 0 });
  for (let i = 0; i < 64; i++) q.avail[2 + i] = 0;
  const published = (q.availIdx + 1) & 0xffff;
  Atomics.store(q.avail, 1, published);
  await ctl.cmd(Req.SET_VRING_NUM, vringState(0, 64));
  await ctl.cmd(Req.SET_VRING_BASE, vringState(0, q.availIdx));
  await ctl.cmd(Req.SET_VRING_ADDR, vringAddr({ index: 0, desc: mem.uva(q.descGpa), avail: mem.uva(q.availGpa), used: mem.uva(q.availGpa) }));
  await ctl.cmd(Req.SET_VRING_KICK, u64(0), [q.kick]);
  // Once the device has completed the request (its used idx lands on the avail idx), it must still answer.
  const until = Date.now() + 200;
  while (Atomics.load(q.avail, 1) === published && Date.now() < until) await new Promise((r) => setImmediate(r));
  try {
    await ctl.get(Req.GET_QUEUE_NUM);
  } catch (e) {
    return { kind: 'failed-queue', error: `a guest whose used ring overlaps its avail ring (64 entries, one GET_ID published) made the daemon stop answering: ${(e as Error).message}`, hung: true };
  }
  // Put the avail ring back in order before the restart.
  Atomics.store(q.avail, 1, 0);
  Atomics.store(q.used, 1, 0);
  return { kind: 'failed-queue' };
}

export async function run(opts: RunOptions): Promise<FuzzStats> {
  const { seed, start, batch, maxFailures, avoid, log } = withDefaults(opts);
  const failures: Failure[] = [];
  const extra: Record<string, number> = { queueFailures: 0, restarts: 0, reconnects: 0, queue1Ops: 0, q1OverwrittenByQ0: 0, q0SectorsInQ1Area: 0, verifications: 0, selfFeed: 0 };
  const t0 = Date.now();
  const ticker = new Ticker('ring', t0, opts.onProgress);
  let inputs = 0;
  let closes = 0;
  let replies = 0;

  const initImage = (fd: number): void => void writeSync(fd, PATTERN_IMAGE, 0, IMAGE_BYTES, 0);
  let d = await FuzzDaemon.start({ numQueues: 2, imageBytes: IMAGE_BYTES, initImage });
  const fz = new RingFuzzer(d, seed);
  let base: Baseline | undefined;
  let problemsSeen = 0;
  let queueLogsBase = 0;
  let expectedQueueLogs = 0;

  const suppress = new Suppressor(avoid, log);
  let curTags: Set<string> = new Set();
  const fail = (index: number, kind: string, message: string): void => {
    const f = { seed, index, kind, message };
    failures.push(f);
    log(describeFailure(f, 'ring'));
    if (index >= 0) suppress.failed(curTags);
  };
  // Session variations change every batch and queue 0's size every 64 inputs, both as functions of the
  // input index, so a replay with --start sees the ring as the full run did (up to its indices).
  const sessionRng = (i: number): Rng => new Rng(seed ^ 0x5e55, Math.floor(i / batch));
  const wantSize = (i: number): number => new Rng(seed ^ 0x512e, Math.floor(i / 64)).pick([4, 16, 64, 128, 128, 256, 1024]);

  /** Replace a dead or hung daemon (reporting it unless the caller already did) and start over. */
  const restartDaemon = async (index: number, why: string, reported = false): Promise<void> => {
    const hung = !d.exited();
    checkRss(index);
    let busy = '';
    if (hung) {
      const b = await d.cpuBusy();
      if (b !== undefined) busy = ` (daemon CPU ${Math.round(Math.min(b, 1) * 100)}% of a core${b > 0.8 ? ': a busy loop' : ''})`;
    }
    if (!reported) fail(index, hung ? 'daemon hung' : 'daemon died', `${why}${busy}\n--- daemon log (tail) ---\n${d.log.recent(12)}`);
    else log(`  (vhostd ${hung ? `hung${busy}` : d.exitInfo}: killed and restarted)`);
    fz.ctl?.close();
    fz.ctl = undefined;
    await d.stop(hung);
    fz.g.mem.fill(W_START, W_END - W_START, POISON);
    d = await FuzzDaemon.start({ numQueues: 2, imageBytes: IMAGE_BYTES, initImage });
    fz.d = d;
    extra.restarts!++;
    fz.image = PATTERN_IMAGE.slice();
    fz.allowed.fill(null);
    fz.mixed.clear();
    fz.q1Error = undefined;
    fz.q1Mismatches = [];
    fz.q1Work = undefined;
    problemsSeen = 0;
    queueLogsBase = 0;
    expectedQueueLogs = 0;
    base = undefined;
    // The old device's rings are gone: start both queues from scratch.
    (fz as unknown as { newQueue1(): void }).newQueue1();
    fz.q0.availIdx = 0;
    Atomics.store(fz.q0.used, 1, 0);
    await fz.connect(sessionRng(index + 1), wantSize(index + 1));
  };

  const newProblems = (index: number): void => {
    d.log.scan();
    if (d.log.problems.length > problemsSeen) {
      const lines = d.log.problems.slice(problemsSeen, problemsSeen + 3);
      fail(index, 'daemon logged an internal error', `${lines.map(summarizeLogLine).join(' / ')}\n${lines.join('\n')}`);
      problemsSeen = d.log.problems.length;
    }
  };

  /** The daemon's peak RSS against RSS_BOUND. */
  const checkRss = (index: number): void => {
    const rss = d.peakRss();
    if (rss === undefined) return;
    extra.peakRssMiB = Math.max(extra.peakRssMiB ?? 0, Math.round(rss / MiB));
    if (rss > RSS_BOUND && !rssReported) {
      rssReported = true;
      fail(index, 'memory', `daemon peak RSS (VmHWM) ${(rss / MiB).toFixed(0)} MiB is above the bound of ${RSS_BOUND / MiB} MiB`);
    }
  };
  let rssReported = false;

  /** Between batches: queue 1 settled, image and guest memory verified, failures logged, a reconnect and a leak check. */
  const checkpoint = async (index: number, gen: Gen | undefined): Promise<void> => {
    checkRss(index);
    await fz.q1Work;
    if (fz.q1Error) {
      fail(index, 'healthy queue failed', `queue 1 while fuzzing queue 0: ${fz.q1Error}`);
      fz.q1Error = undefined;
    }
    for (const why of fz.unexplainedQ1()) fail(index, 'healthy queue failed', `queue 1 while fuzzing queue 0: ${why}`);
    extra.queue1Ops = fz.q1Ops;
    extra.q1OverwrittenByQ0 = fz.q1Overwritten;
    extra.q0SectorsInQ1Area = fz.q0InQ1.reduce((a, b) => a + b, 0);
    const v = fz.verify();
    extra.verifications!++;
    if (v) fail(index, 'corruption', `after inputs up to ${index}: ${v}`);
    if (gen) {
      const w = fz.checkW(gen);
      if (w) fail(index, 'corruption', `after inputs up to ${index}: ${w}`);
    }
    d.log.scan();
    const deadline = Date.now() + 1_000;
    while (d.log.queueFailures - queueLogsBase < expectedQueueLogs && Date.now() < deadline) {
      await sleep(10);
      d.log.scan();
    }
    if (d.log.queueFailures - queueLogsBase < expectedQueueLogs) {
      fail(index, 'silent queue failure', `${expectedQueueLogs} queue failures signalled, ${d.log.queueFailures - queueLogsBase} 'virtqueue failed' log lines`);
    }
    queueLogsBase = d.log.queueFailures;
    expectedQueueLogs = 0;
    newProblems(index);
    // Reconnect: the stop order, a leak check with the device idle, and a fresh start.
    await fz.disconnect();
    extra.reconnects!++;
    if (!base) {
      const st = await idleState(d);
      if (st) base = { fds: st.fds, maps: st.maps.length };
    } else {
      const leak = await checkLeaks(d, base);
      if (leak) {
        fail(-1, 'leak', `after inputs up to ${index}: ${leak}`);
        const st = await idleState(d);
        if (st) base = { fds: st.fds, maps: st.maps.length };
      }
    }
    await fz.connect(sessionRng(index + 1), wantSize(index + 1));
  };

  try {
    await fz.connect(sessionRng(start), wantSize(start));
    await checkpoint(start - 1, undefined);
    let gen: Gen | undefined;
    const genRng = new Rng(seed, 0xfffffffe);
    for (let index = start; index < start + opts.count; index++) {
      if (failures.length >= maxFailures || opts.signal?.aborted) break;
      const rng = new Rng(seed, index);
      if (fz.q0Size !== wantSize(index)) {
        try {
          fz.q0.availIdx = await fz.stopQueue0();
          await fz.startQueue0(wantSize(index));
          await fz.ctl!.cmd(Req.SET_VRING_ENABLE, vringState(0, 1));
        } catch (e) {
          await restartDaemon(index, `resizing queue 0 failed: ${(e as Error).message}`);
          gen = undefined;
          continue;
        }
      }
      // The generator keeps the W arena across inputs (so one epoch's check covers many); H and T start over each input.
      const old = gen;
      gen = new Gen(fz.g, rng, fz.q0, has(fz.features, VF.INDIRECT_DESC));
      if (old) {
        gen.w.cur = old.w.cur;
        gen.wRanges = old.wRanges;
      }
      // VHOSTD_FUZZ_CHECK_EACH: check W after every input, to find which one wrote outside its buffers.
      if (gen.w.cur > W_END - 512 * KiB || (process.env.VHOSTD_FUZZ_CHECK_EACH && old)) {
        const w = fz.checkW(gen);
        if (w) fail(index, 'corruption', w);
      }
      let p: Planned;
      try {
        p = plan(gen, avoid);
      } catch (e) {
        fail(index, 'fuzzer bug', `generating the input threw: ${(e as Error).stack}`);
        continue;
      }
      curTags = p.tags;
      fz.traceOn = !!process.env.VHOSTD_FUZZ_TRACE && index >= Number(process.env.VHOSTD_FUZZ_TRACE);
      if (p.selfFeed) extra.selfFeed!++;
      if (index % 16 === 0) fz.queue1Traffic(genRng);
      let res: Judged;
      try {
        res = await runInput(fz, gen, p);
      } catch (e) {
        // A TypeError or RangeError is the fuzzer's own bug: show where, so it is not mistaken for the daemon's.
        const err = e as Error;
        const own = err instanceof TypeError || err instanceof RangeError;
        res = { kind: 'ok', error: own ? `fuzzer bug while running the input: ${err.stack}` : `control connection: ${err.message}`, hung: true };
      }
      inputs++;
      ticker.messages += p.heads.length;
      if (process.env.VHOSTD_FUZZ_TRACE && index >= Number(process.env.VHOSTD_FUZZ_TRACE)) console.log(`#${index} ${res.kind} err=${fz.errSignals} calls=${fz.callSignals} size=${fz.q0Size} avail=${fz.q0.availIdx} lastUsed=${fz.q0.lastUsed} usedMem=${Atomics.load(fz.q0.used, 1)} tags=${[...p.tags]} ${p.notes.join(' | ').slice(0, 300)}`);
      if (d.exited()) {
        await restartDaemon(index, `vhostd ${d.exitInfo} during input ${index}`);
        gen = undefined;
        continue;
      }
      if (res.error) fail(index, res.hung ? 'no progress' : 'bad completion', `${res.error}\n  --- daemon log (tail) ---\n${d.log.recent(4)}`);
      if (res.hung) {
        await restartDaemon(index, `no answer during input ${index}`, true);
        gen = undefined;
        continue;
      }
      if (res.error && res.kind === 'ok') {
        // Out of step with the model: stop and restart queue 0 so the next input starts clean.
        try {
          fz.q0.availIdx = await fz.stopQueue0();
          await fz.startQueue0(fz.q0Size);
          await fz.ctl!.cmd(Req.SET_VRING_ENABLE, vringState(0, 1));
        } catch (e) {
          await restartDaemon(index, `resynchronising queue 0 failed: ${(e as Error).message}`);
          gen = undefined;
          continue;
        }
      }
      if (res.kind === 'failed-queue') {
        closes++;
        extra.queueFailures!++;
        if (!p.selfFeed) expectedQueueLogs++;
        try {
          const size = wantSize(index + 1);
          if (res.expectBase !== undefined) {
            const got = await fz.restartQueue0(size, res.expectBase);
            if (got !== res.expectBase) {
              fail(index, 'consumed past a failure', `after the queue failed, GET_VRING_BASE says ${got}, the model says ${res.expectBase}: chains after the failing one were taken`);
              fz.q0.availIdx = await fz.stopQueue0();
              await fz.startQueue0(size);
              await fz.ctl!.cmd(Req.SET_VRING_ENABLE, vringState(0, 1));
            }
          } else {
            fz.q0.availIdx = p.selfFeed ? 0 : await fz.stopQueue0();
            if (p.selfFeed) await fz.stopQueue0();
            await fz.startQueue0(size);
            await fz.ctl!.cmd(Req.SET_VRING_ENABLE, vringState(0, 1));
          }
        } catch (e) {
          await restartDaemon(index, `restarting queue 0 failed: ${(e as Error).message}`);
          gen = undefined;
          continue;
        }
      } else replies++;
      newProblems(index);
      if ((index + 1) % batch === 0) {
        try {
          await checkpoint(index, gen);
        } catch (e) {
          // The stop order or the reconnect failed: the daemon died or stopped answering.
          await restartDaemon(index, `checkpoint after input ${index}: ${(e as Error).message}`);
        }
        gen = undefined;
      }
      ticker.tick(inputs, failures.length);
    }
    if (!d.exited()) await checkpoint(start + opts.count - 1, gen);
    if (!d.exited()) checkRss(start + opts.count - 1);
  } catch (e) {
    fail(-1, 'fuzzer error', (e as Error).stack ?? String(e));
  } finally {
    await fz.q1Work?.catch(() => {});
    fz.destroy();
    await d.stop();
  }
  const elapsedMs = Date.now() - t0;
  extra.timeoutWakeups = fz.timeouts;
  ticker.tick(inputs, failures.length, true);
  return { target: 'ring', seed, inputs, messages: ticker.messages, closes, replies, failures, elapsedMs, rate: (inputs * 1000) / elapsedMs, extra };
}
