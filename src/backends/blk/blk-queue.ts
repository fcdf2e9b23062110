// virtio-blk requests on one queue: parses them from descriptor chains, runs
// them against the image asynchronously and completes them with a status
// byte. A request that cannot be served always gets IOERR or UNSUPP in its
// status byte; a chain without a status byte never reaches here (the ring
// layer fails the queue instead), so no failure can read as success in the
// guest. Runs on the daemon's thread or on a queue thread alike: everything it
// needs comes in BlkSetup, plain data and shared memory.
import { bit } from '../../features.js';
import { BAD_REQUEST_LOG_LIMIT, BLK_MAX_DISCARD_SECTORS, BLK_MAX_DISCARD_SEG, BLK_SEG_MAX, BLK_SIZE_MAX } from '../../limits.js';
import { ChainReader, ChainWriter, DescriptorChain } from '../../ring/chain.js';
import type { CounterNames } from '../../ring/counters.js';
import type { QueueExecutor, QueueHandler, QueueLogger, QueueRunner, RunResult } from '../../ring/executor.js';
import {
  BLK_F_DISCARD,
  BLK_F_FLUSH,
  BLK_F_WRITE_ZEROES,
  DISCARD_SEGMENT_SIZE,
  ID_BYTES,
  REQ_HEADER_SIZE,
  S_IOERR,
  S_OK,
  S_UNSUPP,
  SECTOR,
  T_DISCARD,
  T_FLUSH,
  T_GET_ID,
  T_IN,
  T_OUT,
  T_WRITE_ZEROES,
  WRITE_ZEROES_F_UNMAP,
} from './config.js';
import { threadImageIo, type ImageFiles, type ImageIo } from './image.js';

/** What a blk queue needs at each start, wherever it runs. */
export interface BlkSetup {
  files: ImageFiles;
  serial: Uint8Array;
  acked: bigint;
  /**
   * Shared with the device (BLK_STATE_BYTES): Int32 [WRITEBACK] is 1 while the driver's cache mode
   * is writeback; Float64 at CAPACITY_OFFSET is the disk's size in bytes (it grows on resize).
   */
  state: SharedArrayBuffer;
  /** This queue's BLK_COUNTERS. */
  counters: SharedArrayBuffer;
}

/** Slots of BlkSetup.state. */
export const WRITEBACK = 0;
export const BLK_STATE_SLOTS = 1;
export const CAPACITY_OFFSET = 8;
export const BLK_STATE_BYTES = 16;

/** Counters per queue, since the daemon started (slots of BLK_COUNTERS). */
export const BC = {
  reads: 0,
  writes: 1,
  flushes: 2,
  getIds: 3,
  discards: 4,
  writeZeroes: 5,
  readBytes: 6,
  writtenBytes: 7,
  /** Requests the image failed (IOERR after an I/O error). */
  ioErrors: 8,
  /** Requests refused as malformed or unsupported (IOERR or UNSUPP without any I/O). */
  badRequests: 9,
} as const;
export const BLK_COUNTERS: CounterNames = Object.keys(BC);

/** One request slot: a chain and everything needed to serve it, reused so the data path allocates nothing per request. */
class Request {
  readonly chain = new DescriptorChain();
  readonly reader = new ChainReader();
  readonly writer = new ChainWriter();
  readonly iov: Uint8Array[] = [];
  readonly hdr = new Uint8Array(REQ_HEADER_SIZE);
  readonly hdrView = new DataView(this.hdr.buffer);
  readonly segs = new Uint8Array(BLK_MAX_DISCARD_SEG * DISCARD_SEGMENT_SIZE);
  readonly segView = new DataView(this.segs.buffer);
  /** Parsed discard/write-zeroes ranges: byte offset, byte length, unmap (0/1), three numbers each. */
  readonly rangeList = new Float64Array(BLK_MAX_DISCARD_SEG * 3);
  type = 0;
  sector = 0;
  /** Discard/write-zeroes: segments parsed into segs, and the next one to run. */
  ranges = 0;
  nextRange = 0;
  readonly onIo: (err: Error | null) => void;

  constructor(
    readonly q: BlkQueueServer,
    done: (r: Request, err: Error | null) => void,
  ) {
    this.onIo = (err) => done(this, err);
  }
}

/** The smallest part of a batch submitted and signalled on its own. */
const MIN_CHUNK = 4;

/** One started queue: its request slots and counters, and the image I/O of the thread it runs on. */
class BlkQueueServer implements QueueHandler {
  readonly faults = 'status' as const;
  readonly free: Request[] = [];
  badCount = 0;
  readonly n: Float64Array;
  private readonly state: Int32Array;
  private readonly capacity: Float64Array;
  private readonly done = (r: Request, err: Error | null): void => this.ioDone(r, err);

  constructor(
    readonly exec: QueueExecutor,
    private readonly s: BlkSetup,
    private readonly io: ImageIo,
  ) {
    this.n = new Float64Array(s.counters, 0, BLK_COUNTERS.length);
    this.state = new Int32Array(s.state, 0, BLK_STATE_SLOTS);
    this.capacity = new Float64Array(s.state, CAPACITY_OFFSET, 1);
  }

