// A Ceph RBD image as a disk: librados/librbd through the native module
// (rbd.c, opened with dlopen). Requests go to librbd asynchronously with the
// guest's buffers as their iovecs, so data moves between RBD and guest memory
// without a copy through JS; each request's tag and result come back through a
// pipe the calling thread's event loop watches, so nothing blocks a loop.
import { constants as os } from 'node:os';
import {
  native,
  EAGAIN,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  O_CLOEXEC,
  O_NONBLOCK,
  POLL_READABLE,
  RBD_OP_DISCARD,
  RBD_OP_FLUSH,
  RBD_OP_READV,
  RBD_OP_WRITE_ZEROES,
  RBD_OP_WRITEV,
  type WatchHandle,
} from '../../native/index.js';
import type { ImageFiles, ImageIo } from './image.js';
import { putIovec } from './iovec.js';
import { microtask } from '../../microtask.js';

export interface RbdOptions {
  /** POOL/IMAGE (or POOL/NAMESPACE/IMAGE is not supported: one slash). */
  spec: string;
  /** ceph.conf; librados' default search when absent. */
  conf?: string;
  /** Client name without "client." (default admin). */
  id?: string;
  keyring?: string;
  readonly: boolean;
  /** How long connecting to the monitors may take, seconds. */
  timeoutS: number;
}

export class RbdError extends Error {}

const errnoName = (e: number): string => Object.entries(os.errno).find(([, v]) => v === e)?.[0] ?? `errno ${e}`;

/** The image a blk device serves from RBD: the cluster connection and the image handle, shared by every queue. */
export class RbdImage {
  readonly files: ImageFiles;
  readonly io: RbdIo;
  readonly aioNote = undefined;
  readonly direct = false;
  private readonly cluster: bigint;
  private readonly ioctx: bigint;
  private readonly image: bigint;
  private watchFd = -1;
  private watchHandle: WatchHandle | undefined;
  private updateWatch: bigint | undefined;

  /** Connect and open; blocks up to opts.timeoutS while the monitors answer (at start-up, before anything is served). */
  constructor(opts: RbdOptions) {
    const parts = opts.spec.split('/');
    if (parts.length !== 2 || !parts[0] || !parts[1]) throw new RbdError(`--rbd ${opts.spec}: expected POOL/IMAGE`);
    const [pool, name] = parts as [string, string];
    const why = native.rbdLoadError();
    if (why) throw new RbdError(why);
    const cluster = native.radosCreate(opts.id ?? 'admin');
    if (typeof cluster === 'number') throw new RbdError(`rados_create: ${errnoName(-cluster)}`);
    let ioctx: bigint | undefined;
    try {
      const rc = native.radosConfReadFile(cluster, opts.conf ?? null);
      if (rc < 0) throw new RbdError(opts.conf ? `cannot read Ceph configuration ${opts.conf}: ${errnoName(-rc)}` : `no Ceph configuration found (/etc/ceph/ceph.conf): ${errnoName(-rc)}; give --ceph-conf`);
      if (opts.keyring) this.set(cluster, 'keyring', opts.keyring);
      for (const o of ['client_mount_timeout', 'rados_mon_op_timeout']) this.set(cluster, o, String(opts.timeoutS));
      const c = native.radosConnect(cluster);
      if (c < 0) {
        const e = -c;
        throw new RbdError(
          e === os.errno.ETIMEDOUT ? `no answer from the Ceph monitors within ${opts.timeoutS} s`
          : e === os.errno.ENOENT || e === os.errno.EACCES || e === os.errno.EPERM ? `cannot authenticate as client.${opts.id ?? 'admin'} (${errnoName(e)}): check the keyring${opts.keyring ? ` ${opts.keyring}` : ''}`
          : `cannot connect to the Ceph cluster: ${errnoName(e)}`,
        );
      }
      const io = native.radosIoctxCreate(cluster, pool);
      if (typeof io === 'number') throw new RbdError(io === -os.errno.ENOENT ? `pool ${pool} does not exist` : `pool ${pool}: ${errnoName(-io)}`);
      ioctx = io;
      const img = native.rbdOpen(io, name);
      if (typeof img === 'number') throw new RbdError(img === -os.errno.ENOENT ? `image ${pool}/${name} does not exist` : `cannot open ${pool}/${name}: ${errnoName(-img)}`);
      this.image = img;
    } catch (e) {
      if (ioctx !== undefined) native.radosIoctxDestroy(ioctx);
      native.radosShutdown(cluster);
      throw e;
    }
    this.cluster = cluster;
    this.ioctx = ioctx;
    const size = native.rbdGetSize(this.image);
    this.files = { path: `rbd:${opts.spec}`, size, readonly: opts.readonly, fd: -1, directFd: -1, dsyncFd: -1, aio: 'rbd', nowait: false, rbd: this.image };
    this.io = new RbdIo(this.image);
  }

