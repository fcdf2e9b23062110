// Socket fuzzer: a hostile vhost-user front-end. Each input is one connection
// carrying a mutated version of the message sequence QEMU 7.2 sends a
// vhost-user-blk back-end (negotiation, memory table, rings, some I/O, stop).
//
// For every input the daemon must reply correctly (flags exactly 0x5, the
// request's own code, a well-formed body) or close the connection, within a
// timeout; it must never crash or hang; every close must be logged; and after
// each batch it must serve a well-formed session, with no fds or memfd
// mappings left behind.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { constants, ftruncateSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { native, EFD_CLOEXEC, EFD_NONBLOCK, MFD_CLOEXEC, PROT_READ, PROT_WRITE } from '../../src/native/index.js';
import { T } from '../driver/blk.js';
import { GiB, GuestMemory, MiB } from '../driver/guest.js';
import { DRIVER_FEATURES, DRIVER_PROTOCOL } from '../driver/session.js';
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE } from '../driver/virtqueue.js';
import { inflightQueueRegion } from '../driver/inflight.js';
import {
  bit,
  configMsg,
  F_NEED_REPLY,
  has,
  inflightMsg,
  memTable,
  PF,
  readU64,
  Req,
  reqName,
  singleRegion,
  u64,
  VERSION,
  VF,
  VRING_NOFD,
  vringAddr,
  vringState,
  type RegionMsg,
} from '../driver/wire.js';
import { frame, RawConn, type Reply } from './client.js';
import {
  checkLeaks,
  connectAccepted,
  describeFailure,
  withDefaults,
  healthySession,
  idleState,
  Suppressor,
  Ticker,
  type Baseline,
  type Failure,
  type FuzzStats,
  type RunOptions,
} from './common.js';
import { FuzzDaemon, summarizeLogLine } from './daemon.js';
import { Rng } from './prng.js';
import { MAX_MEM_SLOTS } from '../../src/limits.js';

const NUM_QUEUES = 2;
/** The variant daemon (--num-queues 64) that the many-queue inputs run against. */
const MANY_QUEUES = 64;
/**
 * Which inputs are many-queue ones: a block of MANY_BLOCK consecutive indexes in every
 * MANY_PERIOD blocks, by index alone (so a replay picks the same daemon whatever --batch says).
 */
const MANY_BLOCK = 200;
const MANY_PERIOD = 100;
export const isManyIndex = (index: number): boolean => Math.floor(index / MANY_BLOCK) % MANY_PERIOD === MANY_PERIOD / 2;
/** Image size of both daemons (FuzzDaemon's default): 8192 sectors. */
const IMAGE_SECTORS = (4 * 1024 * 1024) / 512;
const REPLY_TIMEOUT_MS = 2_000;
/** Size of the dirty log's memfd. */
const LOG_FILE = 1 << 20;
const NR = F_NEED_REPLY;
const V = VERSION;
/** Requests whose reply carries a body: answered whatever need_reply says. */
const GETS = new Set<number>([
  Req.GET_FEATURES, Req.GET_VRING_BASE, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM, Req.GET_CONFIG,
  Req.GET_INFLIGHT_FD, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS,
  // No body worth the name, but answered always: QEMU waits for it.
  Req.SET_LOG_BASE,
]);
const KNOWN = Object.values(Req) as number[];
const UNKNOWN_CODES = [0, 19, 20, 22, 23, 26, 27, 28, 29, 30, 33, 35, 41, 42, 99, 255, 0x7fffffff, 0xffffffff];

// ---------------------------------------------------------------- resources

interface NamedFd {
  name: string;
  fd: number;
  /** epoll accepts it (eventfd, pipe, socket). */
  pollable: boolean;
  /** Bytes mappable from it, when it is a file (undefined: not mappable or unbounded). */
  fileSize?: number;
}

interface RegionInfo {
  msg: RegionMsg;
  fd: number;
}

/** Guest memory, eventfds and odd fds, made once per run and passed (dup'ed by sendmsg) to every input. */
class Resources {
  readonly mem: GuestMemory;
  readonly regions: RegionInfo[];
  readonly kick: number[] = [];
  readonly call: number[] = [];
  readonly err: number[] = [];
  /** Call fds installed late (after the kick, after I/O, in a swap): drained before they are sent, read after. */
  readonly late: number[] = [];
  readonly junk: NamedFd[] = [];
  readonly names = new Map<number, string>();
  readonly fileSize = new Map<number, number>();
  private readonly dir: string;
  private readonly own: number[] = [];
  /** Region 0 as bytes and as a DataView, for rings and request buffers. */
  readonly r0: Uint8Array;
  readonly r0v: DataView;
  /** Region 1: the many-queue layout's rings and buffers. */
  readonly r1: Uint8Array;
  readonly r1v: DataView;
  /** An inflight area the front-end hands over with SET_INFLIGHT_FD, mapped here to write its contents. */
  readonly inflightFd: number;
  private readonly inflightAddr: bigint;
  readonly inflight: Uint8Array;
  /** A dirty log for SET_LOG_BASE (1 MiB of bits: 32 GiB of guest memory), never mapped here. */
  readonly logFd: number;

  constructor() {
    // Region 0 holds rings and buffers; 1 is adjacent; 2 sits above 4 GiB at a 3 GiB file offset, like QEMU's high RAM.
    this.mem = new GuestMemory([
      { gpa: 0, size: 1 * MiB, mmapOffset: 0 },
      { gpa: 1 * MiB, size: 1 * MiB, mmapOffset: 2 * MiB },
      { gpa: 4 * GiB, size: 1 * MiB, mmapOffset: 3 * GiB },
    ]);
    this.regions = this.mem.regions.map((r) => ({ msg: r.message(), fd: r.fd }));
    this.mem.regions.forEach((r, i) => {
      this.names.set(r.fd, `region${i}-memfd`);
      this.fileSize.set(r.fd, r.mmapOffset + r.size);
    });
    this.r0 = this.mem.regions[0]!.bytes;
    this.r0v = new DataView(this.r0.buffer, this.r0.byteOffset, this.r0.byteLength);
    this.r1 = this.mem.regions[1]!.bytes;
    this.r1v = new DataView(this.r1.buffer, this.r1.byteOffset, this.r1.byteLength);
    for (let q = 0; q < MANY_QUEUES; q++) {
      for (const [list, name] of [[this.kick, 'kick'], [this.call, 'call'], [this.err, 'err']] as const) {
        const fd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        this.own.push(fd);
        list.push(fd);
        this.names.set(fd, `${name}${q}-eventfd`);
      }
    }
    for (let i = 0; i < 4; i++) {
      const fd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      this.own.push(fd);
      this.late.push(fd);
      this.names.set(fd, `late-call${i}-eventfd`);
    }
    this.dir = mkdtempSync(join(tmpdir(), 'vhostd-fuzz-fds-'));
    const add = (name: string, fd: number, pollable: boolean, fileSize?: number): void => {
      this.own.push(fd);
      this.junk.push({ name, fd, pollable, fileSize });
      this.names.set(fd, name);
      if (fileSize !== undefined) this.fileSize.set(fd, fileSize);
    };
    add('eventfd', native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), true);
    add('/dev/null', openSync('/dev/null', 'r'), false);
    add('/dev/zero', openSync('/dev/zero', 'r+'), false);
    const fifo = join(this.dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    add('pipe', openSync(fifo, constants.O_RDWR | constants.O_NONBLOCK), true);
    add('directory', openSync(this.dir, 'r'), false);
    add('unix-socket', native.socket(1 /* AF_UNIX */, 1 /* SOCK_STREAM */, 0), true);
    const small = native.memfdCreate('vhostd-fuzz-small', MFD_CLOEXEC);
    ftruncateSync(small, 4096);
    add('small-memfd', small, false, 4096);
    add('readonly-memfd', openSync(`/proc/self/fd/${this.regions[0]!.fd}`, 'r'), false, 1 * MiB);
    const file = openSync(join(this.dir, 'file'), 'w+');
    ftruncateSync(file, 1 * MiB);
    add('regular-file', file, false, 1 * MiB);
    // OUT data: anything but zeros.
    this.r0.fill(0x5a, DATA_GPA, DATA_GPA + NUM_QUEUES * 0x10000);
    this.r1.fill(0x5a, MANY.data(0, 0), MANY.data(0, MANY.slots));
    this.inflightFd = native.memfdCreate('vhostd-fuzz-inflight', MFD_CLOEXEC);
    ftruncateSync(this.inflightFd, INFLIGHT_FILE);
    this.inflightAddr = native.mmap(this.inflightFd, INFLIGHT_FILE, 0, PROT_READ | PROT_WRITE);
    this.inflight = new Uint8Array(native.view(this.inflightAddr, INFLIGHT_FILE));
    this.names.set(this.inflightFd, 'inflight-memfd');
    this.fileSize.set(this.inflightFd, INFLIGHT_FILE);
    this.logFd = native.memfdCreate('vhostd-fuzz-log', MFD_CLOEXEC);
    ftruncateSync(this.logFd, LOG_FILE);
    this.names.set(this.logFd, 'log-memfd');
    this.fileSize.set(this.logFd, LOG_FILE);
  }

  name(fd: number): string {
    return this.names.get(fd) ?? `fd${fd}`;
  }

  /** Read an eventfd's counter (0 when it is not readable). */
  static count(fd: number): bigint {
    const b = new BigUint64Array(1);
    return native.read(fd, new Uint8Array(b.buffer)) === 8 ? b[0]! : 0n;
  }

  /** Drain the pipe so a call fd pointed at it never fills it. */
  drainPipe(): void {
    const p = this.junk.find((j) => j.name === 'pipe')!;
    const b = new Uint8Array(65536);
    while (native.read(p.fd, b) > 0) {
      /* drain */
    }
  }