  poll(): void {
    this.io.reap();
  }

  /** Whether a completed write must already be on stable storage. */
  private get writeThrough(): boolean {
    if (!(this.s.acked & bit(BLK_F_FLUSH))) return true; // a driver that cannot flush gets write-through
    return Atomics.load(this.state, WRITEBACK) === 0;
  }

  run(): RunResult {
    let batch = 0; // what the run saw once MIN_CHUNK chains were taken (QD1 never asks)
    let half = 0;
    for (let taken = 1; ; taken++) {
      const r = this.free.pop() ?? new Request(this, this.done);
      if (!this.exec.pop(r.chain)) {
        this.free.push(r);
        this.io.submit(); // the rest of the run's reads and writes in one io_uring_enter
        return 'idle';
      }
      this.handle(r);
      // Half a batch goes to the image and back to the driver before the other
      // half is taken, so the driver reaps and refills meanwhile instead of
      // waiting for the whole batch (4k randread QD32: 1.3-2x IOPS). What it
      // refills can keep a run going, so after twice the batch it yields:
      // another queue on this thread would starve otherwise.
      if (taken === MIN_CHUNK) {
        batch = taken + this.exec.available();
        half = Math.max(MIN_CHUNK, (batch + 1) >>> 1);
      }
      if (half && taken % half === 0) {
        this.io.submit();
        this.exec.notifyNow();
        if (taken >= 2 * batch) {
          this.exec.yieldTurn();
          return 'idle';
        }
      }
    }
  }

  private bad(r: Request, reason: string): void {
    r.q.n[BC.badRequests]++;
    if (r.q.badCount++ < BAD_REQUEST_LOG_LIMIT) {
      r.q.exec.log.warn({ queue: r.q.exec.index, head: r.chain.head, reason }, r.q.badCount === BAD_REQUEST_LOG_LIMIT ? 'bad request (further ones only counted)' : 'bad request');
    }
  }

  /** Complete with a status; the used length counts what was written before it, and the status byte. */
  private finish(r: Request, status: number): void {
    r.chain.writeStatus(status);
    const written = status === S_OK ? r.writer.written : 0;
    r.iov.length = 0;
    r.q.exec.complete(r.chain, written + 1);
    r.q.free.push(r);
  }

  private fail(r: Request, reason: string, status = S_IOERR): void {
    this.bad(r, reason);
    this.finish(r, status);
  }

  private ioDone(r: Request, err: Error | null): void {
    if (err) {
      r.q.n[BC.ioErrors]++;
      r.q.exec.log.error({ queue: r.q.exec.index, type: r.type, sector: r.sector, err: err.message }, 'I/O error');
      return this.finish(r, S_IOERR);
    }
    if (r.type === T_DISCARD || r.type === T_WRITE_ZEROES) return this.nextRange(r);
    this.finish(r, S_OK);
  }

  private handle(r: Request): void {
    const chain = r.chain;
    if (chain.fault) return this.fail(r, chain.fault);
    r.reader.reset(chain);
    r.writer.reset(chain);
    // The status byte is the writable part's last byte: data may use the rest.
    r.writer.reserveTail(1);
    if (!r.reader.read(r.hdr)) return this.fail(r, `request header of ${chain.readableBytes} bytes, needs ${REQ_HEADER_SIZE}`);
    const type = (r.type = r.hdrView.getUint32(0, true));
    r.sector = sectorAt(r.hdrView, 8);

    switch (type) {
      case T_IN:
      case T_OUT: {
        const isWrite = type === T_OUT;
        if (isWrite && this.s.files.readonly) return this.fail(r, 'write to a read-only disk');
        const cursor = isWrite ? r.reader : r.writer;
        const len = cursor.remaining;
        const pos = this.checkRange(r.sector, len);
        if (typeof pos === 'string') return this.fail(r, pos);
        cursor.views(len, r.iov);
        if (cursor.spanDescriptors > BLK_SEG_MAX) return this.fail(r, `${cursor.spanDescriptors} data segments, seg_max is ${BLK_SEG_MAX}`);
        if (cursor.spanLargest > BLK_SIZE_MAX) return this.fail(r, `a data segment of ${cursor.spanLargest} bytes, size_max is ${BLK_SIZE_MAX}`);
        if (isWrite) {
          r.q.n[BC.writes]++;
          r.q.n[BC.writtenBytes] += len;
          this.io.write(pos, r.iov, this.writeThrough, r.onIo);
        } else {
          r.q.n[BC.reads]++;
          r.q.n[BC.readBytes] += len;
          this.io.read(pos, r.iov, r.onIo);
        }
        return;
      }
      case T_FLUSH:
        r.q.n[BC.flushes]++;
        this.io.flush(r.onIo);
        return;
      case T_GET_ID:
        r.q.n[BC.getIds]++;
        if (!r.writer.write(this.s.serial)) return this.fail(r, `GET_ID buffer of ${r.writer.remaining} bytes, needs ${ID_BYTES}`);
        return this.finish(r, S_OK);
      case T_DISCARD:
      case T_WRITE_ZEROES: {
        if (!(this.s.acked & bit(type === T_DISCARD ? BLK_F_DISCARD : BLK_F_WRITE_ZEROES))) {
          return this.fail(r, `request type ${type} without its feature`, S_UNSUPP);
        }
        if (this.s.files.readonly) return this.fail(r, 'discard or write-zeroes on a read-only disk');
        const why = this.parseRanges(r);
        if (why) return this.fail(r, why.reason, why.status);
        r.q.n[type === T_DISCARD ? BC.discards : BC.writeZeroes]++;
        r.nextRange = 0;
        return this.nextRange(r);
      }
      default:
        return this.fail(r, `unknown request type ${type}`, S_UNSUPP);
    }
  }

