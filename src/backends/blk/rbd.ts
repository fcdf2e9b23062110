// A Ceph RBD image as a disk: librados/librbd through the native module
// (rbd.c, opened with dlopen). Requests go to librbd asynchronously with the
// guest's buffers as their iovecs, so data moves between RBD and guest memory
// without a copy through JS; each completion's address comes back through a
// pipe the calling thread's event loop watches, so nothing blocks a loop.
import { constants as os } from 'node:os';
import {
  native,
  EAGAIN,
  EFD_CLOEXEC,
  EFD_NONBLOCK,
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
    this.files = { path: `rbd:${opts.spec}`, size, readonly: opts.readonly, fd: -1, directFd: -1, dsyncFd: -1, aio: 'rbd', rbd: this.image };
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

interface Pending {
  cb: (err: Error | null) => void;
  /** Bytes a read must return. */
  expect: number;
  op: number;
  iov: BigUint64Array;
}

const IOV_SLOTS = 130; // seg_max (126) plus header, status and slack

/**
 * One thread's I/O on a shared image handle: librbd writes each finished
 * completion's address into this thread's pipe, and reap() (called when the
 * pipe is readable, and by busy-polling) finishes them on this thread.
 */
export class RbdIo implements ImageIo {
  private readonly rfd: number;
  private readonly wfd: number;
  private readonly watchHandle: WatchHandle;
  private readonly pending = new Map<bigint, Pending>();
  private readonly freeIov: BigUint64Array[] = [];
  private readonly done = new BigUint64Array(256);
  private closed = false;

  constructor(private readonly image: bigint) {
    [this.rfd, this.wfd] = native.pipe2(O_NONBLOCK | O_CLOEXEC);
    this.watchHandle = native.watch(this.rfd, POLL_READABLE, () => this.reap());
  }

  get inFlight(): number {
    return this.pending.size;
  }

  private start(op: number, offset: number, iov: Uint8Array[] | undefined, length: number, expect: number, cb: (err: Error | null) => void): void {
    let vec = this.freeIov.pop() ?? new BigUint64Array(2 * IOV_SLOTS);
    const n = iov?.length ?? 0;
    if (2 * n > vec.length) vec = new BigUint64Array(2 * n);
    for (let i = 0; i < n; i++) {
      vec[2 * i] = native.address(iov![i]!);
      vec[2 * i + 1] = BigInt(iov![i]!.byteLength);
    }
    const c = native.rbdAio(op, this.image, this.wfd, native.address(vec), n, offset, length);
    if (typeof c === 'number') {
      this.freeIov.push(vec);
      const err = new Error(`rbd request failed to start: ${errnoName(-c)}`);
      return queueMicrotask(() => cb(err));
    }
    this.pending.set(c, { cb, expect, op, iov: vec });
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

  /** Finish every completion librbd reported so far. */
  reap(): void {
    if (this.closed) return;
    for (;;) {
      const n = native.read(this.rfd, this.done);
      if (n === -EAGAIN || n <= 0) return;
      for (let i = 0; i < n / 8; i++) {
        const c = this.done[i]!;
        const p = this.pending.get(c);
        const rc = native.rbdAioFinish(c);
        if (!p) continue;
        this.pending.delete(c);
        this.freeIov.push(p.iov);
        const err =
          rc < 0 ? new Error(`rbd ${OP_NAMES[p.op]} failed: ${errnoName(-rc)}`)
          : p.expect >= 0 && rc !== p.expect ? new Error(`rbd read returned ${rc} of ${p.expect} bytes`)
          : null;
        p.cb(err);
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
