// virtio-blk over an Image: parses requests from descriptor chains, runs them
// against the image asynchronously and completes them with a status byte. A
// request that cannot be served always gets IOERR or UNSUPP in its status
// byte; a chain without a status byte never reaches here (the ring layer
// fails the queue instead), so no failure can read as success in the guest.
import type { Device } from '../../device.js';
import {
  bit,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../../features.js';
import {
  BAD_REQUEST_LOG_LIMIT,
  BLK_MAX_DISCARD_SECTORS,
  BLK_MAX_DISCARD_SEG,
  BLK_SEG_MAX,
  BLK_SIZE_MAX,
  MAX_QUEUE_SIZE,
} from '../../limits.js';
import { ChainReader, ChainWriter, DescriptorChain } from '../../ring/chain.js';
import { CounterSet, type CounterNames } from '../../ring/counters.js';
import type { QueueExecutor, QueueHandler, QueueLogger, QueueRunner, RunResult } from '../../ring/executor.js';
import {
  BLK_F_BLK_SIZE,
  BLK_F_CONFIG_WCE,
  BLK_F_DISCARD,
  BLK_F_FLUSH,
  BLK_F_MQ,
  BLK_F_RO,
  BLK_F_SEG_MAX,
  BLK_F_SIZE_MAX,
  BLK_F_TOPOLOGY,
  BLK_F_WRITE_ZEROES,
  CONFIG_SPACE_LIMIT,
  DISCARD_SEGMENT_SIZE,
  encodeBlkConfig,
  ID_BYTES,
  OFF_WRITEBACK,
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
  type BlkConfig,
} from './config.js';
import { Image } from './image.js';

export { MAX_QUEUE_SIZE };

export interface BlkOptions {
  image: Image;
  numQueues: number;
  serial: string;
  logicalBlockSize: number;
  /** Largest queue the front-end may configure. */
  maxQueueSize?: number;
}

/** Counters per queue, since the daemon started (slots of BLK_COUNTERS). */
const BC = {
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
const BLK_COUNTERS: CounterNames = Object.keys(BC);

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
  sector = 0n;
  /** Discard/write-zeroes: segments parsed into segs, and the next one to run. */
  ranges = 0;
  nextRange = 0;
  readonly onIo: (err: Error | null) => void;

  constructor(
    readonly q: BlkQueue,
    done: (r: Request, err: Error | null) => void,
  ) {
    this.onIo = (err) => done(this, err);
  }
}

interface BlkQueue {
  exec: QueueExecutor;
  free: Request[];
  bad: number;
  n: Float64Array;
}

export class BlkDevice implements Device {
  readonly kind = 'blk';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  get queueNum(): number {
    return this.numQueues;
  }
  readonly features: bigint;
  readonly protocolFeatures = bit(9) | bit(12); // CONFIG, INFLIGHT_SHMFD
  /** blk queues run on the daemon's thread (the inflight record is mapped there). */
  readonly runner: QueueRunner;
  private readonly image: Image;
  private readonly serial: Uint8Array;
  private readonly blkSize: number;
  private writeback = true;
  private acked = 0n;
  private readonly done = (r: Request, err: Error | null): void => this.ioDone(r, err);
  private readonly counters: CounterSet[];

  constructor(
    opts: BlkOptions,
    private readonly log: QueueLogger,
  ) {
    this.image = opts.image;
    this.numQueues = opts.numQueues;
    this.maxQueueSize = opts.maxQueueSize ?? MAX_QUEUE_SIZE;
    this.blkSize = opts.logicalBlockSize;
    this.serial = new Uint8Array(ID_BYTES);
    this.serial.set(new TextEncoder().encode(opts.serial).subarray(0, ID_BYTES));
    let f =
      bit(BLK_F_SIZE_MAX) | bit(BLK_F_SEG_MAX) | bit(BLK_F_BLK_SIZE) | bit(BLK_F_FLUSH) | bit(BLK_F_TOPOLOGY) |
      bit(BLK_F_CONFIG_WCE) | bit(BLK_F_MQ) |
      bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC) |
      bit(VIRTIO_F_NOTIFY_ON_EMPTY) | bit(VIRTIO_F_ANY_LAYOUT);
    f |= this.image.readonly ? bit(BLK_F_RO) : bit(BLK_F_DISCARD) | bit(BLK_F_WRITE_ZEROES);
    this.features = f;
    this.counters = Array.from({ length: this.numQueues }, () => new CounterSet(BLK_COUNTERS));
    this.runner = {
      start: (exec) => this.startQueue(exec),
      stop: () => undefined,
    };
  }

  get capacitySectors(): bigint {
    return BigInt(Math.floor(this.image.size / SECTOR));
  }

  private config(): BlkConfig {
    const perBlock = this.blkSize / SECTOR;
    return {
      capacitySectors: this.capacitySectors,
      sizeMax: BLK_SIZE_MAX,
      segMax: BLK_SEG_MAX,
      blkSize: this.blkSize,
      physicalBlockExp: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: this.writeback,
      numQueues: this.numQueues,
      maxDiscardSectors: BLK_MAX_DISCARD_SECTORS,
      maxDiscardSeg: BLK_MAX_DISCARD_SEG,
      discardSectorAlignment: perBlock,
      maxWriteZeroesSectors: BLK_MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: BLK_MAX_DISCARD_SEG,
      writeZeroesMayUnmap: true,
    };
  }

  /** Whether a completed write must already be on stable storage. */
  private get writeThrough(): boolean {
    if (!(this.acked & bit(BLK_F_FLUSH))) return true; // a driver that cannot flush gets write-through
    return !this.writeback;
  }

  setFeatures(acked: bigint): void {
    this.acked = acked;
  }

  readConfig(offset: number, size: number): Uint8Array | undefined {
    if (offset + size > CONFIG_SPACE_LIMIT) return undefined;
    const out = new Uint8Array(size);
    out.set(encodeBlkConfig(this.config()).subarray(offset, offset + size));
    return out;
  }

  writeConfig(offset: number, data: Uint8Array): string | undefined {
    if (offset !== OFF_WRITEBACK || data.length !== 1) return `only the writeback byte (offset ${OFF_WRITEBACK}, 1 byte) is writable`;
    if (data[0]! > 1) return `writeback value ${data[0]} is not 0 or 1`;
    this.writeback = data[0] === 1;
    this.log.info({ writeback: this.writeback }, 'cache mode changed by the driver');
    return undefined;
  }

  queueSetup(): undefined {
    return undefined;
  }

  private startQueue(exec: QueueExecutor): QueueHandler {
    const q: BlkQueue = { exec, free: [], bad: 0, n: this.counters[exec.index]!.values };
    return { run: () => this.serve(q), faults: 'status', poll: () => this.image.reap() };
  }

  stopQueue(): void {}

  queueStats(index: number): Record<string, number> | undefined {
    return this.counters[index]?.toJSON();
  }

  deviceStats(): Record<string, unknown> {
    return { image: this.image.path, bytes: this.image.size, readonly: this.image.readonly, aio: this.image.aio, writeback: this.writeback, ...(this.image.uringCounts && { uring: this.image.uringCounts }) };
  }

  reset(): void {
    this.writeback = true;
    this.acked = 0n;
  }

  private serve(q: BlkQueue): RunResult {
    for (;;) {
      const r = q.free.pop() ?? new Request(q, this.done);
      if (!q.exec.pop(r.chain)) {
        q.free.push(r);
        this.image.submit(); // the whole run's reads and writes in one io_uring_enter
        return 'idle';
      }
      this.handle(r);
    }
  }

  private bad(r: Request, reason: string): void {
    r.q.n[BC.badRequests]++;
    if (r.q.bad++ < BAD_REQUEST_LOG_LIMIT) {
      r.q.exec.log.warn({ queue: r.q.exec.index, head: r.chain.head, reason }, r.q.bad === BAD_REQUEST_LOG_LIMIT ? 'bad request (further ones only counted)' : 'bad request');
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
      r.q.exec.log.error({ queue: r.q.exec.index, type: r.type, sector: r.sector.toString(), err: err.message }, 'I/O error');
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
    r.sector = r.hdrView.getBigUint64(8, true);

    switch (type) {
      case T_IN:
      case T_OUT: {
        const isWrite = type === T_OUT;
        if (isWrite && this.image.readonly) return this.fail(r, 'write to a read-only disk');
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
          this.image.write(pos, r.iov, this.writeThrough, r.onIo);
        } else {
          r.q.n[BC.reads]++;
          r.q.n[BC.readBytes] += len;
          this.image.read(pos, r.iov, r.onIo);
        }
        return;
      }
      case T_FLUSH:
        r.q.n[BC.flushes]++;
        this.image.flush(r.onIo);
        return;
      case T_GET_ID:
        r.q.n[BC.getIds]++;
        if (!r.writer.write(this.serial)) return this.fail(r, `GET_ID buffer of ${r.writer.remaining} bytes, needs ${ID_BYTES}`);
        return this.finish(r, S_OK);
      case T_DISCARD:
      case T_WRITE_ZEROES: {
        if (!(this.acked & bit(type === T_DISCARD ? BLK_F_DISCARD : BLK_F_WRITE_ZEROES))) {
          return this.fail(r, `request type ${type} without its feature`, S_UNSUPP);
        }
        if (this.image.readonly) return this.fail(r, 'discard or write-zeroes on a read-only disk');
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
      const sector = dv.getBigUint64(i * 16, true);
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
    if (r.type === T_DISCARD) this.image.discard(l[i]!, l[i + 1]!, r.onIo);
    else this.image.writeZeroes(l[i]!, l[i + 1]!, l[i + 2] !== 0, this.writeThrough, r.onIo);
  }

  /** Byte offset of a request, or why it is out of bounds. */
  private checkRange(sector: bigint, len: number): number | string {
    if (len % SECTOR) return `length ${len} is not a multiple of ${SECTOR}`;
    const end = sector * BigInt(SECTOR) + BigInt(len);
    if (end > this.capacitySectors * BigInt(SECTOR)) return `sector ${sector} + ${len} bytes is past the end of the disk`;
    return Number(sector) * SECTOR;
  }
}