  private set(cluster: bigint, option: string, value: string): void {
    const rc = native.radosConfSet(cluster, option, value);
    if (rc < 0) throw new RbdError(`Ceph option ${option}=${value}: ${errnoName(-rc)}`);
  }

  get path(): string {
    return this.files.path;
  }

  get size(): number {
    return this.files.size;
  }

  get readonly(): boolean {
    return this.files.readonly;
  }

  get aio(): 'rbd' {
    return 'rbd';
  }

  get uringCounts(): undefined {
    return undefined;
  }

  currentSize(): number {
    const n = native.rbdGetSize(this.image);
    if (n < 0) throw new RbdError(`rbd_get_size: ${errnoName(-n)}`);
    return n;
  }

  /** Call onChange (on this loop) whenever the image header changes: `rbd resize` and the like. */
  watch(onChange: () => void): void {
    if (this.watchFd >= 0) return;
    const fd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    const h = native.rbdUpdateWatch(this.image, fd);
    if (typeof h === 'number') {
      native.close(fd);
      throw new RbdError(`rbd_update_watch: ${errnoName(-h)}`);
    }
    this.watchFd = fd;
    this.updateWatch = h;
    const scratch = new BigUint64Array(1);
    this.watchHandle = native.watch(fd, POLL_READABLE, () => {
      if (native.read(fd, scratch) > 0) onChange();
    });
  }

  /** After every queue stopped. */
  close(): void {
    if (this.updateWatch !== undefined) native.rbdUpdateUnwatch(this.image, this.updateWatch);
    if (this.watchHandle) native.unwatch(this.watchHandle);
    if (this.watchFd >= 0) native.close(this.watchFd);
    this.io.close();
    native.rbdClose(this.image);
    native.radosIoctxDestroy(this.ioctx);
    native.radosShutdown(this.cluster);
  }
}

/** iovecs a slot holds: seg_max (126) plus header, status and slack. A longer request brings its own. */
const IOV_SLOTS = 130;

/** Bytes of one {slot, result} record in the completion pipe. */
const RECORD = 8;
/** The pipe grows no further than Linux lets an unprivileged process (fs.pipe-max-size's default): 131072 records. */
const RBD_PIPE_MAX_BYTES = 1 << 20;

/** A request waiting for room in the pipe. */
interface Waiting {
  op: number;
  offset: number;
  iov: Uint8Array[] | undefined;
  length: number;
  expect: number;
  cb: (err: Error | null) => void;
}

/**
 * One thread's I/O on a shared image handle. Each request in flight holds a
 * numbered slot (its callback, what a read must return, and its iovec array,
 * all reused); librbd writes {slot, result} into this thread's pipe, and reap()
 * (called when the pipe is readable, and by busy-polling) finishes them here.
 * Nothing per request is allocated once the slots exist.
 *
 * librbd's thread cannot wait for room, so a record that met a full pipe
 * would be lost and its request would never finish. No more requests are
 * started than the pipe holds: past that the pipe doubles, up to
 * `pipeLimitBytes` (many queues on one thread outgrow the default 8192
 * records: 64 queues of 1024 hold 65536), and when it may not grow (the
 * limit, or the kernel's pipe-max-size and per-user pipe pages) requests
 * wait here, in order, for completions.
 */