  destroy(): void {
    native.detach(this.inflight.buffer as ArrayBuffer);
    native.munmap(this.inflightAddr, INFLIGHT_FILE);
    native.close(this.inflightFd);
    native.close(this.logFd);
    for (const fd of this.own) native.close(fd);
    this.mem.destroy();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// Ring and buffer placement in region 0 (gpa == offset).
const RING_GPA = (q: number): number => 0x10000 * (q + 1);
const DESC_OFF = 0;
const AVAIL_OFF = 0x4000;
const USED_OFF = 0x5000;
const HDR_GPA = 0x40000;
const TABLE_GPA = 0x48000;
const DATA_GPA = 0x50000;
const INFLIGHT_FILE = 64 * 1024;

/**
 * Where one input's rings and request buffers live: offsets in one region, with
 * `slots` request slots per queue (header, status byte, indirect table, data), so
 * requests in flight together never share a buffer and each status can be checked.
 */
interface Layout {
  region: 0 | 1;
  /** Guest physical address of offset 0 of the region. */
  gpa0: number;
  ring(q: number): number;
  desc: number;
  avail: number;
  used: number;
  /** Bytes of ring area to zero before each input. */
  ringArea: [number, number];
  slots: number;
  hdr(q: number, k: number): number;
  table(q: number, k: number): number;
  data(q: number, k: number): number;
}

/** Two queues of up to 256 entries in region 0. */
const TWO: Layout = {
  region: 0,
  gpa0: 0,
  ring: RING_GPA,
  desc: DESC_OFF,
  avail: AVAIL_OFF,
  used: USED_OFF,
  ringArea: [RING_GPA(0), RING_GPA(NUM_QUEUES)],
  slots: 8,
  hdr: (q, k) => HDR_GPA + q * 0x400 + (k % 8) * 0x80,
  table: (q, k) => TABLE_GPA + q * 0x400 + (k % 8) * 0x80,
  data: (q, k) => DATA_GPA + q * 0x10000 + (k % 8) * 0x1000,
};

/**
 * 64 queues of up to 64 entries in region 1 (gpa 1 MiB): 8 KiB a ring (the used ring
 * 4 KiB after the avail ring, so no ring overlaps another), 4 request slots a queue;
 * data buffers are shared between queues (their contents are not checked).
 */
const MANY: Layout = {
  region: 1,
  gpa0: 1 * MiB,
  ring: (q) => q * 0x2000,
  desc: 0,
  avail: 0x400,
  used: 0x1400,
  ringArea: [0, MANY_QUEUES * 0x2000],
  slots: 4,
  hdr: (q, k) => 0x80000 + q * 0x200 + (k % 4) * 0x80,
  table: (q, k) => 0x88000 + q * 0x200 + (k % 4) * 0x80,
  data: (_q, k) => 0x90000 + (k % 4) * 0x1000,
};

// ---------------------------------------------------------------- inputs

type Step =
  | {
      t: 'msg';
      name: string;
      req: number;
      flags: number;
      payload: Uint8Array;
      /** Header size field when it lies about the payload. */
      size?: number;
      fds: number[];
      /** Byte offsets to split the frame at (separate writes). */
      split?: number[];
      /** fds per chunk when split (default: all on the first). */
      chunkFds?: number[][];
      mutated?: boolean;
      /** Oracles, checked only while nothing before this message was mutated: */
      /** GET_VRING_BASE must answer the ring's published count, when every request published on it was awaited. */
      checkBase?: boolean;
      /** The daemon must close the connection at this message (the reason it must). */
      mustClose?: string;
      /** Empty this (late call) eventfd just before sending. */
      drain?: number;
    }
  | { t: 'raw'; name: string; bytes: Uint8Array; fds: number[]; mutated: true }
  | { t: 'io'; name: string; q: number; type: number; sector: number; indirect: boolean; mutated?: boolean }
  /**
   * Unmutated so far: wait until queue q's used idx reaches n, then check the status and
   * used length of every request it completed ('still': the ring must not have moved, n is
   * what it showed before).
   */
  | { t: 'await'; name: string; q: number; n: number; still?: boolean; mutated?: boolean }
  /**
   * Unmutated so far: a GET_QUEUE_NUM, waited for, so everything before it is processed;
   * then `lateFd`, a call fd installed since, must be readable with a count >= 1.
   */
  | { t: 'barrier'; name: string; lateFd?: number; mutated?: boolean };

type MsgStep = Extract<Step, { t: 'msg' }>;

interface Input {
  steps: Step[];
  /** Ring placement; 'many' inputs run on the 64-queue daemon. */
  layout: Layout;
  /** Queues the daemon serves (what GET_QUEUE_NUM must answer). */
  numQueues: number;
  /** The valid variation the sequence follows. */
  variant: string;
  /** Wait for each reply of the unmutated prefix (like QEMU), or send everything at once. */
  sync: boolean;
  /** Send consecutive messages in one write where possible. */
  coalesce: boolean;
  /** 'probe': end with GET_QUEUE_NUM and wait; 'close': just close; 'close-mid': close inside a message. */
  end: 'probe' | 'close' | 'close-mid';
  /** Bytes of a message sent before closing ('close-mid'). */
  partial?: Uint8Array;
  partialFds?: number[];
  /** More than 8 fds in one sendmsg (through the Python helper). */
  manyFds?: number;
  queueSize: number[];
  /** Inflight area contents to write once the connection is accepted (when the sequence hands one over). */
  inflight?: { mode: 'zero' | 'plausible' | 'random'; seed: number; queues: number; capacity: number };
  tags: Set<string>;
  mutations: string[];
}

interface Offer {
  features: bigint;
  protocol: bigint;
}

function msg(name: string, req: number, flags: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = []): MsgStep {
  return { t: 'msg', name, req, flags, payload, fds };
}

/** Requests per queue so far, in a sequence whose I/O is checked. */
type IoCounts = number[];

/** One blk request on queue q (none once the queue's request slots are all used). */
function pushIo(steps: Step[], rng: Rng, cnt: IoCounts, q: number, features: bigint, layout: Layout): void {
  if (cnt[q]! >= layout.slots) return;
  const type = rng.pick([T.OUT, T.IN, T.FLUSH, T.GET_ID, T.OUT, T.IN]);
  const sector = rng.chance(0.9) ? rng.int(IMAGE_SECTORS - 7) : rng.pick([IMAGE_SECTORS - 7, IMAGE_SECTORS, 2 ** 40]);
  steps.push({ t: 'io', name: `io(${type})`, q, type, sector, indirect: has(features, VF.INDIRECT_DESC) && rng.chance(0.3) });
  cnt[q]!++;
}

/** Wait for every request sent so far (the daemon must complete each with the right status). */
function pushAwaits(steps: Step[], cnt: IoCounts): void {
  cnt.forEach((n, q) => {
    if (n) steps.push({ t: 'await', name: `await(${q},${n})`, q, n });
  });
}

/** A late call fd for queue q (drained before it is sent), and the check that it was signalled at once. */
function pushLateCall(steps: Step[], cf: number, q: number, fd: number): void {
  steps.push({ ...msg(`SET_VRING_CALL(${q},late)`, Req.SET_VRING_CALL, cf, u64(q), [fd]), drain: fd });
  steps.push({ t: 'barrier', name: `barrier(call fd of ${q} signalled)`, lateFd: fd });
}

/** QEMU's stop order; GET_VRING_BASE must return the published avail index when all I/O was awaited. */
function pushStop(steps: Step[], nq: number, features: bigint, flags: number, cnt: IoCounts | undefined): void {
  if (has(features, VF.PROTOCOL_FEATURES)) {
    for (let q = 0; q < nq; q++) steps.push(msg(`SET_VRING_ENABLE(${q},0)`, Req.SET_VRING_ENABLE, flags, vringState(q, 0)));
  }
  for (let q = 0; q < nq; q++) steps.push({ ...msg(`GET_VRING_BASE(${q})`, Req.GET_VRING_BASE, V, vringState(q, 0)), checkBase: cnt !== undefined });
}

/** NUM, BASE, ADDR, (ERR), KICK, CALL for queue q of `layout`. */
function ringSetup(rng: Rng, res: Resources, layout: Layout, q: number, size: number, flags: number, err: boolean): Record<'num' | 'base' | 'addr' | 'kick' | 'call', MsgStep> & { err?: MsgStep } {
  const uva = res.regions[layout.region]!.msg.userspaceAddr + BigInt(layout.ring(q));
  return {
    num: msg(`SET_VRING_NUM(${q})`, Req.SET_VRING_NUM, flags, vringState(q, size)),
    base: msg(`SET_VRING_BASE(${q})`, Req.SET_VRING_BASE, flags, vringState(q, 0)),
    addr: msg(`SET_VRING_ADDR(${q})`, Req.SET_VRING_ADDR, flags, vringAddr({ index: q, desc: uva + BigInt(layout.desc), avail: uva + BigInt(layout.avail), used: uva + BigInt(layout.used) })),
    err: err && rng.chance(0.3) ? msg(`SET_VRING_ERR(${q})`, Req.SET_VRING_ERR, flags, u64(q), [res.err[q]!]) : undefined,
    kick: msg(`SET_VRING_KICK(${q})`, Req.SET_VRING_KICK, flags, u64(q), [res.kick[q]!]),
    call: msg(`SET_VRING_CALL(${q})`, Req.SET_VRING_CALL, flags, u64(q), [res.call[q]!]),
  };
}

/** A 4 KiB region of the small memfd for slot-filling ADD_MEM_REG (distinct gpa and front-end address for each i). */
function smallRegion(res: Resources, i: number): RegionInfo {
  const fd = res.junk.find((j) => j.name === 'small-memfd')!.fd;
  return { msg: { guestPhysAddr: (64n << 30n) + BigInt(i) * 4096n, memorySize: 4096n, userspaceAddr: (1n << 44n) + BigInt(i) * 4096n, mmapOffset: 0n }, fd };
}

/** Negotiation as QEMU 7.2 does it; returns the protocol features acked and the message flags for commands. */
function negotiate(rng: Rng, steps: Step[], offer: Offer, useInflight: boolean, extra = 0n): { pf: bigint; cf: number } {
  const pf = offer.protocol & (DRIVER_PROTOCOL | extra | (useInflight ? bit(PF.INFLIGHT_SHMFD) : 0n)) & (rng.chance(0.8) ? ~0n : ~bit(PF.REPLY_ACK));
  const cf = has(pf, PF.REPLY_ACK) ? V | NR : V;
  steps.push(msg('GET_FEATURES', Req.GET_FEATURES, V));
  steps.push(msg('GET_PROTOCOL_FEATURES', Req.GET_PROTOCOL_FEATURES, V));
  steps.push(msg('SET_PROTOCOL_FEATURES', Req.SET_PROTOCOL_FEATURES, V, u64(pf)));
  steps.push(msg('GET_QUEUE_NUM', Req.GET_QUEUE_NUM, V));
  steps.push(msg('SET_OWNER', Req.SET_OWNER, cf));
  if (has(pf, PF.CONFIG)) steps.push(msg('GET_CONFIG', Req.GET_CONFIG, V, configMsg(0, 57, 0)));
  return { pf, cf };
}

function ringFeaturesFor(rng: Rng, offer: Offer): bigint {
  let features = offer.features & DRIVER_FEATURES;
  if (rng.chance(0.2)) features &= ~bit(VF.EVENT_IDX);
  if (rng.chance(0.1)) features &= ~bit(VF.INDIRECT_DESC);
  if (rng.chance(0.1)) features &= ~bit(VF.PROTOCOL_FEATURES); // rings enabled at once
  return features;
}

/**
 * The QEMU 7.2 sequence for vhost-user-blk, with random but valid variations. Besides the
 * plain one (I/O sent and not waited for), checked variants wait for their I/O and check it:
 * late call fds, RESET_OWNER mid-session, kick fds before the ring or memory, 509 slots.
 */
function baseSequence(rng: Rng, res: Resources, offer: Offer, index: number): Input {
  if (isManyIndex(index)) return manySequence(rng, res, offer);
  const steps: Step[] = [];
  let variant: string = rng.weighted([[132, 'plain'], [20, 'late-call'], [16, 'reset-owner'], [16, 'early-kick'], [16, 'migrate'], [1, 'slots']] as const);
  if (variant === 'migrate' && !has(offer.protocol, PF.LOG_SHMFD)) variant = 'plain';
  // With INFLIGHT_SHMFD offered, a third of the plain sequences use it as QEMU does (GET, then SET_INFLIGHT_FD).
  const useInflight = variant === 'plain' && has(offer.protocol, PF.INFLIGHT_SHMFD) && rng.chance(0.3);
  const { pf, cf } = negotiate(rng, steps, offer, useInflight, variant === 'migrate' ? bit(PF.LOG_SHMFD) | bit(PF.STATUS) : 0n);
  if (variant === 'slots' && !has(pf, PF.CONFIGURE_MEM_SLOTS)) variant = 'plain';
  const cmd = (name: string, req: number, payload?: Uint8Array, fds?: number[]): MsgStep => msg(name, req, cf, payload, fds);
  const viaAdd = variant === 'slots' || (has(pf, PF.CONFIGURE_MEM_SLOTS) && rng.chance(0.3));
  if (viaAdd) steps.push(msg('GET_MAX_MEM_SLOTS', Req.GET_MAX_MEM_SLOTS, V));
  const features = ringFeaturesFor(rng, offer);
  steps.push(cmd('SET_FEATURES', Req.SET_FEATURES, u64(features)));
  const nq = rng.chance(0.7) ? 2 : 1;
  const queueSize = Array.from({ length: nq }, () => rng.pick([64, 128, 256]));
  let inflight: Input['inflight'];
  if (useInflight) {
    const capacity = Math.max(...queueSize);
    const queues = NUM_QUEUES;
    const area = { mmapSize: 0n, mmapOffset: 0n, numQueues: queues, queueSize: capacity };
    steps.push(msg('GET_INFLIGHT_FD', Req.GET_INFLIGHT_FD, V, inflightMsg(area)));
    const need = BigInt(queues * inflightQueueRegion(capacity));
    steps.push(cmd('SET_INFLIGHT_FD', Req.SET_INFLIGHT_FD, inflightMsg({ ...area, mmapSize: need }), [res.inflightFd]));
    inflight = { mode: rng.weighted([[5, 'zero'], [3, 'plausible'], [2, 'random']] as const), seed: rng.u32(), queues, capacity };
  }
  const memory: Step[] = [];
  if (viaAdd) {
    for (const r of res.regions) memory.push(cmd('ADD_MEM_REG', Req.ADD_MEM_REG, singleRegion(r.msg), [r.fd]));
  } else {
    memory.push(cmd('SET_MEM_TABLE', Req.SET_MEM_TABLE, memTable(res.regions.map((r) => r.msg)), res.regions.map((r) => r.fd)));
  }
  // Slots: fill all of them with distinct regions before the rings start (QEMU's order; no quiesce per region).
  const distinct = MAX_MEM_SLOTS - res.regions.length;
  if (variant === 'slots') {
    for (let i = 0; i < distinct; i++) {
      const r = smallRegion(res, i);
      memory.push(cmd(`ADD_MEM_REG#${i + 3}`, Req.ADD_MEM_REG, singleRegion(r.msg), [r.fd]));
      // Read the acks now and then, as QEMU does (it waits for each): the daemon closes a connection
      // whose replies it cannot send, and the socket holds only about 278 unread ones.
      if (i % 64 === 63) memory.push({ t: 'barrier', name: `barrier(ADD_MEM_REG#${i + 3})` });
    }
  }
  const rings = Array.from({ length: nq }, (_, q) => ringSetup(rng, res, TWO, q, queueSize[q]!, cf, true));
  const enable: Step[] = [];
  if (has(features, VF.PROTOCOL_FEATURES)) {
    for (let q = 0; q < nq; q++) enable.push(cmd(`SET_VRING_ENABLE(${q},1)`, Req.SET_VRING_ENABLE, vringState(q, 1)));
  }
  const cnt: IoCounts = [0, 0];
  const someIo = (n: number, q?: number): void => {
    for (let i = 0; i < n; i++) pushIo(steps, rng, cnt, q ?? rng.int(nq), features, TWO);
  };
  const stop = (p: number): void => {
    if (rng.chance(p)) pushStop(steps, nq, features, cf, cnt);
  };
  const ordered = (r: (typeof rings)[number]): Step[] => [r.num, r.base, r.addr, ...(r.err ? [r.err] : []), r.kick, r.call];

  if (variant === 'early-kick') {
    // Kick fds before NUM/ADDR, or the whole ring (and its enable) before any memory: each ring starts once complete.
    const mode = rng.pick(['kick-first', 'before-memory', 'shuffled']);
    const memFirst = mode === 'kick-first' || (mode === 'shuffled' && rng.chance(0.5));
    if (memFirst) steps.push(...memory);
    for (const r of rings) {
      if (mode === 'kick-first') steps.push(r.kick, r.call, r.num, r.base, r.addr);
      else if (mode === 'before-memory') steps.push(...ordered(r));
      else {
        // Any order, except that SET_VRING_BASE must come before the ring is complete (a running ring refuses it).
        const perm = rng.shuffle([r.kick, r.call, r.num, r.addr]);
        const last = memFirst ? Math.max(perm.indexOf(r.kick), perm.indexOf(r.num), perm.indexOf(r.addr)) : perm.length;
        perm.splice(rng.int(last + 1), 0, r.base);
        steps.push(...perm);
      }
    }
    steps.push(...enable);
    if (!memFirst) steps.push(...memory);
    variant += `/${mode}`;
    someIo(rng.range(1, 4));
    pushAwaits(steps, cnt);
    stop(0.6);
  } else if (variant === 'late-call') {
    // A queue whose call fd comes late (after the kick, after I/O completed, swapped while
    // I/O is in flight, to the no-fd flag and back): each new fd must be signalled at once.
    const q = rng.int(nq);
    const noCall = rng.chance(0.5);
    steps.push(...memory);
    for (const r of rings) steps.push(...ordered(r).filter((s) => !(noCall && s === rings[q]!.call)));
    steps.push(...enable);
    const late = rng.shuffle([...res.late]);
    let swaps = 0;
    const acts = rng.range(2, 5);
    for (let i = 0; i < acts || !swaps; i++) {
      const act = swaps === late.length ? 'io' : rng.weighted([[3, 'io'], [2, 'await'], [3, 'swap'], [1, 'nofd']] as const);
      if (act === 'io') someIo(rng.range(1, 2), q);
      else if (act === 'await') pushAwaits(steps, cnt);
      else if (act === 'swap') pushLateCall(steps, cf, q, late[swaps++]!);
      else steps.push(cmd(`SET_VRING_CALL(${q},nofd)`, Req.SET_VRING_CALL, u64(q | VRING_NOFD)));
    }
    pushAwaits(steps, cnt);
    if (rng.chance(0.6)) {
      pushStop(steps, nq, features, cf, cnt);
      // A call fd for a stopped ring hears once too.
      if (swaps < late.length && rng.chance(0.4)) pushLateCall(steps, cf, q, late[swaps++]!);
    }
    variant += noCall ? '/no-call-at-start' : '';
  } else if (variant === 'migrate') {
    // QEMU's migration under running rings: a log base, LOG_ALL and the log flag on every ring, I/O
    // meanwhile, a new log, logging off again; then maybe QEMU 7.2's stop (SET_STATUS 0, then GET_VRING_BASE).
    steps.push(...memory);
    for (const r of rings) steps.push(...ordered(r));
    steps.push(...enable);
    const logBase = (name: string, bytes: number): void => {
      const b = new Uint8Array(16);
      new DataView(b.buffer).setBigUint64(0, BigInt(bytes), true);
      steps.push(msg(name, Req.SET_LOG_BASE, cf, b, [res.logFd]));
    };
    const logging = (on: boolean): void => {
      steps.push(cmd(`SET_FEATURES(LOG_ALL ${on ? 'on' : 'off'})`, Req.SET_FEATURES, u64(on ? features | bit(VF.LOG_ALL) : features)));
      rings.forEach((r, q) => {
        const b = r.addr.payload.slice();
        const v = new DataView(b.buffer);
        v.setUint32(4, on ? 1 : 0, true);
        v.setBigUint64(32, on ? BigInt(q) * 0x10000n + 0x100000n : 0n, true);
        steps.push(cmd(`SET_VRING_ADDR(${q}, log ${on ? 'on' : 'off'})`, Req.SET_VRING_ADDR, b));
      });
    };
    someIo(rng.range(0, 3));
    logBase('SET_LOG_BASE', rng.pick([LOG_FILE, 4096, 65536]));
    logging(true);
    someIo(rng.range(1, 4));
    if (rng.chance(0.5)) {
      logBase('SET_LOG_BASE(grown)', LOG_FILE);
      someIo(rng.range(1, 3));
    }
    pushAwaits(steps, cnt);
    if (rng.chance(0.5)) {
      logging(false);
      someIo(rng.range(1, 2));
      pushAwaits(steps, cnt);
    }
    if (has(pf, PF.STATUS) && rng.chance(0.5)) {
      steps.push(cmd('SET_STATUS(DRIVER_OK|FEATURES_OK|DRIVER|ACK)', Req.SET_STATUS, u64(0xf)));
      steps.push(msg('GET_STATUS', Req.GET_STATUS, V));
      if (rng.chance(0.5)) steps.push(cmd('SET_STATUS(0)', Req.SET_STATUS, u64(0)));
    }
    stop(0.6);
  } else if (variant === 'reset-owner') {
    // RESET_OWNER only disables the rings: SET_VRING_ENABLE(1) resumes them, no memory table or ring messages needed.
    steps.push(...memory);
    for (const r of rings) steps.push(...ordered(r));
    steps.push(...enable);
    someIo(rng.range(1, 3));
    pushAwaits(steps, cnt);
    steps.push(cmd('RESET_OWNER', Req.RESET_OWNER));
    steps.push({ t: 'barrier', name: 'barrier(RESET_OWNER)' });
    if (rng.chance(0.6)) {
      // Requests sent to a disabled ring stay in it.
      const before = [...cnt];
      const q = rng.int(nq);
      someIo(rng.range(1, 2), q);
      steps.push({ t: 'barrier', name: 'barrier(I/O on a disabled ring)' });
      steps.push({ t: 'await', name: `still(${q},${before[q]})`, q, n: before[q]!, still: true });
    }
    for (let q = 0; q < nq; q++) steps.push(cmd(`SET_VRING_ENABLE(${q},1)`, Req.SET_VRING_ENABLE, vringState(q, 1)));
    someIo(rng.range(1, 3));
    pushAwaits(steps, cnt);
    stop(0.6);
  } else if (variant === 'slots') {
    // 509 slots in use; a region identical to a mapped one only counts a reference (accepted even when full),
    // REM_MEM_REG drops one reference; a 510th distinct region closes the connection.
    steps.push(...memory);
    for (const r of rings) steps.push(...ordered(r));
    steps.push(...enable);
    someIo(rng.range(1, 2));
    pushAwaits(steps, cnt);
    const dup = rng.chance(0.3) ? res.regions[rng.int(3)]! : smallRegion(res, rng.int(distinct));
    steps.push(cmd('ADD_MEM_REG(duplicate, slots full)', Req.ADD_MEM_REG, singleRegion(dup.msg), [dup.fd]));
    someIo(rng.range(1, 2));
    pushAwaits(steps, cnt);
    const ending = rng.pick(['refuse', 'dup-rem-refuse', 'rem-add']);
    const extra = smallRegion(res, distinct);
    if (ending === 'dup-rem-refuse') {
      steps.push(cmd('REM_MEM_REG(the duplicate: one reference left)', Req.REM_MEM_REG, singleRegion(dup.msg), [dup.fd]));
      someIo(1);
      pushAwaits(steps, cnt);
    }
    if (ending === 'rem-add') {
      let j = rng.int(distinct);
      if (smallRegion(res, j).msg.guestPhysAddr === dup.msg.guestPhysAddr) j = (j + 1) % distinct;
      const r = smallRegion(res, j);
      steps.push(cmd('REM_MEM_REG(a slot freed)', Req.REM_MEM_REG, singleRegion(r.msg), [r.fd]));
      steps.push(cmd('ADD_MEM_REG(into the freed slot)', Req.ADD_MEM_REG, singleRegion(extra.msg), [extra.fd]));
      someIo(1);
      pushAwaits(steps, cnt);
      stop(0.6);
    } else {
      steps.push({ ...cmd('ADD_MEM_REG(510th distinct)', Req.ADD_MEM_REG, singleRegion(extra.msg), [extra.fd]), mustClose: `a ${MAX_MEM_SLOTS + 1}th distinct region with all ${MAX_MEM_SLOTS} slots in use` });
    }
    variant += `/${ending}`;
  } else {
    steps.push(...memory);
    for (const r of rings) steps.push(...ordered(r));
    steps.push(...enable);
    const nio = rng.int(4);
    for (let i = 0; i < nio; i++) {
      const type = rng.pick([T.OUT, T.IN, T.FLUSH, T.GET_ID, T.OUT, T.IN]);
      const sector = rng.chance(0.9) ? rng.int(8000) : rng.pick([8184, 8192, 2 ** 40]);
      steps.push({ t: 'io', name: `io(${type})`, q: rng.int(nq), type, sector, indirect: has(features, VF.INDIRECT_DESC) && rng.chance(0.3) });
    }
    if (rng.chance(0.6)) pushStop(steps, nq, features, cf, undefined);
  }
  return { steps, layout: TWO, numQueues: NUM_QUEUES, variant, sync: rng.chance(0.05), coalesce: rng.chance(0.8), end: 'probe', queueSize, inflight, tags: new Set(), mutations: [] };
}

/**
 * 64 queues on the 64-queue daemon, set up in one pipelined burst without need_reply
 * (NUM/BASE/ADDR/KICK/CALL/ENABLE for each), I/O on random queues, sometimes a late call
 * fd, and the stop order.
 */
function manySequence(rng: Rng, res: Resources, offer: Offer): Input {
  const steps: Step[] = [];
  const { cf } = negotiate(rng, steps, offer, false);
  const features = ringFeaturesFor(rng, offer);
  steps.push(msg('SET_FEATURES', Req.SET_FEATURES, cf, u64(features)));
  steps.push(msg('SET_MEM_TABLE', Req.SET_MEM_TABLE, cf, memTable(res.regions.map((r) => r.msg)), res.regions.map((r) => r.fd)));
  const queueSize = Array.from({ length: MANY_QUEUES }, () => rng.pick([16, 32, 64]));
  const rings = queueSize.map((size, q) => ringSetup(rng, res, MANY, q, size, V, false));
  const pf = has(features, VF.PROTOCOL_FEATURES);
  const en = (q: number): MsgStep => msg(`SET_VRING_ENABLE(${q},1)`, Req.SET_VRING_ENABLE, V, vringState(q, 1));
  const order = rng.pick(['qemu', 'interleaved', 'by-kind']);
  if (order === 'by-kind') {
    for (const k of ['num', 'base', 'addr', 'kick', 'call'] as const) for (const r of rings) steps.push(r[k]);
    if (pf) for (let q = 0; q < MANY_QUEUES; q++) steps.push(en(q));
  } else {
    for (const [q, r] of rings.entries()) {
      steps.push(r.num, r.base, r.addr, r.kick, r.call);
      if (pf && order === 'interleaved') steps.push(en(q));
    }
    if (pf && order === 'qemu') for (let q = 0; q < MANY_QUEUES; q++) steps.push(en(q));
  }
  const cnt: IoCounts = new Array<number>(MANY_QUEUES).fill(0);
  const nio = rng.range(4, 16);
  for (let i = 0; i < nio; i++) pushIo(steps, rng, cnt, rng.chance(0.2) ? rng.pick([0, MANY_QUEUES - 1]) : rng.int(MANY_QUEUES), features, MANY);
  if (rng.chance(0.2)) pushLateCall(steps, cf, rng.int(MANY_QUEUES), rng.pick(res.late));
  pushAwaits(steps, cnt);
  if (rng.chance(0.7)) pushStop(steps, MANY_QUEUES, features, V, cnt);
  return { steps, layout: MANY, numQueues: MANY_QUEUES, variant: `many/${order}`, sync: false, coalesce: true, end: 'probe', queueSize, tags: new Set(), mutations: [] };
}

// ---------------------------------------------------------------- mutations

interface MutCtx {
  rng: Rng;
  res: Resources;
  offer: Offer;
  avoid: Set<string>;
  input: Input;
}

function msgSteps(input: Input, pred: (s: MsgStep) => boolean = () => true): number[] {
  const out: number[] = [];
  input.steps.forEach((s, i) => {
    if (s.t === 'msg' && pred(s)) out.push(i);
  });
  return out;
}

function pickMsg(c: MutCtx, pred?: (s: MsgStep) => boolean): MsgStep | undefined {
  const idx = msgSteps(c.input, pred);
  if (!idx.length) return undefined;
  const s = c.input.steps[c.rng.pick(idx)] as MsgStep;
  s.mutated = true;
  return s;
}

function anyFd(c: MutCtx): number {
  const { rng, res } = c;
  return rng.weighted([
    [4, () => rng.pick(res.junk).fd],
    [1, () => rng.pick(res.regions).fd],
    [1, () => rng.pick([...res.kick.slice(0, 2), ...res.call.slice(0, 2), ...res.err.slice(0, 2)])],
  ])();
}

function randomU64(rng: Rng): bigint {
  return rng.pick([0n, 1n, 0xffffn, 0x10000n, 0xffffffffn, 1n << 32n, 1n << 53n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 4096n, rng.u64()]);
}

function randomU32(rng: Rng): number {
  return rng.pick([0, 1, 2, 3, 7, 8, 255, 256, 257, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff, rng.u32()]);
}

/** Write `v` into a payload copy at `off` (u32 or u64). */
function patch(p: Uint8Array, off: number, v: number | bigint, width: 4 | 8): Uint8Array {
  const out = p.length >= off + width ? p.slice() : (() => {
    const b = new Uint8Array(off + width);
    b.set(p);
    return b;
  })();
  const dv = new DataView(out.buffer);
  if (width === 4) dv.setUint32(off, Number(v) >>> 0, true);
  else dv.setBigUint64(off, BigInt.asUintN(64, BigInt(v)), true);
  return out;
}

function mutateRegion(c: MutCtx, r: RegionInfo, others: RegionInfo[]): RegionInfo {
  const { rng } = c;
  const m = { ...r.msg };
  let fd = r.fd;
  const kind = rng.pick(['size', 'size', 'offset', 'offset', 'gpa', 'uva', 'fd', 'overlap', 'unaligned']);
  switch (kind) {
    case 'size':
      m.memorySize = rng.pick([0n, 1n, 4095n, 1n << 20n, m.memorySize * 2n, 1n << 32n, 1n << 40n, 1n << 46n, 1n << 53n, (1n << 53n) - 4096n, 1n << 63n, (1n << 64n) - 1n]);
      break;
    case 'offset':
      m.mmapOffset = rng.pick([1n << 20n, 1n << 30n, 3n << 30n, 1n << 40n, 1n << 53n, 1n << 63n, (1n << 64n) - 4096n, m.mmapOffset + m.memorySize, m.mmapOffset + 4096n]);
      break;
    case 'gpa':
      m.guestPhysAddr = rng.pick([(1n << 64n) - 4096n, (1n << 64n) - m.memorySize / 2n, 1n << 53n, (1n << 53n) - 4096n, 1n << 63n, m.guestPhysAddr + 1n]);
      break;
    case 'uva':
      m.userspaceAddr = rng.pick([(1n << 64n) - 4096n, 1n << 53n, 0n, 1n << 63n, m.userspaceAddr + 1n]);
      break;
    case 'fd':
      fd = anyFd(c);
      break;
    case 'overlap': {
      const o = others.length ? rng.pick(others).msg : m;
      if (rng.chance(0.5)) m.guestPhysAddr = o.guestPhysAddr + rng.pick([0n, 4096n, o.memorySize - 1n]);
      else m.userspaceAddr = o.userspaceAddr + rng.pick([0n, 4096n, o.memorySize - 1n]);
      break;
    }
    case 'unaligned': {
      // A valid region whose file offset is not page aligned (the daemon maps with a skew).
      const d = rng.pick([1n, 8n, 512n, 4095n]);
      m.mmapOffset += d;
      m.memorySize -= 4096n;
      break;
    }
  }
  // An odd file offset or front-end address puts the rings at odd offsets of the daemon's mapping.
  if ((m.mmapOffset | m.userspaceAddr) & 1n && m.memorySize > 0n && m.memorySize < 1n << 53n) {
    if (c.avoid.has('odd-region-alignment')) return r;
    c.input.tags.add('odd-region-alignment');
  }
  return { msg: m, fd };
}

/** A region whose bytes run past the end of its fd's file: touching them raises SIGBUS in whoever maps it. */
function pastEof(c: MutCtx, r: RegionInfo): boolean {
  const size = c.res.fileSize.get(r.fd);
  if (size === undefined) return false;
  return r.msg.mmapOffset + r.msg.memorySize > BigInt(size) && r.msg.memorySize > 0n && r.msg.memorySize < 1n << 47n;
}

/** Type-aware mutation of one message's fields. */
function mutateFields(c: MutCtx, s: MsgStep): void {
  const { rng, res, offer } = c;
  const p = s.payload;
  switch (s.req) {
    case Req.SET_MEM_TABLE:
    case Req.ADD_MEM_REG:
    case Req.REM_MEM_REG: {
      const single = s.req !== Req.SET_MEM_TABLE;
      let regs: RegionInfo[] = single
        ? [{ msg: decodeRegion(p, 8), fd: s.fds[0] ?? res.regions[0]!.fd }]
        : res.regions.slice(0, p.length >= 4 ? Math.min(new DataView(p.buffer, p.byteOffset).getUint32(0, true), 3) : 3);
      if (!regs.length) regs = [res.regions[0]!];
      const kind = single ? 'region' : rng.pick(['region', 'region', 'count', 'drop', 'dup', 'eight', 'fds']);
      let countField: number | undefined;
      let fds: number[] | undefined;
      if (kind === 'region') {
        // Region 0 holds the rings: a bad mapping there is the one the daemon will touch.
        const i = rng.chance(0.6) ? 0 : rng.int(regs.length);
        const orig = regs[i]!;
        let m = mutateRegion(c, orig, regs.filter((_, j) => j !== i));
        if (pastEof(c, m)) {
          if (c.avoid.has('past-eof')) m = orig;
          else c.input.tags.add('past-eof');
        }
        regs = regs.map((r, j) => (j === i ? m : r));
      } else if (kind === 'count') {
        countField = rng.pick([0, 9, 255, regs.length + 1, regs.length - 1, 0xffffffff]);
      } else if (kind === 'drop') {
        regs = regs.slice(1);
      } else if (kind === 'dup') {
        regs = [...regs, rng.pick(regs)];
      } else if (kind === 'eight') {
        // Eight valid regions carved from region 1's memfd: the most a table can carry.
        const r1 = res.regions[1]!;
        regs = Array.from({ length: 8 }, (_, i) => ({
          msg: {
            guestPhysAddr: BigInt(i) * (1n << 30n) + (8n << 30n),
            memorySize: 64n * 1024n,
            userspaceAddr: r1.msg.userspaceAddr + BigInt(i) * 65536n,
            mmapOffset: r1.msg.mmapOffset + BigInt(i) * 65536n,
          },
          fd: r1.fd,
        }));
        if (rng.chance(0.5)) regs = [res.regions[0]!, ...regs.slice(1)];
      } else {
        fds = rng.chance(0.5) ? regs.slice(1).map((r) => r.fd) : [...regs.map((r) => r.fd), anyFd(c)];
      }
      if (single) {
        s.payload = singleRegion(regs[0]!.msg);
        s.fds = rng.chance(0.1) ? [] : [regs[0]!.fd];
      } else {
        let t = memTable(regs.map((r) => r.msg));
        if (countField !== undefined) t = patch(t, 0, countField, 4);
        s.payload = t;
        s.fds = (fds ?? regs.map((r) => r.fd)).slice(0, 8);
      }
      return;
    }
    case Req.SET_VRING_NUM:
      s.payload = rng.chance(0.3) ? patch(p, 0, randomU32(rng), 4) : patch(p, 4, rng.pick([0, 1, 3, 100, 1000, 1023, 1024, 2048, 4096, 32768, 65536, 0xffffffff, rng.u32()]), 4);
      return;
    case Req.SET_VRING_BASE:
      s.payload = rng.chance(0.3) ? patch(p, 0, randomU32(rng), 4) : patch(p, 4, rng.pick([0xffff, 0x10000, 0xffffffff, rng.u32()]), 4);
      return;
    case Req.SET_VRING_ADDR: {
      const field = rng.pick([0, 4, 8, 16, 24, 32, 8, 16, 24]);
      if (field === 0) s.payload = patch(p, 0, randomU32(rng), 4);
      else if (field === 4) s.payload = patch(p, 4, rng.pick([1, 2, 0xffffffff, rng.u32()]), 4);
      else {
        const cur = rd64(p, field);
        const r0 = res.regions[0]!.msg;
        const v = rng.pick([
          cur + 1n, cur + 2n, cur + 8n, 0n, r0.userspaceAddr + r0.memorySize - 8n, r0.userspaceAddr + r0.memorySize,
          r0.userspaceAddr - 4096n, res.regions[2]!.msg.userspaceAddr, 1n << 53n, (1n << 64n) - 1n, (1n << 64n) - 16n, rng.u64(),
          rd64(p, rng.pick([8, 16, 24])),
        ]);
        // Now and then the used ring exactly on the avail ring (a guest can program that).
        s.payload = field === 16 && rng.chance(0.3) ? patch(p, 16, rd64(p, 24), 8) : patch(p, field, v, 8);
      }
      return;
    }
    case Req.SET_VRING_KICK:
    case Req.SET_VRING_CALL:
    case Req.SET_VRING_ERR: {
      const cur = rd64(p, 0);
      const kind = rng.pick(['index', 'nofd+fd', 'nofd', 'nofd-only', 'bits', 'junk', 'junk', 'two', 'none']);
      if (kind === 'index') s.payload = u64((cur & ~0xffn) | BigInt(rng.pick([2, 3, 7, 63, 64, 255])));
      else if (kind === 'nofd+fd') s.payload = u64(cur | BigInt(VRING_NOFD));
      else if (kind === 'nofd' || kind === 'nofd-only') {
        s.payload = u64(cur | BigInt(VRING_NOFD));
        s.fds = [];
      } else if (kind === 'bits') s.payload = u64(cur | rng.pick([1n << 9n, 1n << 31n, 1n << 32n, 1n << 63n, rng.u64() & ~0x1ffn]));
      else if (kind === 'junk') {
        const j = rng.pick(res.junk);
        if (s.req === Req.SET_VRING_KICK && !j.pollable) {
          if (c.avoid.has('kick-nonpollable')) return;
          c.input.tags.add('kick-nonpollable');
        }
        s.fds = [j.fd];
      } else if (kind === 'two') s.fds = [...s.fds, anyFd(c)];
      else s.fds = [];
      return;
    }
    case Req.GET_CONFIG:
    case Req.SET_CONFIG: {
      const offset = rng.pick([0, 1, 32, 56, 57, 63, 64, 200, 255, 256, 257, 0xfffffff0, 0xffffffff, rng.u32()]);
      const size = rng.pick([0, 1, 2, 8, 57, 64, 255, 256, 257, 300, 4096, 0xffffffff]);
      const dataLen = rng.chance(0.7) ? Math.min(size, 300) : rng.int(300);
      const flags = rng.chance(0.7) ? 0 : randomU32(rng);
      const b = configMsg(offset, size, flags, rng.bytes(dataLen));
      s.payload = b;
      return;
    }
    case Req.SET_FEATURES:
      s.payload = u64(rng.pick([0n, offer.features, offer.features | bit(VF.RING_PACKED), offer.features | bit(VF.LOG_ALL), (1n << 64n) - 1n, rng.u64(), offer.features & ~bit(VF.PROTOCOL_FEATURES), bit(VF.VERSION_1)]));
      return;
    case Req.SET_PROTOCOL_FEATURES:
      s.payload = u64(rng.pick([0n, offer.protocol, offer.protocol | bit(PF.INFLIGHT_SHMFD), offer.protocol | bit(PF.BACKEND_REQ), (1n << 64n) - 1n, rng.u64(), bit(PF.MQ)]));
      return;
    case Req.SET_VRING_ENABLE:
    case Req.GET_VRING_BASE:
      s.payload = rng.chance(0.5) ? patch(p, 0, randomU32(rng), 4) : patch(p, 4, randomU32(rng), 4);
      return;
    case Req.SET_LOG_BASE: {
      const kind = rng.pick(['size', 'offset', 'fd', 'none']);
      if (kind === 'size') s.payload = patch(p.length >= 16 ? p : new Uint8Array(16), 0, rng.pick([0n, 1n, 4095n, BigInt(LOG_FILE) + 1n, 1n << 30n, (1n << 30n) + 1n, 1n << 63n, rng.u64()]), 8);
      else if (kind === 'offset') s.payload = patch(p.length >= 16 ? p : new Uint8Array(16), 8, rng.pick([1n, 4096n, BigInt(LOG_FILE), 1n << 40n, rng.u64()]), 8);
      else if (kind === 'fd') s.fds = [anyFd(c)];
      else s.fds = [];
      return;
    }
    case Req.SET_STATUS:
      s.payload = u64(rng.pick([0n, 1n, 8n, 0xfn, 0x40n, 0x80n, 0xffn, 0x100n, rng.u64()]));
      return;
    case Req.GET_INFLIGHT_FD:
    case Req.SET_INFLIGHT_FD: {
      const field = rng.pick([0, 8, 16, 18]);
      const b = p.length >= 24 ? p.slice() : patch(p, 16, 0, 8);
      const v = new DataView(b.buffer);
      if (field === 0) v.setBigUint64(0, rng.pick([0n, 1n, rd64(p, 0) - 1n, rd64(p, 0) * 3n, 1n << 40n, (1n << 64n) - 1n]) & ((1n << 64n) - 1n), true);
      else if (field === 8) v.setBigUint64(8, rng.pick([1n, 4096n, 65536n, 1n << 40n, 1n << 63n]), true);
      else v.setUint16(field, rng.pick([0, 1, 3, 255, 0xffff, 1024, 1025, 32768, 32769]), true);
      s.payload = b;
      return;
    }
    default:
      s.payload = rng.chance(0.5) ? rng.bytes(rng.skewed(64)) : u64(randomU64(rng));
  }
}

/** A u64 of a payload that may have been cut short by an earlier mutation (0 when absent). */
function rd64(p: Uint8Array, off: number): bigint {
  return p.length >= off + 8 ? readU64(p, off) : 0n;
}

function decodeRegion(p: Uint8Array, off: number): RegionMsg {
  if (p.length < off + 32) return { guestPhysAddr: 0n, memorySize: 1n << 20n, userspaceAddr: 0n, mmapOffset: 0n };
  return { guestPhysAddr: readU64(p, off), memorySize: readU64(p, off + 8), userspaceAddr: readU64(p, off + 16), mmapOffset: readU64(p, off + 24) };
}

function randomMessage(c: MutCtx): MsgStep {
  const { rng } = c;
  const req = rng.chance(0.7) ? rng.pick(KNOWN) : rng.chance(0.5) ? rng.pick(UNKNOWN_CODES) : rng.u32();
  const flags = rng.weighted([[6, V], [3, V | NR], [1, randomU32(rng)]] as const);
  const len = rng.weighted([[3, 0], [3, 8], [2, 40], [1, 12 + rng.int(64)], [1, rng.skewed(600)]] as const);
  const fds = rng.chance(0.15) ? Array.from({ length: rng.range(1, 3) }, () => anyFd(c)) : [];
  const s = msg(`random ${reqName(req)}`, req, flags, rng.bytes(len), fds);
  s.mutated = true;
  return s;
}

type Mutation = (c: MutCtx) => boolean;

const MUTATIONS: [number, string, Mutation][] = [
  [10, 'fields', (c) => {
    const s = pickMsg(c, (m) => m.req !== Req.GET_FEATURES || c.rng.chance(0.1));
    if (!s) return false;
    mutateFields(c, s);
    s.name += '*';
    return true;
  }],
  [4, 'payload-size', (c) => {
    const s = pickMsg(c);
    if (!s) return false;
    const { rng } = c;
    const n = rng.chance(0.5) ? rng.int(s.payload.length + 1) : s.payload.length + rng.range(1, 64);
    const b = new Uint8Array(n);
    b.set(s.payload.subarray(0, Math.min(n, s.payload.length)));
    if (n > s.payload.length) rng.fill(b.subarray(s.payload.length));
    s.payload = b;
    s.name += '[len]';
    return true;
  }],
  [4, 'size-field', (c) => {
    const s = pickMsg(c);
    if (!s) return false;
    const { rng } = c;
    s.size = rng.weighted([
      [4, Math.max(0, s.payload.length + rng.range(-16, 16))],
      [2, rng.int(4097)],
      [1, 4097],
      [1, rng.pick([0x10000, 0x7fffffff, 0xffffffff, rng.u32()])],
    ] as const);
    s.name += `[size=${s.size}]`;
    return true;
  }],
  [3, 'request', (c) => {
    const s = pickMsg(c);
    if (!s) return false;
    s.req = c.rng.chance(0.5) ? c.rng.pick(UNKNOWN_CODES) : c.rng.pick(KNOWN);
    s.name += `[req=${s.req}]`;
    return true;
  }],
  [3, 'flags', (c) => {
    const s = pickMsg(c);
    if (!s) return false;
    s.flags = c.rng.pick([0, 2, 3, V | 4, V | 4 | NR, V | 0x10, V | NR | 0x10, V | 0x100, V | 0x80000000, 0xffffffff, randomU32(c.rng), V | NR, V]);
    s.name += `[flags=0x${s.flags.toString(16)}]`;
    return true;
  }],
  [3, 'fds', (c) => {
    const s = pickMsg(c);
    if (!s) return false;
    const { rng } = c;
    const kind = rng.pick(['add', 'add', 'remove', 'replace', 'many-split']);
    if (kind === 'add') s.fds = [...s.fds, ...Array.from({ length: rng.range(1, 3) }, () => anyFd(c))].slice(0, 8);
    else if (kind === 'remove') s.fds = [];
    else if (kind === 'replace') s.fds = s.fds.length ? s.fds.map(() => anyFd(c)) : [anyFd(c)];
    else {
      // 9..16 fds for one message, in two writes of at most 8 each.
      const n = rng.range(9, 16);
      const all = Array.from({ length: n }, () => anyFd(c));
      const len = 12 + s.payload.length;
      const at = rng.range(1, Math.max(1, len - 1));
      s.split = [at];
      s.chunkFds = [all.slice(0, 8), all.slice(8)];
    }
    if (s.req === Req.SET_VRING_KICK && s.fds.some((fd) => !c.res.junk.find((j) => j.fd === fd)?.pollable && !c.res.kick.includes(fd) && !c.res.call.includes(fd) && !c.res.err.includes(fd))) {
      if (c.avoid.has('kick-nonpollable')) s.fds = [c.res.kick[0]!];
      else c.input.tags.add('kick-nonpollable');
    }
    s.name += `[fds ${kind}]`;
    return true;
  }],
  [3, 'insert', (c) => {
    const at = c.rng.int(c.input.steps.length + 1);
    c.input.steps.splice(at, 0, randomMessage(c));
    return true;
  }],
  [2, 'duplicate', (c) => {
    if (!c.input.steps.length) return false;
    const i = c.rng.int(c.input.steps.length);
    const s = c.input.steps[i]!;
    const copy = { ...s, mutated: true, name: `${s.name}(again)` } as Step;
    c.input.steps.splice(c.rng.range(i, c.input.steps.length), 0, copy);
    return true;
  }],
  [2, 'reorder', (c) => {
    const n = c.input.steps.length;
    if (n < 3) return false;
    const i = c.rng.range(1, n - 1);
    const [s] = c.input.steps.splice(i, 1);
    s!.mutated = true;
    // What follows the gap no longer follows a valid prefix either.
    const next = c.input.steps[i];
    if (next) next.mutated = true;
    c.input.steps.splice(c.rng.range(1, n - 1), 0, s!);
    return true;
  }],
  [2, 'drop', (c) => {
    const n = c.input.steps.length;
    if (n < 3) return false;
    const i = c.rng.range(1, n - 1);
    c.input.steps.splice(i, 1);
    const next = c.input.steps[i];
    if (next) next.mutated = true;
    return true;
  }],
  [2, 'raw-bytes', (c) => {
    const { rng } = c;
    const bytes = rng.bytes(rng.range(1, rng.chance(0.2) ? 600 : 40));
    c.input.steps.splice(rng.int(c.input.steps.length + 1), 0, { t: 'raw', name: `raw(${bytes.length})`, bytes, fds: rng.chance(0.2) ? [anyFd(c)] : [], mutated: true });
    return true;
  }],
  [3, 'truncate', (c) => {
    const n = c.input.steps.length;
    if (n < 2) return false;
    c.input.steps.length = c.rng.range(1, n - 1);
    return true;
  }],
  [2, 'close-mid', (c) => {
    const { rng } = c;
    const idx = msgSteps(c.input);
    if (!idx.length) return false;
    const i = rng.pick(idx);
    const s = c.input.steps[i] as MsgStep;
    const f = frame(s.req, s.flags, s.payload, s.size);
    c.input.steps.length = i;
    c.input.end = 'close-mid';
    c.input.partial = f.subarray(0, rng.range(1, f.length - 1 || 1));
    c.input.partialFds = rng.chance(0.5) ? s.fds : [];
    return true;
  }],
  [1, 'close-early', (c) => {
    c.input.end = 'close';
    return true;
  }],
  [2, 'reset', (c) => {
    const req = c.rng.pick([Req.RESET_OWNER, Req.RESET_DEVICE, Req.SET_OWNER]);
    const s = msg(reqName(req), req, c.rng.chance(0.5) ? V | NR : V);
    s.mutated = true;
    c.input.steps.splice(c.rng.int(c.input.steps.length + 1), 0, s);
    return true;
  }],
  [2, 'memory-again', (c) => {
    // A second table, a removal or more slots, possibly under running rings with I/O in flight.
    const { rng, res } = c;
    const at = rng.int(c.input.steps.length + 1);
    const kind = rng.pick(['table', 'rem', 'add-many', 'rem-unknown']);
    const add: MsgStep[] = [];
    if (kind === 'table') add.push(msg('SET_MEM_TABLE(again)', Req.SET_MEM_TABLE, V | NR, memTable(res.regions.map((r) => r.msg)), res.regions.map((r) => r.fd)));
    else if (kind === 'rem') {
      const r = rng.pick(res.regions);
      add.push(msg('REM_MEM_REG', Req.REM_MEM_REG, V | NR, singleRegion(r.msg), rng.chance(0.8) ? [r.fd] : []));
    } else if (kind === 'rem-unknown') {
      add.push(msg('REM_MEM_REG(unknown)', Req.REM_MEM_REG, V | NR, singleRegion({ ...res.regions[0]!.msg, guestPhysAddr: 77n << 30n }), [res.regions[0]!.fd]));
    } else {
      const r1 = res.regions[1]!;
      const n = rng.range(20, 40);
      for (let i = 0; i < n; i++) {
        add.push(msg(`ADD_MEM_REG#${i}`, Req.ADD_MEM_REG, V | NR, singleRegion({
          guestPhysAddr: (16n << 30n) + BigInt(i) * 65536n,
          memorySize: 65536n,
          userspaceAddr: r1.msg.userspaceAddr + BigInt(i % 8) * 65536n + (BigInt(i) << 36n),
          mmapOffset: r1.msg.mmapOffset + BigInt(i % 16) * 65536n,
        }), [r1.fd]));
      }
    }
    for (const s of add) s.mutated = true;
    c.input.steps.splice(at, 0, ...add);
    return true;
  }],
  [2, 'restart-ring', (c) => {
    const { rng, res } = c;
    const q = rng.int(c.input.numQueues);
    const at = rng.int(c.input.steps.length + 1);
    const s1 = msg(`GET_VRING_BASE(${q})`, Req.GET_VRING_BASE, V, vringState(q, 0));
    const s2 = msg(`SET_VRING_KICK(${q})`, Req.SET_VRING_KICK, V | NR, u64(rng.chance(0.3) ? q | VRING_NOFD : q), []);
    if (!(rd64(s2.payload, 0) & BigInt(VRING_NOFD))) s2.fds = [res.kick[q]!];
    s1.mutated = s2.mutated = true;
    c.input.steps.splice(at, 0, s1, s2);
    return true;
  }],
];

function mutate(c: MutCtx): void {
  const { rng, input } = c;
  if (rng.chance(0.04)) {
    // Random bytes after the opening GET_FEATURES.
    input.steps.length = 1;
    const n = rng.range(1, 3);
    for (let i = 0; i < n; i++) input.steps.push({ t: 'raw', name: 'random', bytes: rng.bytes(rng.skewed(800) + 1), fds: rng.chance(0.2) ? [anyFd(c)] : [], mutated: true });
    input.mutations.push('random-bytes');
    return;
  }
  const n = rng.weighted([[5, 0], [50, 1], [25, 2], [12, 3], [8, 5]] as const);
  for (let i = 0; i < n; i++) {
    const [, name, fn] = rng.weighted(MUTATIONS.map((m) => [m[0], m] as const));
    if (fn(c)) input.mutations.push(name);
  }
  // Messages split across writes (valid in itself).
  if (rng.chance(0.2)) {
    for (const s of input.steps) {
      if (s.t !== 'msg' || s.split || !rng.chance(0.5)) continue;
      const len = 12 + s.payload.length;
      const cuts = new Set<number>();
      const k = rng.range(1, 3);
      for (let j = 0; j < k; j++) cuts.add(rng.range(1, Math.max(1, len - 1)));
      s.split = [...cuts].filter((x) => x > 0 && x < len).sort((a, b) => a - b);
      if (s.fds.length && rng.chance(0.3)) {
        // fds riding on a later piece of the message.
        s.chunkFds = s.split.map(() => [] as number[]);
        s.chunkFds.push([]);
        s.chunkFds[rng.int(s.chunkFds.length)] = s.fds;
      }
    }
    input.mutations.push('split');
  }
  if (rng.chance(0.005)) {
    input.manyFds = rng.range(9, 40);
    input.mutations.push('many-fds');
  }
}

export function generate(seed: number, index: number, res: Resources, offer: Offer, avoid: Set<string>): Input {
  const rng = new Rng(seed, index);
  const input = baseSequence(rng, res, offer, index);
  mutate({ rng, res, offer, avoid, input });
  classify(res, input, avoid);
  return input;
}

/**
 * Tag the finished input with the known bug classes it exercises, whatever
 * mutation produced them, and take out those the run avoids (by repairing
 * the message, so the rest of the input still runs).
 */
function classify(res: Resources, input: Input, avoid: Set<string>): void {
  const pollable = (fd: number): boolean =>
    res.kick.includes(fd) || res.call.includes(fd) || res.err.includes(fd) || !!res.junk.find((j) => j.fd === fd)?.pollable;
  for (const s of input.steps) {
    if (s.t !== 'msg') continue;
    const fds = s.chunkFds ? s.chunkFds.flat() : s.fds;
    if (s.req === Req.SET_VRING_KICK && fds.length === 1 && !pollable(fds[0]!)) {
      if (avoid.has('kick-nonpollable')) {
        s.fds = [res.kick[0]!];
        s.chunkFds = undefined;
      } else input.tags.add('kick-nonpollable');
    }
    if ((s.req === Req.SET_MEM_TABLE || s.req === Req.ADD_MEM_REG) && s.payload.length >= 40) {
      const n = s.req === Req.ADD_MEM_REG ? 1 : Math.min(new DataView(s.payload.buffer, s.payload.byteOffset).getUint32(0, true), (s.payload.length - 8) >> 5);
      for (let i = 0; i < n; i++) {
        const r = decodeRegion(s.payload, 8 + 32 * i);
        if (!((r.mmapOffset | r.userspaceAddr) & 1n) || r.memorySize === 0n || r.memorySize >= 1n << 53n) continue;
        if (avoid.has('odd-region-alignment')) {
          const fixed = { ...r, mmapOffset: r.mmapOffset & ~1n, userspaceAddr: r.userspaceAddr & ~1n };
          const b = s.payload.slice();
          const v = new DataView(b.buffer);
          v.setBigUint64(8 + 32 * i + 16, fixed.userspaceAddr, true);
          v.setBigUint64(8 + 32 * i + 24, fixed.mmapOffset, true);
          s.payload = b;
        } else input.tags.add('odd-region-alignment');
      }
    }
    if (s.req === Req.SET_VRING_ADDR && s.payload.length >= 32) {
      // A used ring laid over the avail ring (for any queue size up to 1024): every completion is also a new avail index.
      const used = rd64(s.payload, 16);
      const avail = rd64(s.payload, 24);
      if (avail < used + 6n + 8n * 1024n && used < avail + 6n + 2n * 1024n) {
        if (avoid.has('ring-overlap')) s.payload = patch(s.payload, 16, avail + 0x1000n, 8);
        else input.tags.add('ring-overlap');
      }
    }
  }
}

// ---------------------------------------------------------------- what the daemon sees

interface Eff {
  request: number;
  flags: number;
  size: number;
  payload: Uint8Array;
  fds: number;
}

interface Parsed {
  msgs: Eff[];
  /** Bytes missing to complete the last message (0 when the stream ends on a boundary). */
  needMore: number;
  /** The daemon must close: a header it rejects (flags or size). */
  badHeader?: string;
}

/** Frame the byte stream exactly as the daemon will (12-byte headers, their size fields), fds to the message holding a chunk's first byte. */
function parseStream(chunks: { bytes: Uint8Array; fds: number }[]): Parsed {
  let total = 0;
  for (const c of chunks) total += c.bytes.length;
  const all = new Uint8Array(total);
  const fdAt: [number, number][] = [];
  let o = 0;
  for (const c of chunks) {
    all.set(c.bytes, o);
    if (c.fds) fdAt.push([o, c.fds]);
    o += c.bytes.length;
  }
  const msgs: Eff[] = [];
  const dv = new DataView(all.buffer);
  let off = 0;
  const fdsIn = (start: number, end: number): number => fdAt.reduce((n, [p, k]) => (p >= start && p < end ? n + k : n), 0);
  while (off + 12 <= total) {
    const request = dv.getUint32(off, true);
    const flags = dv.getUint32(off + 4, true);
    const size = dv.getUint32(off + 8, true);
    if ((flags & ~NR) !== V) return { msgs, needMore: 0, badHeader: `${reqName(request)} flags 0x${flags.toString(16)}` };
    if (size > 4096) return { msgs, needMore: 0, badHeader: `${reqName(request)} size ${size}` };
    if (off + 12 + size > total) return { msgs, needMore: off + 12 + size - total };
    msgs.push({ request, flags, size, payload: all.subarray(off + 12, off + 12 + size), fds: fdsIn(off, off + 12 + size) });
    off += 12 + size;
  }
  return { msgs, needMore: off < total ? off + 12 - total : 0 };
}

const replyable = (m: Eff): boolean => GETS.has(m.request) || (m.flags & NR) !== 0;

/** What the reply to the message at a stream index must say (set only for messages sent before any mutation). */
interface Check {
  /** A REPLY_ACK for a valid request: 0. */
  ack0?: boolean;
  /** GET_VRING_BASE of queue baseQ: this index. */
  base?: number;
  baseQ?: number;
  /** Must not be answered at all: the daemon closes (why). */
  close?: string;
}

interface Expect {
  /** Queues the daemon has (GET_QUEUE_NUM). */
  numQueues: number;
  checks?: Map<number, Check>;
}

/** Map replies to the messages they answer; returns the index answered by each reply, or an error. */
function matchReplies(msgs: Eff[], replies: Reply[], offer: Offer, want: Expect = { numQueues: NUM_QUEUES }): { answered: number[]; error?: string } {
  const answered: number[] = [];
  let j = 0;
  for (const [i, r] of replies.entries()) {
    const what = { toString: () => `reply #${i} (${reqName(r.request)}, flags 0x${r.flags.toString(16)}, ${r.size} bytes)` };
    if (r.flags !== 0x5) return { answered, error: `${what}: flags must be exactly 0x5` };
    // Only GET_INFLIGHT_FD hands the front-end an fd (its inflight area).
    if (r.fds > (r.request === Req.GET_INFLIGHT_FD ? 1 : 0)) return { answered, error: `${what}: carries ${r.fds} fds` };
    let k = j;
    while (k < msgs.length && !(msgs[k]!.request === r.request && replyable(msgs[k]!))) k++;
    if (k === msgs.length) return { answered, error: `${what}: answers no message sent (request code does not match any outstanding request)` };
    const m = msgs[k]!;
    const check = want.checks?.get(k);
    const dv = new DataView(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    if (check?.close) return { answered, error: `${what}: answers message #${k}, which must close the connection instead (${check.close})` };
    if (r.size === 8 && !GETS.has(r.request) && check?.ack0 && dv.getBigUint64(0, true) !== 0n) {
      return { answered, error: `${what}: REPLY_ACK ${dv.getBigUint64(0, true)} (failure) for the valid message #${k}` };
    }
    if (r.request === Req.GET_VRING_BASE && r.size === 8 && check?.base !== undefined && dv.getUint32(4, true) !== check.base) {
      return { answered, error: `${what}: GET_VRING_BASE answers ${dv.getUint32(4, true)}; every one of the ${check.base} requests sent was completed, so the next avail index is ${check.base}` };
    }
    const mv = new DataView(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength);
    if (r.request === Req.GET_CONFIG) {
      if (r.size !== 0) {
        if (m.size < 12) return { answered, error: `${what}: GET_CONFIG with a ${m.size}-byte payload was answered` };
        const want = mv.getUint32(4, true);
        if (r.size !== 12 + want) return { answered, error: `${what}: GET_CONFIG for ${want} bytes needs a ${12 + want}-byte reply (QEMU: "bad msg size")` };
        if (dv.getUint32(0, true) !== mv.getUint32(0, true) || dv.getUint32(4, true) !== want) return { answered, error: `${what}: GET_CONFIG reply does not echo offset and size` };
      }
    } else if (r.request === Req.GET_INFLIGHT_FD) {
      if (r.size !== 24 || r.fds !== 1) return { answered, error: `${what}: GET_INFLIGHT_FD must answer 24 bytes and one fd` };
    } else if (r.size !== 8) {
      return { answered, error: `${what}: must carry 8 bytes` };
    } else if (r.request === Req.GET_VRING_BASE) {
      if (m.size >= 4 && dv.getUint32(0, true) !== mv.getUint32(0, true)) return { answered, error: `${what}: names queue ${dv.getUint32(0, true)}, asked for ${mv.getUint32(0, true)}` };
    } else if (r.request === Req.GET_FEATURES && dv.getBigUint64(0, true) !== offer.features) {
      return { answered, error: `${what}: features 0x${dv.getBigUint64(0, true).toString(16)} differ from the offer` };
    } else if (r.request === Req.GET_PROTOCOL_FEATURES && dv.getBigUint64(0, true) !== offer.protocol) {
      return { answered, error: `${what}: protocol features differ from the offer` };
    } else if (r.request === Req.GET_MAX_MEM_SLOTS && dv.getBigUint64(0, true) !== BigInt(MAX_MEM_SLOTS)) {
      return { answered, error: `${what}: ${dv.getBigUint64(0, true)} memory slots, documented ${MAX_MEM_SLOTS}` };
    } else if (r.request === Req.GET_QUEUE_NUM && dv.getBigUint64(0, true) !== BigInt(want.numQueues)) {
      return { answered, error: `${what}: queue count ${dv.getBigUint64(0, true)}` };
    }
    answered.push(k);
    j = k + 1;
  }
  return { answered };
}

// ---------------------------------------------------------------- execution

const ONE = new BigUint64Array([1n]);

/** One request sent in this input: where its status byte is and what it must say. */
interface SentReq {
  head: number;
  type: number;
  sector: number;
  status: number;
  /** Request number on its queue (its slot is k % layout.slots). */
  k: number;
  done: boolean;
}

/** Per-input ring state on the fuzzer's side. */
interface IoState {
  avail: number[];
  slot: number[];
  reqs: SentReq[][];
  /** Used entries already checked, per queue. */
  checked: number[];
}

const newIoState = (): IoState => ({
  avail: new Array<number>(MANY_QUEUES).fill(0),
  slot: new Array<number>(MANY_QUEUES).fill(0),
  reqs: Array.from({ length: MANY_QUEUES }, () => []),
  checked: new Array<number>(MANY_QUEUES).fill(0),
});

function regionView(res: Resources, L: Layout): { bytes: Uint8Array; v: DataView } {
  return L.region ? { bytes: res.r1, v: res.r1v } : { bytes: res.r0, v: res.r0v };
}

/** Put one blk request in a ring of the input's layout and kick. */
function doIo(res: Resources, input: Input, st: IoState, s: Extract<Step, { t: 'io' }>): void {
  const q = s.q;
  const L = input.layout;
  const size = input.queueSize[q] ?? 128;
  const { bytes, v } = regionView(res, L);
  const g = L.gpa0;
  const ring = L.ring(q);
  const k = st.reqs[q]!.length;
  const hdr = L.hdr(q, k);
  const status = hdr + 0x40;
  const data = L.data(q, k);
  v.setUint32(hdr, s.type, true);
  v.setUint32(hdr + 4, 0, true);
  v.setBigUint64(hdr + 8, BigInt(s.sector), true);
  bytes[status] = 0xa5;
  const bufs: [number, number, number][] = [[g + hdr, 16, 0]];
  if (s.type === T.OUT) bufs.push([g + data, 4096, 0]);
  if (s.type === T.IN) bufs.push([g + data, 4096, DESC_F_WRITE]);
  if (s.type === T.GET_ID) bufs.push([g + data, 20, DESC_F_WRITE]);
  bufs.push([g + status, 1, DESC_F_WRITE]);
  const put = (base: number, i: number, addr: number, len: number, flags: number, next: number): void => {
    v.setBigUint64(base + i * 16, BigInt(addr), true);
    v.setUint32(base + i * 16 + 8, len, true);
    v.setUint16(base + i * 16 + 12, flags, true);
    v.setUint16(base + i * 16 + 14, next, true);
  };
  let head: number;
  if (s.indirect) {
    const table = L.table(q, k);
    bufs.forEach(([a, l, f], i) => put(table, i, a, l, f | (i < bufs.length - 1 ? DESC_F_NEXT : 0), i + 1));
    head = st.slot[q]! % size;
    st.slot[q]! += 1;
    put(ring + L.desc, head, g + table, 16 * bufs.length, DESC_F_INDIRECT, 0);
  } else {
    const ids = bufs.map(() => st.slot[q]!++ % size);
    bufs.forEach(([a, l, f], i) => put(ring + L.desc, ids[i]!, a, l, f | (i < bufs.length - 1 ? DESC_F_NEXT : 0), ids[i + 1] ?? 0));
    head = ids[0]!;
  }
  st.reqs[q]!.push({ head, type: s.type, sector: s.sector, status, k, done: false });
  v.setUint16(ring + L.avail + 4 + 2 * (st.avail[q]! % size), head, true);
  st.avail[q] = (st.avail[q]! + 1) & 0xffff;
  v.setUint16(ring + L.avail + 2, st.avail[q]!, true);
  native.write(res.kick[q]!, ONE);
}

/** used->idx of queue q. */
function usedIdx(res: Resources, input: Input, q: number): number {
  const L = input.layout;
  return regionView(res, L).v.getUint16(L.ring(q) + L.used + 2, true);
}

/** Status and used length a request of ours must complete with (the image has IMAGE_SECTORS sectors). */
function expected(r: SentReq): { status: number; len?: number } {
  if (r.type === T.IN || r.type === T.OUT) {
    if (r.sector + 8 > IMAGE_SECTORS) return { status: 1 };
    return { status: 0, len: r.type === T.IN ? 4097 : 1 };
  }
  return { status: 0, len: r.type === T.GET_ID ? 21 : 1 };
}

/** Check the used entries of queue q up to n: each names a request in flight, with the status and length it must have. */
function checkUsed(res: Resources, input: Input, st: IoState, q: number, n: number): string | undefined {
  const L = input.layout;
  const { bytes, v } = regionView(res, L);
  const size = input.queueSize[q]!;
  const used = L.ring(q) + L.used;
  const idx = v.getUint16(used + 2, true);
  const sent = st.reqs[q]!;
  if (((idx - st.checked[q]!) & 0xffff) > sent.length - st.checked[q]!) {
    return `queue ${q}: used idx ${idx}, but only ${sent.length} requests were ever published`;
  }
  for (let i = st.checked[q]!; i < n; i++) {
    const id = v.getUint32(used + 4 + 8 * (i % size), true);
    const len = v.getUint32(used + 8 + 8 * (i % size), true);
    const r = sent.find((x) => !x.done && x.head === id);
    if (!r) return `queue ${q}: used entry ${i} names head ${id}, which is not a request in flight`;
    r.done = true;
    // A later request in the same slot has overwritten the status byte.
    if (sent.some((x) => x.k > r.k && x.k % L.slots === r.k % L.slots)) continue;
    const want = expected(r);
    const got = bytes[r.status]!;
    const what = `queue ${q}: request ${r.k} (type ${r.type}, sector ${r.sector})`;
    if (got !== want.status) return `${what} completed with status ${got === 0xa5 ? 'unwritten' : got}, expected ${want.status}`;
    if (want.len !== undefined && len !== want.len) return `${what} completed OK with used length ${len}, expected ${want.len}`;
  }
  st.checked[q] = n;
  return undefined;
}

/** The inflight area's contents for this input: zeros (a new area), a plausible record of a crashed back-end, or noise. */
function fillInflight(res: Resources, input: Input): void {
  const f = input.inflight;
  if (!f) return;
  const per = inflightQueueRegion(f.capacity);
  const area = res.inflight.subarray(0, f.queues * per);
  area.fill(0);
  if (f.mode === 'zero') return;
  const rng = new Rng(f.seed);
  if (f.mode === 'random') {
    rng.fill(area);
    return;
  }
  for (let q = 0; q < f.queues; q++) {
    const size = input.queueSize[q] ?? f.capacity;
    const v = new DataView(area.buffer, area.byteOffset + q * per, per);
    v.setUint16(8, 1, true); // version
    v.setUint16(10, rng.chance(0.9) ? size : rng.int(0x10000), true); // desc_num
    v.setUint16(12, rng.chance(0.9) ? rng.int(size) : rng.int(0x10000), true); // last_batch_head
    v.setUint16(14, rng.chance(0.8) ? 0 : rng.int(0x10000), true); // used_idx (the ring's is 0)
    for (let h = 0; h < Math.min(size, f.capacity); h++) {
      const o = 16 + h * 16;
      v.setUint8(o, rng.chance(0.1) ? 1 : rng.chance(0.02) ? rng.int(256) : 0);
      v.setUint16(o + 6, rng.chance(0.9) ? rng.int(size) : rng.int(0x10000), true);
      v.setBigUint64(o + 8, BigInt(rng.chance(0.95) ? rng.int(1000) : rng.u32()), true);
    }
  }
}

function describeStep(res: Resources, s: Step): string {
  if (s.t === 'io') return `${s.name} q${s.q} sector ${s.sector}${s.indirect ? ' indirect' : ''}`;
  if (s.t === 'await') return `${s.name}${s.still ? ' (the ring must not move)' : ''}${s.mutated ? ' (moved: not checked)' : ''}`;
  if (s.t === 'barrier') return `${s.name}: GET_QUEUE_NUM, waited for${s.lateFd !== undefined ? `; then ${res.name(s.lateFd)} must be readable` : ''}`;
  if (s.t === 'raw') return `${s.name} ${hex(s.bytes, 24)}${s.fds.length ? ` fds=[${s.fds.map((f) => res.name(f)).join(',')}]` : ''}`;
  const fds = s.chunkFds ? s.chunkFds.flat() : s.fds;
  return (
    `${s.name} req=${s.req} flags=0x${s.flags.toString(16)} len=${s.payload.length}` +
    `${s.size !== undefined ? ` size=${s.size}` : ''}${fds.length ? ` fds=[${fds.map((f) => res.name(f)).join(',')}]` : ''}` +
    `${s.split ? ` split@${s.split.join(',')}` : ''} ${hex(s.payload, 48)}` +
    `${s.checkBase ? ' (must answer the published count)' : ''}${s.mustClose ? ' (must close)' : ''}`
  );
}

function hex(b: Uint8Array, max: number): string {
  const h = Buffer.from(b.subarray(0, max)).toString('hex');
  return b.length > max ? `${h}...` : h;
}

export function describeInput(res: Resources, input: Input): string {
  const lines = input.steps.map((s, i) => `  ${i}: ${describeStep(res, s)}`);
  if (input.end === 'close-mid') lines.push(`  then ${input.partial!.length} bytes of a message (${hex(input.partial!, 24)}) and close`);
  else if (input.end === 'close') lines.push('  then close');
  else lines.push('  then probe GET_QUEUE_NUM');
  return (
    `variant ${input.variant} (${input.numQueues}-queue daemon), mutations [${input.mutations.join(', ')}]${input.tags.size ? ` tags [${[...input.tags].join(', ')}]` : ''}` +
    `${input.sync ? ' sync' : ' pipelined'}${input.manyFds ? ` many-fds=${input.manyFds}` : ''}` +
    `${input.inflight ? ` inflight area: ${input.inflight.mode} (seed ${input.inflight.seed})` : ''}\n${lines.join('\n')}`
  );
}

type Outcome = { kind: 'reply' | 'close' | 'aborted' | 'refused' } | { kind: 'fail'; why: string; fatal?: boolean };

/** The Python helper that sends >8 fds in one sendmsg (vhostd's binding cannot). */
class ManyFdsHelper {
  private proc: ChildProcess | undefined;
  private waiting: ((line: string) => void)[] = [];
  disabled: string | undefined;

  private start(): ChildProcess | undefined {
    if (this.proc || this.disabled) return this.proc;
    const script = fileURLToPath(new URL('./many_fds.py', import.meta.url));
    const p = spawn(process.env.PYTHON ?? 'python3', [script], { stdio: ['pipe', 'pipe', 'inherit'] });
    p.on('error', (e) => {
      this.disabled = `python3 unavailable: ${e.message}`;
      for (const w of this.waiting.splice(0)) w(JSON.stringify({ error: this.disabled }));
    });
    p.on('exit', () => {
      this.proc = undefined;
      for (const w of this.waiting.splice(0)) w(JSON.stringify({ error: 'helper exited' }));
    });
    createInterface({ input: p.stdout! }).on('line', (l) => this.waiting.shift()?.(l));
    this.proc = p;
    return p;
  }

  async run(req: object): Promise<{ replies?: [number, number, number, number, string][]; eof?: boolean; timeout?: boolean; error?: string }> {
    const p = this.start();
    if (!p) return { error: this.disabled };
    const line = await new Promise<string>((resolve) => {
      this.waiting.push(resolve);
      p.stdin!.write(`${JSON.stringify(req)}\n`);
    });
    return JSON.parse(line) as Awaited<ReturnType<ManyFdsHelper['run']>>;
  }

  stop(): void {
    this.proc?.stdin?.end();
    this.proc?.kill();
    this.proc = undefined;
  }
}

class SocketFuzzer {
  readonly res = new Resources();
  offer: Offer = { features: 0n, protocol: 0n };
  /** Queues of the daemon in use (2, or 64 for the many-queue inputs). */
  numQueues = NUM_QUEUES;
  /** Oracle counters: used entries checked (status, length), late call fds found signalled. */
  readonly checked = { io: 0, callFds: 0 };
  private readonly helper = new ManyFdsHelper();

  constructor(private d: FuzzDaemon) {}

  get daemon(): FuzzDaemon {
    return this.d;
  }

  set daemon(d: FuzzDaemon) {
    this.d = d;
  }

  async learnOffer(): Promise<void> {
    const c = await connectAccepted(this.d.socket);
    if (!c) throw new Error(`vhostd did not accept a connection:\n${this.d.log.recent()}`);
    try {
      const features = readU64(c.replies[0]!.payload);
      await c.send(frame(Req.GET_PROTOCOL_FEATURES, V, new Uint8Array(0)));
      await c.until(() => c.replies.length > 1, REPLY_TIMEOUT_MS);
      if (c.replies.length < 2) throw new Error('no GET_PROTOCOL_FEATURES reply');
      this.offer = { features, protocol: readU64(c.replies[1]!.payload) };
    } finally {
      c.close();
    }
  }

  /** Run one input on a fresh connection. */
  /**
   * Run one input on a fresh connection. `accepted` runs once the daemon has
   * taken the connection, which it does only after the previous one is fully
   * torn down: anything it logged before then belongs to earlier inputs.
   */
  async run(input: Input, accepted: () => void): Promise<Outcome> {
    const res = this.res;
    if (input.manyFds) return this.runManyFds(input);
    const conn = RawConn.tryConnect(this.d.socket);
    if (!conn) return { kind: 'refused' };
    const sent: { bytes: Uint8Array; fds: number }[] = [];
    const ioState = newIoState();
    const want: Expect = { numQueues: this.numQueues, checks: new Map() };
    let closed = false;
    const send = async (bytes: Uint8Array, fds: number[]): Promise<boolean> => {
      if (closed) return false;
      if ((await conn.send(bytes, fds)) === 'closed') {
        closed = true;
        return false;
      }
      sent.push({ bytes, fds: fds.length });
      return true;
    };
    // Consecutive pieces go out in one write unless a piece must start its own (fds ride on a
    // write's first byte; split messages are the point of their input); some inputs write each message apart.
    let pend: Uint8Array[] = [];
    let pendFds: number[] = [];
    const flush = async (): Promise<boolean> => {
      if (!pend.length) return !closed;
      const bytes = pend.length === 1 ? pend[0]! : Buffer.concat(pend);
      const fds = pendFds;
      pend = [];
      pendFds = [];
      return send(bytes, fds);
    };
    const queue = async (bytes: Uint8Array, fds: number[], apart: boolean): Promise<boolean> => {
      if ((apart || fds.length || !input.coalesce) && !(await flush())) return false;
      pend.push(bytes);
      if (fds.length) pendFds = fds;
      return !closed;
    };
    try {
      // A pristine GET_FEATURES first: an accepted connection always answers it, a refused one
      // (the daemon still tearing down the previous front-end) closes without a word.
      if (!(await send(frame(Req.GET_FEATURES, V, new Uint8Array(0)), []))) return this.judgeEarly(conn, sent, 'close');
      let expected = 1;
      let synced = input.sync;
      // REPLY_ACK is in force once a valid SET_PROTOCOL_FEATURES carrying it has been sent.
      let replyAck = false;
      if (!(await conn.until(() => conn.replies.length >= 1, REPLY_TIMEOUT_MS))) {
        return { kind: 'fail', why: `no reply to the opening GET_FEATURES within ${REPLY_TIMEOUT_MS} ms`, fatal: true };
      }
      if (conn.eof && !conn.replies.length) return { kind: 'refused' };
      accepted();
      // Fresh rings for this input, now that the previous connection is torn down (until then its rings may still complete requests).
      regionView(res, input.layout).bytes.fill(0, ...input.layout.ringArea);
      fillInflight(res, input);
      // Nothing mutated has been sent yet: every message so far is valid, the oracles below apply.
      let pristine = true;
      let pristineAck = false;
      // Stream index of the next message (the opening GET_FEATURES is 0); exact while pristine.
      let msgIndex = 1;
      let mustClose: string | undefined;
      // A corrupt inflight area may legitimately be refused; zeros may not.
      const inflightOk = !input.inflight || input.inflight.mode === 'zero';
      const closedValid = (what: string): Outcome => ({
        kind: 'fail',
        why: `the daemon closed the connection ${what}, with nothing but valid messages sent (${conn.eofReason})`,
      });
      for (const s of input.steps) {
        if (s.mutated) synced = pristine = false;
        if (s.t === 'io') {
          if (!(await flush())) break;
          // A request published after a GET_VRING_BASE was sent (a mutation moved it there) may be taken before the ring stops.
          for (const c of want.checks!.values()) if (c.baseQ === s.q) c.base = undefined;
          doIo(res, input, ioState, s);
          continue;
        }
        if (s.t === 'raw') {
          if (!(await queue(s.bytes, s.fds, false))) break;
          continue;
        }
        if (s.t === 'await') {
          // Checked I/O needs rings the fuzzer alone fills: no inflight area replaying old records.
          if (!pristine || !inflightOk) continue;
          if (!(await flush())) break;
          // What was published, not what the generator planned: a mutation further on may have moved a request here or away.
          const n = ioState.reqs[s.q]!.length;
          if (s.still) {
            const idx = usedIdx(res, input, s.q);
            const was = ioState.checked[s.q]!;
            if (idx !== was) return { kind: 'fail', why: `queue ${s.q} is disabled (RESET_OWNER) but its used idx moved from ${was} to ${idx}` };
            continue;
          }
          const deadline = Date.now() + REPLY_TIMEOUT_MS;
          for (let spin = 0; ((usedIdx(res, input, s.q) - n) & 0xffff) >= 0x8000; spin++) {
            conn.poll();
            if (conn.eof) return closedValid(`while queue ${s.q} had requests in flight`);
            if (Date.now() > deadline) {
              return { kind: 'fail', why: `queue ${s.q}: used idx ${usedIdx(res, input, s.q)} ${REPLY_TIMEOUT_MS} ms after ${n} valid requests were published and kicked (${s.name})` };
            }
            await new Promise((r) => (spin < 200 ? setImmediate(r) : setTimeout(r, 1)));
          }
          const from = ioState.checked[s.q]!;
          const bad = checkUsed(res, input, ioState, s.q, n);
          if (bad) return { kind: 'fail', why: bad };
          this.checked.io += n - from;
          continue;
        }
        if (s.t === 'barrier') {
          if (!pristine) continue;
          if (!(await flush())) break;
          const idx = msgIndex++;
          if (!(await send(frame(Req.GET_QUEUE_NUM, V, new Uint8Array(0)), []))) return closedValid(`before ${s.name}`);
          expected++;
          let err: string | undefined;
          const answered = (): boolean => {
            const m = matchReplies(parseStream(sent).msgs, conn.replies, this.offer, want);
            err = m.error;
            return err !== undefined || m.answered.includes(idx);
          };
          if (!(await conn.until(answered, REPLY_TIMEOUT_MS))) return { kind: 'fail', why: `no reply to ${s.name} within ${REPLY_TIMEOUT_MS} ms (daemon hung?)`, fatal: true };
          if (err) return { kind: 'fail', why: err };
          if (!answered()) return closedValid(`before ${s.name}`);
          if (s.lateFd !== undefined && Resources.count(s.lateFd) < 1n) {
            return { kind: 'fail', why: `the call fd installed by the last SET_VRING_CALL (${res.name(s.lateFd)}) was not signalled once processed (a newly installed call fd must be signalled at once)` };
          }
          if (s.lateFd !== undefined) this.checked.callFds++;
          continue;
        }
        if (s.drain !== undefined) Resources.count(s.drain);
        if (pristine) {
          if (s.req === Req.SET_PROTOCOL_FEATURES) pristineAck = has(rd64(s.payload, 0), PF.REPLY_ACK);
          // GET_VRING_BASE of a ring whose every published request was awaited and checked: the published count.
          const q = s.payload.length >= 4 ? new DataView(s.payload.buffer, s.payload.byteOffset).getUint32(0, true) : -1;
          const settled = s.checkBase && q < MANY_QUEUES && ioState.checked[q] === ioState.reqs[q]!.length && inflightOk;
          const check: Check = {
            ack0: pristineAck && (s.flags & NR) !== 0 && !GETS.has(s.req),
            base: settled ? ioState.reqs[q]!.length : undefined,
            baseQ: q,
            close: s.mustClose,
          };
          if (check.ack0 || check.base !== undefined || check.close) want.checks!.set(msgIndex, check);
          mustClose ??= s.mustClose;
        }
        // Let our watcher read replies now and then (a long burst of need_reply messages would
        // otherwise be read only at its end).
        if (msgIndex++ % 32 === 0) {
          if (!(await flush())) break;
          await new Promise((r) => setImmediate(r));
        }
        const f = frame(s.req, s.flags, s.payload, s.size);
        const cuts = [0, ...(s.split ?? []), f.length];
        let ok = true;
        for (let k = 0; k + 1 < cuts.length && ok; k++) {
          const fds = s.chunkFds ? (s.chunkFds[k] ?? []) : k === 0 ? s.fds : [];
          ok = await queue(f.subarray(cuts[k]!, cuts[k + 1]!), fds, k > 0);
        }
        if (!ok) break;
        if (synced && s.req === Req.SET_PROTOCOL_FEATURES) replyAck = has(rd64(s.payload, 0), PF.REPLY_ACK);
        // Before the first mutation every message is valid: QEMU waits for each reply, and so do we.
        if (synced && (GETS.has(s.req) || (s.flags & NR && replyAck))) {
          expected++;
          if (!(await flush())) break;
          if (!(await conn.until(() => conn.replies.length >= expected, REPLY_TIMEOUT_MS))) {
            return { kind: 'fail', why: `no reply to the valid ${s.name} within ${REPLY_TIMEOUT_MS} ms (daemon hung?)`, fatal: true };
          }
          if (conn.eof) break;
        }
      }
      await flush();
      if (input.end === 'close-mid' && !closed) {
        await send(input.partial!, input.partialFds ?? []);
        return this.judgeEarly(conn, sent, 'aborted', want);
      }
      if (closed && pristine && !mustClose && inflightOk) {
        const early = this.judgeEarly(conn, sent, 'close', want);
        return early.kind === 'fail' ? early : closedValid('while it was being sent a valid sequence');
      }
      if (input.end === 'close' || closed) return this.judgeEarly(conn, sent, closed ? 'close' : 'aborted', want);
      // Complete whatever message the daemon is still reading, then the probe.
      let parsed = parseStream(sent);
      if (!parsed.badHeader && parsed.needMore) {
        await send(new Uint8Array(parsed.needMore), []);
        parsed = parseStream(sent);
      }
      let probeIndex = -1;
      if (!parsed.badHeader) {
        probeIndex = parsed.msgs.length;
        await send(frame(Req.GET_QUEUE_NUM, V, new Uint8Array(0)), []);
        parsed = parseStream(sent);
      }
      const done = (): boolean => {
        if (probeIndex < 0 || !conn.replies.length || conn.replies[conn.replies.length - 1]!.request !== Req.GET_QUEUE_NUM) return false;
        const m = matchReplies(parsed.msgs, conn.replies, this.offer, want);
        return m.error !== undefined || m.answered[m.answered.length - 1] === probeIndex;
      };
      const finished = await conn.until(done, REPLY_TIMEOUT_MS);
      if (conn.garbage) return { kind: 'fail', why: conn.garbage };
      if (!finished) {
        return {
          kind: 'fail',
          why: parsed.badHeader
            ? `the daemon kept the connection open for ${REPLY_TIMEOUT_MS} ms after a header it must reject (${parsed.badHeader})`
            : `neither a reply to the final probe nor a close within ${REPLY_TIMEOUT_MS} ms (hang)`,
          fatal: true,
        };
      }
      if (conn.replies.length === 0) return { kind: 'refused' };
      const m = matchReplies(parsed.msgs, conn.replies, this.offer, want);
      if (m.error) return { kind: 'fail', why: m.error };
      if (conn.eof && !done()) return pristine && !mustClose && inflightOk ? closedValid('before the final probe') : { kind: 'close' };
      if (mustClose) return { kind: 'fail', why: `the daemon served on after ${mustClose}: it must close the connection` };
      return { kind: 'reply' };
    } finally {
      conn.close();
    }
  }

  /** We closed (or the daemon did while we were still sending): check what did come back. */
  private judgeEarly(conn: RawConn, sent: { bytes: Uint8Array; fds: number }[], kind: 'aborted' | 'close', want?: Expect): Outcome {
    // Take whatever is already there without waiting for more.
    conn.poll();
    if (conn.garbage) return { kind: 'fail', why: conn.garbage };
    if (conn.replies.length === 0 && kind === 'close') return { kind: 'refused' };
    const m = matchReplies(parseStream(sent).msgs, conn.replies, this.offer, want ?? { numQueues: this.numQueues });
    if (m.error) return { kind: 'fail', why: m.error };
    return { kind };
  }

  private async runManyFds(input: Input): Promise<Outcome> {
    // The message: one of the sequence's fd-carrying ones, or anything.
    const s = (input.steps.find((x) => x.t === 'msg' && x.fds.length) ?? input.steps.find((x) => x.t === 'msg') ?? msg('GET_FEATURES', Req.GET_FEATURES, V)) as MsgStep;
    const m = frame(s.req, s.flags, s.payload, s.size);
    const probe = frame(Req.GET_QUEUE_NUM, V, new Uint8Array(0));
    const r = await this.helper.run({ path: this.d.socket, nfds: input.manyFds, msg: Buffer.from(m).toString('hex'), probe: Buffer.from(probe).toString('hex'), timeout: REPLY_TIMEOUT_MS / 1000 });
    if (r.error) {
      if (this.helper.disabled) return { kind: 'aborted' };
      return { kind: 'fail', why: `many-fds helper: ${r.error}` };
    }
    const replies: Reply[] = r.replies!.map(([request, flags, size, fds, hexPayload]) => ({ request, flags, size, fds, payload: Uint8Array.from(Buffer.from(hexPayload, 'hex')) }));
    if (!replies.length && r.eof) return { kind: 'refused' };
    const msgs = parseStream([{ bytes: frame(Req.GET_FEATURES, V, new Uint8Array(0)), fds: 0 }, { bytes: m, fds: input.manyFds! }, { bytes: probe, fds: 0 }]).msgs;
    const matched = matchReplies(msgs, replies, this.offer, { numQueues: this.numQueues });
    if (matched.error) return { kind: 'fail', why: matched.error };
    if (r.timeout) return { kind: 'fail', why: `message with ${input.manyFds} fds: neither a reply nor a close within ${REPLY_TIMEOUT_MS} ms` };
    return { kind: r.eof ? 'close' : 'reply' };
  }

  destroy(): void {
    this.helper.stop();
    this.res.destroy();
  }
}

// ---------------------------------------------------------------- the run

export async function run(opts: RunOptions): Promise<FuzzStats> {
  const { seed, start, batch, maxFailures, avoid, log } = withDefaults(opts);
  const failures: Failure[] = [];
  const extra: Record<string, number> = {
    aborted: 0, refusedRetries: 0, restarts: 0, healthySessions: 0, leakChecks: 0, pastEofInputs: 0, manyFdsInputs: 0, syncInputs: 0, inflightInputs: 0,
    manyQueueInputs: 0, lateCallInputs: 0, resetOwnerInputs: 0, earlyKickInputs: 0, slotInputs: 0, migrateInputs: 0, checkedIo: 0, callFdChecks: 0,
  };
  const t0 = Date.now();
  const ticker = new Ticker('socket', t0, opts.onProgress);
  let closes = 0;
  let replies = 0;
  let inputs = 0;

  // Two daemons: the 2-queue one, and the 64-queue variant (started at the first many-queue input).
  // The per-daemon state below belongs to the one in use (`d`); the other's waits in `parked`.
  let numQueues = NUM_QUEUES;
  let d = await FuzzDaemon.start({ numQueues });
  const fz = new SocketFuzzer(d);
  let base: Baseline | undefined;
  let problemsSeen = 0;
  let closeLogsExpected = 0;
  let closeLogsBase = 0;
  type Parked = { d: FuzzDaemon; offer: Offer; base: Baseline | undefined; problemsSeen: number; closeLogsExpected: number; closeLogsBase: number };
  const parked = new Map<number, Parked>();

  const suppress = new Suppressor(avoid, log);
  let cur: Input | undefined;
  let prev: Input | undefined;
  let pendingIndex = -1;
  const fail = (index: number, kind: string, message: string): void => {
    const f = { seed, index, kind, message };
    failures.push(f);
    log(describeFailure(f, 'socket'));
    if (index >= 0) suppress.failed([...(cur?.tags ?? []), ...(prev?.tags ?? [])]);
  };

  const restart = async (kind: string, why: string, index: number, kill = false): Promise<void> => {
    let busy = '';
    if (kill) {
      const b = await d.cpuBusy();
      if (b !== undefined) busy = ` (daemon CPU ${Math.round(Math.min(b, 1) * 100)}% of a core${b > 0.8 ? ': a busy loop' : ''})`;
    }
    fail(index, kind, `${why}${busy}\n--- daemon log (tail) ---\n${d.log.recent(15)}`);
    problemsSeen = d.log.problems.length;
    await d.stop(kill);
    d = await FuzzDaemon.start({ numQueues });
    fz.daemon = d;
    extra.restarts!++;
    base = undefined;
    problemsSeen = 0;
    pendingIndex = -1;
    closeLogsExpected = 0;
    closeLogsBase = 0;
  };

  /** New internal errors in the log, charged to input `index` (which is `input`). */
  const newProblems = (index: number, input: Input | undefined): void => {
    d.log.scan();
    if (d.log.problems.length > problemsSeen) {
      const saved = cur;
      cur = input;
      const lines = d.log.problems.slice(problemsSeen, problemsSeen + 3);
      fail(index, 'daemon logged an internal error', `${lines.map(summarizeLogLine).join(' / ')}\n${lines.join('\n')}\n${input ? describeInput(fz.res, input) : ''}`);
      cur = saved;
      problemsSeen = d.log.problems.length;
    }
  };

  /** Checks between batches: a well-formed session, no leaks, every close logged, nothing internal. */
  const checkpoint = async (lastIndex: number): Promise<void> => {
    if (d.exited()) return;
    try {
      await healthySession(d.socket, 100 + (lastIndex % 1000) * 8);
      extra.healthySessions!++;
    } catch (e) {
      if (d.exited()) return;
      const probe = await connectAccepted(d.socket, REPLY_TIMEOUT_MS);
      if (!probe) {
        await restart('daemon hung', `after input ${lastIndex} the daemon stopped answering (a well-formed session failed: ${(e as Error).message.split('\n')[0]})\nlast input: ${cur ? describeInput(fz.res, cur) : '?'}`, lastIndex, true);
        return;
      }
      probe.close();
      fail(lastIndex, 'well-formed session failed after fuzzing', (e as Error).message);
    }
    if (!base) {
      const st = await idleState(d);
      if (st) base = { fds: st.fds, maps: st.maps.length };
    } else {
      const leak = await checkLeaks(d, base);
      extra.leakChecks!++;
      if (leak) {
        fail(-1, 'leak', `after inputs up to ${lastIndex}: ${leak}`);
        const st = await idleState(d);
        if (st) base = { fds: st.fds, maps: st.maps.length };
      }
    }
    // Every connection the daemon closed must have its log line.
    const deadline = Date.now() + 1_000;
    d.log.scan();
    while (d.log.protocolCloses - closeLogsBase < closeLogsExpected && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
      d.log.scan();
    }
    if (d.log.protocolCloses - closeLogsBase < closeLogsExpected) {
      fail(-1, 'silent close', `${closeLogsExpected} connections closed by the daemon, only ${d.log.protocolCloses - closeLogsBase} 'closing connection' log lines`);
    }
    closeLogsBase = d.log.protocolCloses;
    closeLogsExpected = 0;
    newProblems(lastIndex, cur);
    pendingIndex = -1;
    fz.res.drainPipe();
  };

  /** Use the daemon with `n` queues from now on (after a checkpoint of the current one). */
  const switchTo = async (n: number, lastIndex: number): Promise<void> => {
    await checkpoint(lastIndex);
    parked.set(numQueues, { d, offer: fz.offer, base, problemsSeen, closeLogsExpected, closeLogsBase });
    numQueues = fz.numQueues = n;
    const p = parked.get(n);
    parked.delete(n);
    if (p && !p.d.exited()) {
      ({ d, base, problemsSeen, closeLogsExpected, closeLogsBase } = p);
      fz.daemon = d;
      fz.offer = p.offer;
      return;
    }
    if (p) await p.d.stop();
    d = await FuzzDaemon.start({ numQueues });
    fz.daemon = d;
    base = undefined;
    problemsSeen = closeLogsExpected = closeLogsBase = 0;
    await fz.learnOffer();
    await checkpoint(lastIndex); // the baseline, before any input reaches it
  };

  try {
    await fz.learnOffer();
    await checkpoint(start - 1);
    for (let index = start; index < start + opts.count; index++) {
      if (failures.length >= maxFailures || opts.signal?.aborted) break;
      const nq = isManyIndex(index) ? MANY_QUEUES : NUM_QUEUES;
      if (nq !== numQueues) await switchTo(nq, index - 1);
      prev = cur;
      let input: Input;
      try {
        input = generate(seed, index, fz.res, fz.offer, avoid);
      } catch (e) {
        fail(index, 'fuzzer bug', `generating the input threw: ${(e as Error).stack}`);
        continue;
      }
      cur = input;
      if (input.tags.has('past-eof')) extra.pastEofInputs!++;
      if (input.manyFds) extra.manyFdsInputs!++;
      if (input.sync) extra.syncInputs!++;
      if (input.inflight) extra.inflightInputs!++;
      const variant = input.variant.split('/')[0]!;
      const counter = ({ many: 'manyQueueInputs', 'late-call': 'lateCallInputs', 'reset-owner': 'resetOwnerInputs', 'early-kick': 'earlyKickInputs', slots: 'slotInputs', migrate: 'migrateInputs' } as Record<string, string>)[variant];
      if (counter) extra[counter]!++;
      let out: Outcome;
      let tries = 0;
      for (;;) {
        // The previous input is over once this connection is accepted; its log lines are all written.
        out = await fz.run(input, () => {
          if (pendingIndex >= 0) newProblems(pendingIndex, prev);
          pendingIndex = -1;
        });
        if (out.kind !== 'refused') break;
        extra.refusedRetries!++;
        if (d.exited()) break;
        if (++tries > 5_000) {
          out = { kind: 'fail', why: 'the daemon refused new connections for too long (a previous one never finished closing)', fatal: true };
          break;
        }
        await new Promise((r) => setImmediate(r));
        if (tries > 50) await new Promise((r) => setTimeout(r, 1));
      }
      inputs++;
      ticker.messages += input.manyFds ? 3 : input.steps.filter((x) => x.t === 'msg').length;
      if (d.exited()) {
        await restart('daemon died', `vhostd ${d.exitInfo} during input ${index} (or while tearing down input ${index - 1}).\n${describeInput(fz.res, input)}`, index);
        ticker.tick(inputs, failures.length);
        continue;
      }
      if (out.kind === 'fail') {
        const before = out.fatal && out.why.startsWith('no reply to the opening') && prev ? `\nThe daemon stopped answering before this input began; the previous input (${index - 1}) was:\n${describeInput(fz.res, prev)}` : '';
        if (out.fatal) {
          await restart('daemon hung', `${out.why}${before}\nthis input: ${describeInput(fz.res, input)}`, index, true);
          continue;
        }
        fail(index, 'bad behaviour', `${out.why}\n${describeInput(fz.res, input)}\n--- daemon log (tail) ---\n${d.log.recent(6)}`);
      } else if (out.kind === 'close') {
        closes++;
        closeLogsExpected++;
      } else if (out.kind === 'reply') replies++;
      else extra.aborted!++;
      // When the daemon closed the connection, it is done with this input; otherwise wait for the next acceptance.
      if (out.kind === 'close') newProblems(index, input);
      else pendingIndex = index;
      if ((index + 1) % batch === 0) await checkpoint(index);
      ticker.tick(inputs, failures.length);
    }
    if (!d.exited()) await checkpoint(start + opts.count - 1);
    if (d.exited()) await restart('daemon died', `vhostd ${d.exitInfo} at the end of the run`, start + opts.count - 1);
  } finally {
    await d.stop();
    for (const p of parked.values()) await p.d.stop();
    fz.destroy();
  }
  extra.checkedIo = fz.checked.io;
  extra.callFdChecks = fz.checked.callFds;
  const elapsedMs = Date.now() - t0;
  ticker.tick(inputs, failures.length, true);
  return { target: 'socket', seed, inputs, messages: ticker.messages, closes, replies, failures, elapsedMs, rate: (inputs * 1000) / elapsedMs, extra };
}

export const _test = { parseStream, matchReplies, Resources, generate, describeInput };