  /** Check the discard/write-zeroes segments and list them in r.rangeList. */
  private parseRanges(r: Request): { reason: string; status: number } | undefined {
    const bytes = r.reader.remaining;
    const count = bytes / DISCARD_SEGMENT_SIZE;
    if (bytes === 0 || !Number.isInteger(count) || count > BLK_MAX_DISCARD_SEG) {
      return { reason: `${bytes} bytes of discard segments (16 each, at most ${BLK_MAX_DISCARD_SEG})`, status: S_IOERR };
    }
    r.reader.read(r.segs.subarray(0, bytes));
    const dv = r.segView;
    const allowed = r.type === T_WRITE_ZEROES ? WRITE_ZEROES_F_UNMAP : 0;
    let n = 0;
    for (let i = 0; i < count; i++) {
      const sector = sectorAt(dv, i * 16);
      const sectors = dv.getUint32(i * 16 + 8, true);
      const flags = dv.getUint32(i * 16 + 12, true);
      if (sectors > BLK_MAX_DISCARD_SECTORS) return { reason: `segment of ${sectors} sectors exceeds ${BLK_MAX_DISCARD_SECTORS}`, status: S_IOERR };
      if (flags & ~allowed) return { reason: `segment flags 0x${flags.toString(16)} not supported`, status: S_UNSUPP };
      const offset = this.checkRange(sector, sectors * SECTOR);
      if (typeof offset === 'string') return { reason: offset, status: S_IOERR };
      if (sectors === 0) continue; // nothing to do, and fallocate refuses a zero length
      r.rangeList[3 * n] = offset;
      r.rangeList[3 * n + 1] = sectors * SECTOR;
      r.rangeList[3 * n + 2] = flags & WRITE_ZEROES_F_UNMAP;
      n++;
    }
    r.ranges = n;
    return undefined;
  }

  /** Run discard/write-zeroes ranges one after another, off the event loop; complete after the last. */
  private nextRange(r: Request): void {
    if (r.nextRange === r.ranges) return this.finish(r, S_OK);
    const l = r.rangeList;
    const i = 3 * r.nextRange++;
    if (r.type === T_DISCARD) this.io.discard(l[i]!, l[i + 1]!, r.onIo);
    else this.io.writeZeroes(l[i]!, l[i + 1]!, l[i + 2] !== 0, this.writeThrough, r.onIo);
  }

  /** Byte offset of a request, or why it is out of bounds (doubles throughout: no BigInt per request). */
  private checkRange(sector: number, len: number): number | string {
    if (len % SECTOR) return `length ${len} is not a multiple of ${SECTOR}`;
    const sectors = Math.floor(this.capacity[0]! / SECTOR);
    if (sector > sectors || len / SECTOR > sectors - sector) {
      return `sector ${sector < 2 ** 53 ? sector : 'beyond 2^53'} + ${len} bytes is past the end of the disk`;
    }
    return sector * SECTOR; // below the capacity in bytes, so exact
  }
}

/** A little-endian u64 sector number as a double: exact below 2^53, and past any disk above it. */
function sectorAt(dv: DataView, at: number): number {
  return dv.getUint32(at + 4, true) * 2 ** 32 + dv.getUint32(at, true);
}

/**
 * The blk runner: a server per started queue. `ioFor` gives the image I/O of
 * the thread the runner lives on (the daemon's Image, or a queue thread's own
 * io_uring over the same descriptors).
 */
export function blkRunner(ioFor: (setup: BlkSetup) => ImageIo): QueueRunner {
  return {
    start: (exec, setup) => new BlkQueueServer(exec, setup as BlkSetup, ioFor(setup as BlkSetup)),
    stop: () => undefined,
  };
}

/** The runner a queue thread loads (see Placement). */
export function createRunner(log: QueueLogger): QueueRunner {
  const warned = new Set<string>();
  return blkRunner((s) => {
    const { io, note } = threadImageIo(s.files);
    if (note && !warned.has(note)) {
      warned.add(note);
      log.warn({ reason: note }, 'io_uring unavailable on this queue thread: its image I/O runs on the thread pool');
    }
    return io;
  });
}