export class RbdIo implements ImageIo {
  private readonly rfd: number;
  private readonly wfd: number;
  private readonly watchHandle: WatchHandle;
  private readonly cbs: (((err: Error | null) => void) | undefined)[] = [];
  private readonly expect: number[] = [];
  private readonly ops: number[] = [];
  /** Per slot: struct iovec words (base lo, base hi, len lo, len hi), and where they live. */
  private readonly iovWords: Uint32Array[] = [];
  private readonly iovAddr: number[] = [];
  private readonly oversized: (Uint32Array | undefined)[] = [];
  /** Per slot: the buffers librbd reads or writes, kept alive until it is done with them. */
  private readonly views: (Uint8Array[] | undefined)[] = [];
  private readonly freeSlots: number[] = [];
  private busy = 0;
  /** Records read from the pipe: slot (u32), result (i32). */
  private readonly done = new Int32Array(2 * 512);
  private readonly doneSlots = new Uint32Array(this.done.buffer);
  private closed = false;
  /** Records the pipe holds: the most requests in flight with librbd. */
  private capacity: number;
  /** Requests waiting for room, oldest at waitHead. */
  private readonly waiting: (Waiting | undefined)[] = [];
  private waitHead = 0;

  constructor(
    private readonly image: bigint,
    private readonly pipeLimitBytes = RBD_PIPE_MAX_BYTES,
  ) {
    [this.rfd, this.wfd] = native.pipe2(O_NONBLOCK | O_CLOEXEC);
    let bytes = native.fcntl(this.wfd, F_GETPIPE_SZ, 0);
    if (bytes > pipeLimitBytes) bytes = native.fcntl(this.wfd, F_SETPIPE_SZ, pipeLimitBytes);
    if (bytes < 0) throw new Error(`rbd completion pipe: ${errnoName(-bytes)}`);
    this.capacity = bytes / RECORD;
    this.watchHandle = native.watch(this.rfd, POLL_READABLE, () => this.reap());
  }

  /** Requests with librbd, and those waiting for room in the pipe. */
  get inFlight(): number {
    return this.busy + this.waiting.length - this.waitHead;
  }

  /** Records the completion pipe holds now. */
  get pipeRecords(): number {
    return this.capacity;
  }

  /** Whether one more request fits in the pipe, doubling it when it is full and may grow. */
  private room(): boolean {
    if (this.busy < this.capacity) return true;
    const want = 2 * this.capacity * RECORD;
    if (want > this.pipeLimitBytes) return false;
    const got = native.fcntl(this.wfd, F_SETPIPE_SZ, want);
    if (got < 0) return false;
    this.capacity = got / RECORD;
    return this.busy < this.capacity;
  }

  private slot(): number {
    const free = this.freeSlots.pop();
    if (free !== undefined) return free;
    const words = new Uint32Array(4 * IOV_SLOTS);
    this.iovWords.push(words);
    this.iovAddr.push(Number(native.address(words)));
    this.cbs.push(undefined);
    this.expect.push(-1);
    this.ops.push(0);
    this.oversized.push(undefined);
    this.views.push(undefined);
    return this.iovWords.length - 1;
  }

  private start(op: number, offset: number, iov: Uint8Array[] | undefined, length: number, expect: number, cb: (err: Error | null) => void): void {
    if (this.waitHead < this.waiting.length || !this.room()) {
      this.waiting.push({ op, offset, iov, length, expect, cb });
      return;
    }
    this.issue(op, offset, iov, length, expect, cb);
  }

