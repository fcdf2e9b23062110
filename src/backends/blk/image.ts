// The disk image: a regular file or block device, read and written with
// vectored I/O straight between the file and guest memory views: through
// io_uring when the kernel allows it, else readv/writev on libuv's pool.
import { closeSync, constants, fdatasync, fstatSync, openSync, readv, writev, type Stats } from 'node:fs';
import { IoUring } from './io-uring.js';
import { native, EOPNOTSUPP, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../../native/index.js';

/** O_DIRECT needs memory, offset and length aligned; 4 KiB satisfies every device we meet. */
export const DIRECT_ALIGN = 4096;
const BLKGETSIZE64 = 0x80081272;
const ZERO_CHUNK = new Uint8Array(1 << 20);
/** SQEs per ring: more requests than this in flight go to the thread pool. */
const URING_ENTRIES = 1024;

/** How image I/O is done: io_uring, libuv's thread pool, or io_uring where it works (the default). */
export type Aio = 'auto' | 'io_uring' | 'threads';

export interface ImageOptions {
  path: string;
  readonly: boolean;
  direct: boolean;
  aio?: Aio;
}

export class Image {
  readonly path: string;
  readonly size: number;
  readonly readonly: boolean;
  /** Buffered fd: every request can use it. */
  private readonly fd: number;
  /** O_DIRECT fd for aligned requests, when --direct is on. */
  private readonly directFd: number;
  /**
   * O_DSYNC fd for write-through mode. Opened here, with the others: opening it
   * when the first write-through request arrives would block the loop in openat.
   */
  private readonly dsyncFd: number;
  private readonly uring: IoUring | undefined;
  /** The engine in use, and why io_uring is not (when it is not). */
  readonly aio: 'io_uring' | 'threads';
  readonly aioNote: string | undefined;

  constructor(opts: ImageOptions) {
    this.path = opts.path;
    this.readonly = opts.readonly;
    const mode = opts.readonly ? constants.O_RDONLY : constants.O_RDWR;
    let st: Stats;
    this.fd = openSync(opts.path, mode);
    try {
      st = fstatSync(this.fd);
      if (st.isFile()) this.size = st.size;
      else if (st.isBlockDevice()) this.size = blockDeviceSize(this.fd);
      else throw new Error(`${opts.path} is neither a regular file nor a block device`);
      this.directFd = opts.direct ? openSync(opts.path, mode | constants.O_DIRECT) : -1;
      try {
        this.dsyncFd = openSync(opts.path, mode | constants.O_DSYNC);
      } catch (e) {
        if (this.directFd >= 0) closeSync(this.directFd);
        throw e;
      }
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
    const want = opts.aio ?? 'auto';
    const ring = want === 'threads' ? 'threads were asked for' : IoUring.open(URING_ENTRIES);
    if (typeof ring === 'string') {
      if (want === 'io_uring') {
        this.close();
        throw new Error(`--aio io_uring: ${ring}`);
      }
      this.aio = 'threads';
      this.aioNote = ring;
    } else {
      this.uring = ring;
      this.aio = 'io_uring';
    }
  }

  get direct(): boolean {
    return this.directFd >= 0;
  }

  /** Pick the fd for one request: direct when everything is aligned, else buffered. */
  private fdFor(position: number, iov: Uint8Array[], durable: boolean): number {
    if (durable) return this.dsyncFd;
    if (this.directFd < 0 || position % DIRECT_ALIGN) return this.fd;
    for (const v of iov) {
      if (v.byteLength % DIRECT_ALIGN || Number(native.address(v) % BigInt(DIRECT_ALIGN))) return this.fd;
    }
    return this.directFd;
  }

  read(position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void {
    const fd = this.fdFor(position, iov, false);
    if (!this.uring?.readv(fd, position, iov, cb)) transfer(readv, fd, position, iov, cb);
  }

  /** Write; `durable` means the data is on stable storage when cb runs. */
  write(position: number, iov: Uint8Array[], durable: boolean, cb: (err: Error | null) => void): void {
    if (this.uring && !this.uring.full) {
      // RWF_DSYNC does per write what the O_DSYNC fd does.
      this.uring.writev(this.fdFor(position, iov, false), position, iov, durable, cb);
      return;
    }
    transfer(writev, this.fdFor(position, iov, durable), position, iov, cb);
  }

  flush(cb: (err: Error | null) => void): void {
    if (!this.uring?.fdatasync(this.fd, cb)) fdatasync(this.fd, (err) => cb(err));
  }

  /** Complete whatever io_uring finished (busy-polling does not wait for the eventfd). */
  reap(): void {
    this.uring?.reap();
  }

  /** Hand queued io_uring requests to the kernel now (the end of a queue's run). */
  submit(): void {
    this.uring?.submit();
  }

  /** io_uring submissions and the SQEs they carried, for the stats. */
  get uringCounts(): { submits: number; submitted: number; inFlight: number } | undefined {
    const u = this.uring;
    return u && { submits: u.submits, submitted: u.submitted, inFlight: u.inFlight };
  }

  /**
   * Deallocate a range; reads of it return zeros afterwards. fallocate runs on
   * libuv's thread pool (a block device may take long over it), and cb runs on
   * the calling thread's loop. A file system that cannot punch holes succeeds:
   * discard is a hint.
   */
  discard(offset: number, length: number, cb: (err: Error | null) => void): void {
    native.fallocateAsync(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, (rc) => {
      if (rc === 0 || rc === -EOPNOTSUPP) cb(null);
      else cb(new Error(`punch hole failed: errno ${-rc}`));
    });
  }

  /**
   * Make a range read as zeros, deallocating it if `unmap` allows. Every
   * fallocate runs on the thread pool, as in discard(); without fallocate
   * support the zeros are written (thread pool too).
   */
  writeZeroes(offset: number, length: number, unmap: boolean, durable: boolean, cb: (err: Error | null) => void): void {
    const modes = unmap ? [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE] : [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE];
    const done = (err: Error | null): void => (durable && !err ? this.flush(cb) : cb(err));
    const attempt = (m: number): void => {
      if (m === modes.length) return this.writeZeroChunks(offset, length, done);
      native.fallocateAsync(this.fd, modes[m]!, offset, length, (rc) => {
        if (rc === 0) return done(null);
        if (rc !== -EOPNOTSUPP) return cb(new Error(`fallocate failed: errno ${-rc}`));
        attempt(m + 1);
      });
    };
    attempt(0);
  }

  /** No fallocate support: write the zeros. */
  private writeZeroChunks(offset: number, length: number, cb: (err: Error | null) => void): void {
    const chunks: Uint8Array[] = [];
    for (let left = length; left > 0; left -= ZERO_CHUNK.length) chunks.push(ZERO_CHUNK.subarray(0, Math.min(left, ZERO_CHUNK.length)));
    let i = 0;
    const next = (err: Error | null): void => {
      if (err || i === chunks.length) return cb(err);
      const pos = offset + i * ZERO_CHUNK.length;
      transfer(writev, this.fd, pos, [chunks[i++]!], next);
    };
    next(null);
  }

  close(): void {
    this.uring?.close();
    for (const fd of [this.fd, this.directFd, this.dsyncFd]) if (fd >= 0) closeSync(fd);
  }
}

function blockDeviceSize(fd: number): number {
  const out = new BigUint64Array(1);
  const rc = native.ioctl(fd, BLKGETSIZE64, out);
  if (rc < 0) throw new Error(`BLKGETSIZE64 failed: errno ${-rc}`);
  return Number(out[0]);
}

type VectorIo = (fd: number, buffers: Uint8Array[], position: number, cb: (err: NodeJS.ErrnoException | null, bytes: number) => void) => void;

/** readv/writev until every byte moved; a short transfer that makes no progress is an error. */
function transfer(op: VectorIo, fd: number, position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void {
  const total = iov.reduce((n, v) => n + v.byteLength, 0);
  if (total === 0) return queueMicrotask(() => cb(null));
  let done = 0;
  let cur = iov;
  const step = (): void => {
    op(fd, cur, position + done, (err, n) => {
      if (err) return cb(err);
      if (n === 0) return cb(new Error(`short ${op === readv ? 'read' : 'write'} at byte ${position + done} (end of image?)`));
      done += n;
      if (done === total) return cb(null);
      cur = advance(cur, n);
      step();
    });
  };
  step();
}

function advance(iov: Uint8Array[], n: number): Uint8Array[] {
  let i = 0;
  while (n >= iov[i]!.byteLength) n -= iov[i++]!.byteLength;
  return [iov[i]!.subarray(n), ...iov.slice(i + 1)];
}
