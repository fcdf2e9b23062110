// virtio-blk over an Image: parses requests from descriptor chains, runs them
// against the image asynchronously and completes them with a status byte.
import type { Device } from '../../device.js';
import {
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../../device.js';
import { Chain } from '../../ring/split-ring.js';
import type { Vring, VringHandler } from '../../ring/vring.js';
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

export interface BlkOptions {
  image: Image;
  numQueues: number;
  serial: string;
  logicalBlockSize: number;
  /** Largest queue the front-end may configure. */
  maxQueueSize?: number;
}

export interface BlkLogger {
  error(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

const bit = (n: number): bigint => 1n << BigInt(n);
export const MAX_QUEUE_SIZE = 1024;
const SEG_MAX = 126;
const SIZE_MAX = 1 << 20;
const MAX_DISCARD_SECTORS = 0x3fffff;
const MAX_DISCARD_SEG = 16;
/** Bad requests logged per queue before the log goes quiet. */
const BAD_REQUEST_LOG_LIMIT = 20;

interface QueueState {
  vring: Vring;
  bad: number;
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
  private readonly image: Image;
  private readonly serial: Uint8Array;
  private readonly blkSize: number;
  private writeback = true;
  private acked = 0n;
  private readonly queues = new Map<number, QueueState>();

  constructor(
    opts: BlkOptions,
    private readonly log: BlkLogger,
  ) {
    this.image = opts.image;
    this.numQueues = opts.numQueues;
    this.maxQueueSize = opts.maxQueueSize ?? MAX_QUEUE_SIZE;
    this.blkSize = opts.logicalBlockSize;
    this.serial = new TextEncoder().encode(opts.serial).subarray(0, ID_BYTES);
    let f =
      bit(BLK_F_SIZE_MAX) | bit(BLK_F_SEG_MAX) | bit(BLK_F_BLK_SIZE) | bit(BLK_F_FLUSH) | bit(BLK_F_TOPOLOGY) |
      bit(BLK_F_CONFIG_WCE) | bit(BLK_F_MQ) |
      bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC) |
      bit(VIRTIO_F_NOTIFY_ON_EMPTY) | bit(VIRTIO_F_ANY_LAYOUT);
    f |= this.image.readonly ? bit(BLK_F_RO) : bit(BLK_F_DISCARD) | bit(BLK_F_WRITE_ZEROES);
    this.features = f;
  }

  get capacitySectors(): bigint {
    return BigInt(Math.floor(this.image.size / SECTOR));
  }

  private config(): BlkConfig {
    const perBlock = this.blkSize / SECTOR;
    return {
      capacitySectors: this.capacitySectors,
      sizeMax: SIZE_MAX,
      segMax: SEG_MAX,
      blkSize: this.blkSize,
      physicalBlockExp: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: this.writeback,
      numQueues: this.numQueues,
      maxDiscardSectors: MAX_DISCARD_SECTORS,
      maxDiscardSeg: MAX_DISCARD_SEG,
      discardSectorAlignment: perBlock,
      maxWriteZeroesSectors: MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: MAX_DISCARD_SEG,
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

  startQueue(vring: Vring): VringHandler {
    const q: QueueState = { vring, bad: 0 };
    this.queues.set(vring.index, q);
    return { kick: () => this.process(q) };
  }

  stopQueue(vring: Vring): void {
    this.queues.delete(vring.index);
  }

  reset(): void {
    this.queues.clear();
    this.writeback = true;
    this.acked = 0n;
  }

  private process(q: QueueState): void {
    for (;;) {
      // Bounded: each pass takes at most a queue's worth of chains.
      for (let n = 0; n < q.vring.size; n++) {
        const chain = new Chain();
        if (!q.vring.pop(chain)) break;
        this.handle(q, chain);
      }
      if (!q.vring.rearm()) return;
    }
  }

  private bad(q: QueueState, chain: Chain, reason: string): void {
    if (q.bad++ < BAD_REQUEST_LOG_LIMIT) this.log.warn({ queue: q.vring.index, head: chain.head, reason }, 'bad request');
  }

  private handle(q: QueueState, chain: Chain): void {
    const status = lastByte(chain.writable);
    if (!status || chain.readableBytes < REQ_HEADER_SIZE) {
      // Nowhere to put a status: hand the chain back untouched.
      this.bad(q, chain, status ? 'request header shorter than 16 bytes' : 'no writable status byte');
      q.vring.complete(chain.head, 0);
      return;
    }
    const hdr = new DataView(gather(chain.readable, 0, REQ_HEADER_SIZE).buffer);
    const type = hdr.getUint32(0, true);
    const sector = hdr.getBigUint64(8, true);
    const finish = (code: number, written = 0): void => {
      status.bytes[status.index] = code;
      q.vring.complete(chain.head, written + 1);
    };
    const fail = (reason: string, code = S_IOERR): void => {
      this.bad(q, chain, reason);
      finish(code);
    };
    const ioError = (err: Error): void => {
      this.log.error({ queue: q.vring.index, type, sector: sector.toString(), err: err.message }, 'I/O error');
      finish(S_IOERR);
    };

    switch (type) {
      case T_IN:
      case T_OUT: {
        const isWrite = type === T_OUT;
        if (isWrite && this.image.readonly) return fail('write to a read-only disk');
        const len = isWrite ? chain.readableBytes - REQ_HEADER_SIZE : chain.writableBytes - 1;
        const range = this.checkRange(sector, len);
        if (typeof range === 'string') return fail(range);
        const iov = isWrite ? slice(chain.readable, REQ_HEADER_SIZE, len) : slice(chain.writable, 0, len);
        if (isWrite) this.image.write(range, iov, this.writeThrough, (err) => (err ? ioError(err) : finish(S_OK)));
        else this.image.read(range, iov, (err) => (err ? ioError(err) : finish(S_OK, len)));
        return;
      }
      case T_FLUSH:
        this.image.flush((err) => (err ? ioError(err) : finish(S_OK)));
        return;
      case T_GET_ID: {
        const room = chain.writableBytes - 1;
        if (room < ID_BYTES) return fail(`GET_ID buffer of ${room} bytes, needs ${ID_BYTES}`);
        const id = new Uint8Array(ID_BYTES);
        id.set(this.serial);
        scatter(chain.writable, id);
        finish(S_OK, ID_BYTES);
        return;
      }
      case T_DISCARD:
      case T_WRITE_ZEROES: {
        if (!(this.acked & bit(type === T_DISCARD ? BLK_F_DISCARD : BLK_F_WRITE_ZEROES))) {
          return fail(`request type ${type} without its feature`, S_UNSUPP);
        }
        if (this.image.readonly) return fail('discard or write-zeroes on a read-only disk');
        const bytes = chain.readableBytes - REQ_HEADER_SIZE;
        const count = bytes / DISCARD_SEGMENT_SIZE;
        if (bytes === 0 || !Number.isInteger(count) || count > MAX_DISCARD_SEG) {
          return fail(`${bytes} bytes of discard segments (16 each, at most ${MAX_DISCARD_SEG})`);
        }
        const segs = new DataView(gather(chain.readable, REQ_HEADER_SIZE, bytes).buffer);
        const ranges: { offset: number; length: number; unmap: boolean }[] = [];
        for (let i = 0; i < count; i++) {
          const s = segs.getBigUint64(i * 16, true);
          const n = segs.getUint32(i * 16 + 8, true);
          const flags = segs.getUint32(i * 16 + 12, true);
          if (n > MAX_DISCARD_SECTORS) return fail(`segment of ${n} sectors exceeds ${MAX_DISCARD_SECTORS}`);
          const allowed = type === T_WRITE_ZEROES ? WRITE_ZEROES_F_UNMAP : 0;
          if (flags & ~allowed) return fail(`segment flags 0x${flags.toString(16)} not supported`, S_UNSUPP);
          const offset = this.checkRange(s, n * SECTOR);
          if (typeof offset === 'string') return fail(offset);
          if (n === 0) continue; // nothing to do, and fallocate refuses a zero length
          ranges.push({ offset, length: n * SECTOR, unmap: (flags & WRITE_ZEROES_F_UNMAP) !== 0 });
        }
        let i = 0;
        const next = (err: Error | null): void => {
          if (err) return ioError(err);
          if (i === ranges.length) return finish(S_OK);
          const r = ranges[i++]!;
          if (type === T_DISCARD) this.image.discard(r.offset, r.length, next);
          else this.image.writeZeroes(r.offset, r.length, r.unmap, this.writeThrough, next);
        };
        next(null);
        return;
      }
      default:
        return fail(`unknown request type ${type}`, S_UNSUPP);
    }
  }

  /** Byte offset of a request, or why it is out of bounds. */
  private checkRange(sector: bigint, len: number): number | string {
    if (len % SECTOR) return `length ${len} is not a multiple of ${SECTOR}`;
    const end = sector * BigInt(SECTOR) + BigInt(len);
    if (end > this.capacitySectors * BigInt(SECTOR)) return `sector ${sector} + ${len} bytes is past the end of the disk`;
    return Number(sector) * SECTOR;
  }
}

/** The last byte of a list of segments, as (view, index). */
function lastByte(segs: Uint8Array[]): { bytes: Uint8Array; index: number } | undefined {
  for (let i = segs.length - 1; i >= 0; i--) {
    const s = segs[i]!;
    if (s.byteLength) return { bytes: s, index: s.byteLength - 1 };
  }
  return undefined;
}

/** Copy `len` bytes starting `skip` bytes into the segments (small headers only). */
function gather(segs: Uint8Array[], skip: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  let got = 0;
  for (const s of segs) {
    if (got === len) break;
    if (skip >= s.byteLength) {
      skip -= s.byteLength;
      continue;
    }
    const piece = s.subarray(skip, skip + (len - got));
    out.set(piece, got);
    got += piece.byteLength;
    skip = 0;
  }
  return out;
}

function scatter(segs: Uint8Array[], data: Uint8Array): void {
  let off = 0;
  for (const s of segs) {
    if (off === data.length) return;
    const n = Math.min(s.byteLength, data.length - off);
    s.set(data.subarray(off, off + n));
    off += n;
  }
}

/** Views of `len` bytes starting `skip` bytes into the segments, without copying. */
function slice(segs: Uint8Array[], skip: number, len: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const s of segs) {
    if (len === 0) break;
    if (skip >= s.byteLength) {
      skip -= s.byteLength;
      continue;
    }
    const piece = s.subarray(skip, skip + len);
    out.push(piece);
    len -= piece.byteLength;
    skip = 0;
  }
  return out;
}