  private issue(op: number, offset: number, iov: Uint8Array[] | undefined, length: number, expect: number, cb: (err: Error | null) => void): void {
    const slot = this.slot();
    const n = iov?.length ?? 0;
    let words = this.iovWords[slot]!;
    let at = this.iovAddr[slot]!;
    if (4 * n > words.length) {
      // More views than a slot holds (descriptors split at region or window edges): a one-off array, kept until completion.
      words = this.oversized[slot] = new Uint32Array(4 * n);
      at = Number(native.address(words));
    }
    for (let i = 0; i < n; i++) putIovec(words, i, iov![i]!, 0);
    const rc = native.rbdAio(op, this.image, this.wfd, slot, n ? at : 0, n, offset, length);
    if (rc < 0) {
      this.oversized[slot] = undefined;
      this.freeSlots.push(slot);
      const err = new Error(`rbd request failed to start: ${errnoName(-rc)}`);
      return microtask(() => cb(err));
    }
    this.cbs[slot] = cb;
    this.views[slot] = iov;
    this.expect[slot] = expect;
    this.ops[slot] = op;
    this.busy++;
  }

  read(position: number, iov: Uint8Array[], cb: (err: Error | null) => void): void {
    let total = 0;
    for (const v of iov) total += v.byteLength;
    this.start(RBD_OP_READV, position, iov, 0, total, cb);
  }

  /** `durable`: the write is followed by a flush before cb (librbd may cache it). */
  write(position: number, iov: Uint8Array[], durable: boolean, cb: (err: Error | null) => void): void {
    this.start(RBD_OP_WRITEV, position, iov, 0, -1, durable ? (e) => (e ? cb(e) : this.flush(cb)) : cb);
  }

  flush(cb: (err: Error | null) => void): void {
    this.start(RBD_OP_FLUSH, 0, undefined, 0, -1, cb);
  }

  discard(offset: number, length: number, cb: (err: Error | null) => void): void {
    this.start(RBD_OP_DISCARD, offset, undefined, length, -1, cb);
  }

  writeZeroes(offset: number, length: number, _unmap: boolean, durable: boolean, cb: (err: Error | null) => void): void {
    this.start(RBD_OP_WRITE_ZEROES, offset, undefined, length, -1, durable ? (e) => (e ? cb(e) : this.flush(cb)) : cb);
  }

  /** Finish every request librbd reported so far, then start those that waited for room. */
  reap(): void {
    if (this.closed) return;
    this.reapPipe();
    // An index, not shift(): tens of thousands may wait, and shift() moves them all each time.
    while (this.waitHead < this.waiting.length && this.busy < this.capacity) {
      const w = this.waiting[this.waitHead]!;
      this.waiting[this.waitHead++] = undefined;
      this.issue(w.op, w.offset, w.iov, w.length, w.expect, w.cb);
    }
    if (this.waitHead === this.waiting.length) {
      this.waiting.length = 0;
      this.waitHead = 0;
    }
  }

  private reapPipe(): void {
    for (;;) {
      const n = native.read(this.rfd, this.done);
      if (n === -EAGAIN || n <= 0) return;
      for (let i = 0; i < n / 8; i++) {
        const slot = this.doneSlots[2 * i]!;
        const rc = this.done[2 * i + 1]!;
        const cb = this.cbs[slot];
        if (!cb) continue; // not ours: nothing to finish
        this.cbs[slot] = undefined;
        this.views[slot] = undefined;
        this.oversized[slot] = undefined;
        this.freeSlots.push(slot);
        this.busy--;
        const expect = this.expect[slot]!;
        const err =
          rc < 0 ? new Error(`rbd ${OP_NAMES[this.ops[slot]!]} failed: ${errnoName(-rc)}`)
          : expect >= 0 && rc !== expect ? new Error(`rbd read returned ${rc} of ${expect} bytes`)
          : null;
        cb(err);
      }
      if (n < this.done.byteLength) return;
    }
  }

  /** Requests go to librbd as they are made; nothing is batched. */
  submit(): void {}

  get uringCounts(): undefined {
    return undefined;
  }

  /** Once nothing is in flight (the queues drained). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.unwatch(this.watchHandle);
    native.close(this.rfd);
    native.close(this.wfd);
  }
}

const OP_NAMES = ['read', 'write', 'flush', 'discard', 'write-zeroes'];

let threadRbd: RbdIo | undefined;

/** The RbdIo of the calling queue thread (one pipe per thread, on the image handle the daemon opened). */
export function threadRbdIo(image: bigint): RbdIo {
  return (threadRbd ??= new RbdIo(image));
}
