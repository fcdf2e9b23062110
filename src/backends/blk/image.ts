// The disk image: a regular file or block device, read and written with
// vectored I/O straight between the file and guest memory views: through
// io_uring when the kernel allows it, else readv/writev on libuv's pool. An
// RBD image (rbd.ts) serves the same interfaces.
import { closeSync, constants, fdatasync, fstatSync, openSync, readv, statfsSync, writev, type Stats } from 'node:fs';
import { IoUring } from './io-uring.js';
import { threadRbdIo } from './rbd.js';
import { native, EOPNOTSUPP, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../../native/index.js';
import { microtask } from '../../microtask.js';

/** statfs f_type of tmpfs (and of /dev/shm). */
const TMPFS_MAGIC = 0x01021994;

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

/**
 * An image's open descriptors and facts: plain data, so a queue thread can be
 * handed them and do I/O on the same descriptors (which only the Image owns).
 */
export interface ImageFiles {
  path: string;
  size: number;
  readonly: boolean;
  /** Buffered fd: every request can use it. */
  fd: number;
  /** O_DIRECT fd for aligned requests, when --direct is on; else -1. */
  directFd: number;
  /** O_DSYNC fd for write-through on the thread pool (io_uring uses RWF_DSYNC instead). */
  dsyncFd: number;
  aio: 'io_uring' | 'threads' | 'rbd';
  /**
   * The file system serves cached I/O without blocking (RWF_NOWAIT), so io_uring
   * completes it inside the submitting call: false on tmpfs.
   */
  nowait: boolean;
  /** The librbd image handle when the disk is an RBD image (the fds are -1 then). */
  rbd?: bigint;
}

/** One thread's I/O on a disk, whatever backs it. Callbacks run on that thread's loop. */
export interface ImageIo {
  read(position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void;
  /** Write; `durable` means the data is on stable storage when cb runs. */
  write(position: number, iov: Uint8Array[], durable: boolean, cb: (err: Error | null) => void): void;
  flush(cb: (err: Error | null) => void): void;
  discard(offset: number, length: number, cb: (err: Error | null) => void): void;
  writeZeroes(offset: number, length: number, unmap: boolean, durable: boolean, cb: (err: Error | null) => void): void;
  /** Complete whatever finished (busy-polling does not wait for the loop's notification). */
  reap(): void;
  /** Hand queued requests to the kernel now (the end of a queue's run). */
  submit(): void;
  readonly uringCounts: { submits: number; submitted: number; inFlight: number } | undefined;
}

/** What a blk device needs of the disk it serves: a file (Image) or an RBD image (RbdImage). */
export interface DiskImage {
  /** Plain data for queue threads. */
  readonly files: ImageFiles;
  /** I/O from the daemon's thread. */
  readonly io: ImageIo;
  readonly path: string;
  readonly size: number;
  readonly readonly: boolean;
  readonly aio: ImageFiles['aio'];
  readonly direct: boolean;
  readonly aioNote: string | undefined;
  readonly uringCounts: { submits: number; submitted: number; inFlight: number } | undefined;
  /** The size now (it may have grown). */
  currentSize(): number;
  close(): void;
}

/**
 * The I/O of one thread on an image's descriptors: through that thread's
 * io_uring when it has one, else libuv's pool (which also runs fallocate).
 */
export class FileIo implements ImageIo {
  constructor(
    readonly files: ImageFiles,
    private readonly uring: IoUring | undefined,
  ) {}

  /** Pick the fd for one request: direct when everything is aligned, else buffered. */
  private fdFor(position: number, iov: Uint8Array[], durable: boolean): number {
    const f = this.files;
    if (durable) return f.dsyncFd;
    if (f.directFd < 0 || position % DIRECT_ALIGN) return f.fd;
    for (const v of iov) {
      if (v.byteLength % DIRECT_ALIGN || Number(native.address(v) % BigInt(DIRECT_ALIGN))) return f.fd;
    }
    return f.directFd;
  }

  read(position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void {
    const fd = this.fdFor(position, iov, false);
    if (!this.uring?.readv(fd, position, iov, this.files.nowait, cb)) transfer(readv, fd, position, iov, cb);
  }

  /** Write; `durable` means the data is on stable storage when cb runs. */
  write(position: number, iov: Uint8Array[], durable: boolean, cb: (err: Error | null) => void): void {
    if (this.uring && !this.uring.full) {
      // RWF_DSYNC does per write what the O_DSYNC fd does.
      this.uring.writev(this.fdFor(position, iov, false), position, iov, durable, this.files.nowait, cb);
      return;
    }
    transfer(writev, this.fdFor(position, iov, durable), position, iov, cb);
  }

  flush(cb: (err: Error | null) => void): void {
    if (!this.uring?.fdatasync(this.files.fd, cb)) fdatasync(this.files.fd, (err) => cb(err));
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
    native.fallocateAsync(this.files.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, (rc) => {
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
      native.fallocateAsync(this.files.fd, modes[m]!, offset, length, (rc) => {
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
      transfer(writev, this.files.fd, pos, [chunks[i++]!], next);
    };
    next(null);
  }
}

let threadRing: IoUring | string | undefined;

/**
 * I/O on borrowed descriptors from a queue thread: through this thread's own
 * io_uring (one per thread, opened at first use) when the image uses io_uring.
 * A thread that cannot open one uses the pool, and `note` says why.
 */
export function threadImageIo(files: ImageFiles): { io: ImageIo; note?: string } {
  if (files.rbd !== undefined) return { io: threadRbdIo(files.rbd) };
  if (files.aio !== 'io_uring') return { io: new FileIo(files, undefined) };
  threadRing ??= IoUring.open(URING_ENTRIES);
  if (typeof threadRing === 'string') return { io: new FileIo(files, undefined), note: threadRing };
  return { io: new FileIo(files, threadRing) };
}

/** The image a blk device serves: opens and owns the descriptors, and does the daemon thread's I/O. */
export class Image implements DiskImage {
  readonly files: ImageFiles;
  /** I/O from the daemon's thread. */
  readonly io: FileIo;
  private readonly uring: IoUring | undefined;
  /** Why io_uring is not in use, when it is not. */
  readonly aioNote: string | undefined;

  constructor(opts: ImageOptions) {
    const mode = opts.readonly ? constants.O_RDONLY : constants.O_RDWR;
    let st: Stats;
    let size: number;
    let directFd = -1;
    let dsyncFd: number;
    const fd = openSync(opts.path, mode);
    try {
      st = fstatSync(fd);
      if (st.isFile()) size = st.size;
      else if (st.isBlockDevice()) size = blockDeviceSize(fd);
      else throw new Error(`${opts.path} is neither a regular file nor a block device`);
      directFd = opts.direct ? openSync(opts.path, mode | constants.O_DIRECT) : -1;
      // Opened now, with the others: opening it at the first write-through request would block the loop in openat.
      dsyncFd = openSync(opts.path, mode | constants.O_DSYNC);
    } catch (e) {
      closeSync(fd);
      if (directFd >= 0) closeSync(directFd);
      throw e;
    }
    const want = opts.aio ?? 'auto';
    const ring = want === 'threads' ? 'threads were asked for' : IoUring.open(URING_ENTRIES);
    if (typeof ring === 'string' && want === 'io_uring') {
      for (const f of [fd, directFd, dsyncFd]) if (f >= 0) closeSync(f);
      throw new Error(`--aio io_uring: ${ring}`);
    }
    if (typeof ring === 'string') this.aioNote = ring;
    else this.uring = ring;
    // A block device node lives on devtmpfs, but its I/O goes to the device, which has RWF_NOWAIT.
    const nowait = st.isBlockDevice() || statfsSync(opts.path).type !== TMPFS_MAGIC;
    this.files = { path: opts.path, size, readonly: opts.readonly, fd, directFd, dsyncFd, aio: this.uring ? 'io_uring' : 'threads', nowait };
    this.io = new FileIo(this.files, this.uring);
  }

  get path(): string {
    return this.files.path;
  }

  /** The image's size now (it may have grown since it was opened). */
  currentSize(): number {
    const st = fstatSync(this.files.fd);
    return st.isBlockDevice() ? blockDeviceSize(this.files.fd) : st.size;
  }

  get size(): number {
    return this.files.size;
  }

  get readonly(): boolean {
    return this.files.readonly;
  }

  get aio(): ImageFiles['aio'] {
    return this.files.aio;
  }

  get direct(): boolean {
    return this.files.directFd >= 0;
  }

  read(position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void {
    this.io.read(position, iov, cb);
  }

  write(position: number, iov: Uint8Array[], durable: boolean, cb: (err: Error | null) => void): void {
    this.io.write(position, iov, durable, cb);
  }

  flush(cb: (err: Error | null) => void): void {
    this.io.flush(cb);
  }

  discard(offset: number, length: number, cb: (err: Error | null) => void): void {
    this.io.discard(offset, length, cb);
  }

  writeZeroes(offset: number, length: number, unmap: boolean, durable: boolean, cb: (err: Error | null) => void): void {
    this.io.writeZeroes(offset, length, unmap, durable, cb);
  }

  get uringCounts(): { submits: number; submitted: number; inFlight: number } | undefined {
    return this.io.uringCounts;
  }

  /** After every queue stopped: queue threads borrowed the descriptors only while serving. */
  close(): void {
    this.uring?.close();
    const f = this.files;
    for (const fd of [f.fd, f.directFd, f.dsyncFd]) if (fd >= 0) closeSync(fd);
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
  if (total === 0) return microtask(() => cb(null));
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
