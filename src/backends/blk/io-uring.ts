// Image I/O through io_uring, driven from TypeScript. The native module only
// makes the three syscalls; the submission and completion rings are mapped
// here and read and written with Atomics, as liburing does in C.
//
// One ring serves every queue of the thread that opened it. Requests queue
// SQEs as they are parsed and one io_uring_enter submits the batch (at the end
// of the queue's run, or from a microtask at the latest). Reads served from the
// page cache complete inside that call and are reaped right after it, with the
// ring's eventfd switched off meanwhile, so they cost no wakeup; requests that
// go asynchronous (io-wq, a real device) signal the eventfd, which the loop
// watches. Nothing here blocks: io_uring_enter never waits for I/O.
import { native, POLL_READABLE, PROT_READ, PROT_WRITE, EFD_CLOEXEC, EFD_NONBLOCK, EINTR, type WatchHandle } from '../../native/index.js';
import { MAX_CHAIN_SEGMENTS } from '../../limits.js';
import { putIovec } from './iovec.js';
import { microtask } from '../../microtask.js';

const PARAMS_BYTES = 120;
const SQE_BYTES = 64;
const CQE_BYTES = 16;
/** With single mmap the SQ and CQ rings share one mapping (the CQ ring offset goes unused). */
const OFF_SQ_RING = 0;
const OFF_SQES = 0x10000000;
const FEAT_SINGLE_MMAP = 1 << 0;
const FEAT_NODROP = 1 << 1;
/** The kernel copies iovecs when it takes an SQE, so they need outlive only io_uring_enter. */
const FEAT_SUBMIT_STABLE = 1 << 2;
const SETUP_CQSIZE = 1 << 3;
const SETUP_CLAMP = 1 << 4;
const REGISTER_EVENTFD = 4;
const ENTER_GETEVENTS = 1;
const CQ_EVENTFD_DISABLED = 1;
const SQ_CQ_OVERFLOW = 1 << 1;
const OP_READV = 1;
const OP_WRITEV = 2;
const OP_FSYNC = 3;
const FSYNC_DATASYNC = 1;
const RWF_DSYNC = 2;
const SQE_ASYNC = 1 << 4;
/**
 * SQEs of a batch that io_uring_enter may serve inline, on a file system that
 * cannot serve cached I/O without blocking (tmpfs: no RWF_NOWAIT, so io_uring
 * would hand each SQE to its workers one after another). The first goes inline
 * (QD 1 completes inside the call); the rest go to io-wq at once, which copies on
 * the other cores in parallel: on 2 cores, 4k random reads from tmpfs at QD 128,
 * 1.5-1.75x the IOPS at half the CPU per I/O of all-inline. Where the file system
 * has RWF_NOWAIT (ext4, xfs, block devices) every SQE goes inline: a cached 4k
 * read is then a copy inside the call, and punting it costs a thread wake-up
 * (ext4, QD 32: inline 1.54x the IOPS at 0.36x the CPU per I/O).
 */
const INLINE_PER_BATCH = 1;
const EAGAIN = 11;
const EBUSY = 16;

/** iovecs staged for one submission; any one request fits (chains are bounded by MAX_CHAIN_SEGMENTS). */
const IOV_ARENA = 4 * MAX_CHAIN_SEGMENTS;
const TWO32 = 2 ** 32;

/** All bytes moved, or why not. */
export type IoDone = (err: Error | null) => void;

interface Op {
  code: number;
  fd: number;
  position: number;
  iov: readonly Uint8Array[];
  /** Bytes the request moves in all, and how many have moved. */
  total: number;
  moved: number;
  dsync: boolean;
  /** The file serves cached I/O without blocking (RWF_NOWAIT): never punt to io-wq. */
  inline: boolean;
  cb: IoDone | undefined;
}

export class IoUring {
  private readonly sqHead: Uint32Array;
  private readonly sqTail: Uint32Array;
  private readonly sqFlags: Uint32Array;
  private readonly sqMask: number;
  private readonly cqHead: Uint32Array;
  private readonly cqTail: Uint32Array;
  private readonly cqFlags: Uint32Array | undefined;
  private readonly cqMask: number;
  private readonly cqes: Int32Array;
  private readonly sqes: Uint32Array;
  private readonly sqeBytes: Uint8Array;
  private readonly iovWords: Uint32Array;
  private readonly iovBase: number;
  private iovUsed = 0;
  /** Our tail: SQEs written but not yet handed to the kernel lie between its head and this. */
  private tail: number;
  private readonly ops: Op[] = [];
  private readonly free: number[] = [];
  private readonly eventfd: number;
  private readonly watcher: WatchHandle;
  private readonly counter = new BigUint64Array(1);
  private readonly maps: { address: bigint; length: number; buffer: ArrayBuffer }[] = [];
  private flushQueued = false;
  private closed = false;
  private readonly flushSoon = (): void => {
    this.flushQueued = false;
    this.submit();
  };
  /** Ops submitted and not yet completed. */
  inFlight = 0;
  /** Submissions made (io_uring_enter calls that handed over SQEs) and SQEs submitted. */
  submits = 0;
  submitted = 0;

  /** A ring of `entries` SQEs, or why io_uring cannot be used here (old kernel, seccomp, sysctl). */
  static open(entries: number): IoUring | string {
    const params = new Uint8Array(PARAMS_BYTES);
    const p = new Uint32Array(params.buffer);
    p[1] = 2 * entries; // cq_entries: room for every op in flight, with no overflow
    p[2] = SETUP_CQSIZE | SETUP_CLAMP;
    const fd = native.ioUringSetup(entries, params);
    if (fd < 0) return `io_uring_setup failed: errno ${-fd}`;
    const need = FEAT_SINGLE_MMAP | FEAT_NODROP | FEAT_SUBMIT_STABLE;
    if ((p[5]! & need) !== need) {
      native.close(fd);
      return `this kernel's io_uring lacks single mmap, nodrop or stable submits (features 0x${p[5]!.toString(16)})`;
    }
    try {
      return new IoUring(fd, p);
    } catch (e) {
      native.close(fd);
      return `io_uring setup failed: ${(e as Error).message}`;
    }
  }

  private constructor(
    private readonly fd: number,
    p: Uint32Array,
  ) {
    const sqEntries = p[0]!;
    const cqEntries = p[1]!;
    // sq_off at byte 40, cq_off at byte 80 (u32 fields).
    const sq = (i: number): number => p[10 + i]!;
    const cq = (i: number): number => p[20 + i]!;
    const ringBytes = Math.max(sq(6) + 4 * sqEntries, cq(5) + CQE_BYTES * cqEntries);
    const ring = this.map(OFF_SQ_RING, ringBytes);
    const u32 = (off: number, n = 1): Uint32Array => new Uint32Array(ring, off, n);
    this.sqHead = u32(sq(0));
    this.sqTail = u32(sq(1));
    this.sqMask = u32(sq(2))[0]!;
    this.sqFlags = u32(sq(4));
    const array = u32(sq(6), sqEntries);
    for (let i = 0; i < sqEntries; i++) array[i] = i;
    this.cqHead = u32(cq(0));
    this.cqTail = u32(cq(1));
    this.cqMask = u32(cq(2))[0]!;
    this.cqFlags = cq(6) ? u32(cq(6)) : undefined;
    this.cqes = new Int32Array(ring, cq(5), (CQE_BYTES / 4) * cqEntries);
    const sqes = this.map(OFF_SQES, SQE_BYTES * sqEntries);
    this.sqes = new Uint32Array(sqes);
    this.sqeBytes = new Uint8Array(sqes);
    this.tail = Atomics.load(this.sqTail, 0);
    // The iovec arena must stay put while the kernel reads it: an ArrayBuffer's store never moves.
    const iov = new ArrayBuffer(16 * IOV_ARENA);
    this.iovWords = new Uint32Array(iov);
    this.iovBase = Number(native.address(this.iovWords));
    for (let i = Math.min(sqEntries, cqEntries / 2) - 1; i >= 0; i--) {
      this.ops.push({ code: 0, fd: -1, position: 0, iov: [], total: 0, moved: 0, dsync: false, inline: false, cb: undefined });
      this.free.push(i);
    }
    this.eventfd = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    const rc = native.ioUringRegister(fd, REGISTER_EVENTFD, new Int32Array([this.eventfd]), 1);
    if (rc < 0) {
      native.close(this.eventfd);
      this.unmap();
      throw new Error(`registering the eventfd failed: errno ${-rc}`);
    }
    this.watcher = native.watch(this.eventfd, POLL_READABLE, () => {
      native.read(this.eventfd, this.counter);
      this.reap();
    });
  }

  private map(offset: number, length: number): ArrayBuffer {
    const address = native.mmap(this.fd, length, offset, PROT_READ | PROT_WRITE);
    const buffer = native.view(address, length);
    this.maps.push({ address, length, buffer });
    return buffer;
  }

  private unmap(): void {
    for (const m of this.maps) {
      native.detach(m.buffer);
      native.munmap(m.address, m.length);
    }
    this.maps.length = 0;
  }

  /** Whether another op can be taken now; when not, the caller uses its fallback. */
  get full(): boolean {
    return this.free.length === 0 || this.closed;
  }

  /**
   * Read iov.length views from fd at position; false (nothing queued) when the ring is full.
   * `inline`: the file system serves cached I/O without blocking (see INLINE_PER_BATCH).
   */
  readv(fd: number, position: number, iov: readonly Uint8Array[], inline: boolean, cb: IoDone): boolean {
    return this.start(OP_READV, fd, position, iov, false, inline, cb);
  }

  /** Write; with `dsync` the data is on stable storage when cb runs (RWF_DSYNC). */
  writev(fd: number, position: number, iov: readonly Uint8Array[], dsync: boolean, inline: boolean, cb: IoDone): boolean {
    return this.start(OP_WRITEV, fd, position, iov, dsync, inline, cb);
  }

  fdatasync(fd: number, cb: IoDone): boolean {
    return this.start(OP_FSYNC, fd, 0, [], false, false, cb);
  }

  private start(code: number, fd: number, position: number, iov: readonly Uint8Array[], dsync: boolean, inline: boolean, cb: IoDone): boolean {
    if (this.full || iov.length > MAX_CHAIN_SEGMENTS) return false;
    let total = 0;
    for (let i = 0; i < iov.length; i++) total += iov[i]!.byteLength;
    const slot = this.free.pop()!;
    const op = this.ops[slot]!;
    op.code = code;
    op.fd = fd;
    op.position = position;
    op.iov = iov;
    op.total = total;
    op.moved = 0;
    op.dsync = dsync;
    op.inline = inline;
    op.cb = cb;
    this.inFlight++;
    this.queue(slot, op);
    return true;
  }

  /** Write the SQE for what is left of an op. */
  private queue(slot: number, op: Op): void {
    // Room for the iovecs and an SQE, submitting what is staged first if need be.
    if (this.iovUsed + op.iov.length > IOV_ARENA || ((this.tail - Atomics.load(this.sqHead, 0)) >>> 0) > this.sqMask) this.submit();
    const e = (this.tail & this.sqMask) * (SQE_BYTES / 4);
    const w = this.sqes;
    this.sqeBytes.fill(0, e * 4, e * 4 + SQE_BYTES);
    // Past the first INLINE_PER_BATCH of a batch, IOSQE_ASYNC where the file would block (see there).
    const staged = (this.tail - Atomics.load(this.sqHead, 0)) >>> 0;
    w[e] = op.code | (!op.inline && staged >= INLINE_PER_BATCH ? SQE_ASYNC << 8 : 0); // opcode, flags; ioprio 0
    w[e + 1] = op.fd;
    w[e + 2] = (op.position + op.moved) % TWO32;
    w[e + 3] = Math.floor((op.position + op.moved) / TWO32);
    if (op.code === OP_FSYNC) {
      w[e + 7] = FSYNC_DATASYNC;
    } else {
      const first = this.iovUsed;
      const n = this.stage(op);
      const at = this.iovBase + 16 * first;
      w[e + 4] = at % TWO32;
      w[e + 5] = Math.floor(at / TWO32);
      w[e + 6] = n;
      w[e + 7] = op.dsync ? RWF_DSYNC : 0;
    }
    w[e + 8] = slot; // user_data
    this.tail = (this.tail + 1) >>> 0;
    Atomics.store(this.sqTail, 0, this.tail);
    if (!this.flushQueued) {
      this.flushQueued = true;
      microtask(this.flushSoon);
    }
  }

  /** Copy the op's remaining views into the arena as iovecs; returns how many. */
  private stage(op: Op): number {
    let skip = op.moved;
    let n = 0;
    const words = this.iovWords;
    for (let i = 0; i < op.iov.length; i++) {
      const v = op.iov[i]!;
      if (skip >= v.byteLength) {
        skip -= v.byteLength;
        continue;
      }
      putIovec(words, this.iovUsed + n, v, skip);
      skip = 0;
      n++;
    }
    this.iovUsed += n;
    return n;
  }

  /** Hand every staged SQE to the kernel, then reap what completed meanwhile. */
  submit(): void {
    if (this.closed) return;
    let pending = (this.tail - Atomics.load(this.sqHead, 0)) >>> 0;
    if (pending === 0) return;
    // Completions during the call are reaped below; they need no eventfd wakeup.
    if (this.cqFlags) Atomics.or(this.cqFlags, 0, CQ_EVENTFD_DISABLED);
    for (let tries = 0; pending > 0 && tries < 8; tries++) {
      const rc = native.ioUringEnter(this.fd, pending, 0, 0);
      if (rc === -EINTR) continue;
      if (rc === -EAGAIN || rc === -EBUSY) {
        // The kernel is short of memory or has completions to hand over first.
        this.reapNow();
        continue;
      }
      if (rc < 0) {
        this.abandonStaged(rc);
        break;
      }
      this.submits++;
      this.submitted += rc;
      pending = (this.tail - Atomics.load(this.sqHead, 0)) >>> 0;
    }
    if (pending === 0) this.iovUsed = 0;
    else if (!this.flushQueued) {
      this.flushQueued = true;
      setImmediate(this.flushSoon);
    }
    if (this.cqFlags) Atomics.and(this.cqFlags, 0, ~CQ_EVENTFD_DISABLED);
    this.reap();
  }

  /** io_uring_enter refused the SQEs outright: take them back and fail their ops. */
  private abandonStaged(rc: number): void {
    const head = Atomics.load(this.sqHead, 0);
    for (let t = head; t !== this.tail; t = (t + 1) >>> 0) {
      const slot = this.sqes[(t & this.sqMask) * (SQE_BYTES / 4) + 8]!;
      microtask(() => this.finish(slot, rc));
    }
    this.tail = head;
    Atomics.store(this.sqTail, 0, head);
    this.iovUsed = 0;
  }

  private reapNow(): void {
    if (this.cqFlags) Atomics.and(this.cqFlags, 0, ~CQ_EVENTFD_DISABLED);
    this.reap();
    if (this.cqFlags) Atomics.or(this.cqFlags, 0, CQ_EVENTFD_DISABLED);
  }

  /** Complete every posted CQE. */
  reap(): void {
    for (let rounds = 0; rounds < 2; rounds++) {
      // The head is re-read each time: a callback may reap too (a short transfer re-queued into a full arena submits).
      for (let head = Atomics.load(this.cqHead, 0); head !== Atomics.load(this.cqTail, 0); head = Atomics.load(this.cqHead, 0)) {
        const c = (head & this.cqMask) * (CQE_BYTES / 4);
        const slot = this.cqes[c]!;
        const res = this.cqes[c + 2]!;
        Atomics.store(this.cqHead, 0, (head + 1) >>> 0);
        this.finish(slot, res);
      }
      // Overflowed completions (NODROP) are flushed into the ring by entering with GETEVENTS.
      if (!(Atomics.load(this.sqFlags, 0) & SQ_CQ_OVERFLOW)) return;
      native.ioUringEnter(this.fd, 0, 0, ENTER_GETEVENTS);
    }
  }

  private finish(slot: number, res: number): void {
    const op = this.ops[slot];
    if (!op || !op.cb) return;
    if (res >= 0 && op.code !== OP_FSYNC) {
      op.moved += res;
      if (op.moved < op.total) {
        if (res > 0 && !this.closed) return this.queue(slot, op); // short: go on from where it stopped
        return this.done(slot, op, new Error(`short ${op.code === OP_READV ? 'read' : 'write'} at byte ${op.position + op.moved} (end of image?)`));
      }
    }
    this.done(slot, op, res < 0 ? ioError(op.code, -res) : null);
  }

  private done(slot: number, op: Op, err: Error | null): void {
    const cb = op.cb!;
    op.cb = undefined;
    op.iov = [];
    this.inFlight--;
    this.free.push(slot);
    cb(err);
  }

  /** Stop watching and release the ring. Ops still in flight are failed first. */
  close(): void {
    if (this.closed) return;
    this.submit();
    this.closed = true;
    native.unwatch(this.watcher);
    native.close(this.eventfd);
    native.close(this.fd); // the kernel cancels what is left in flight
    this.unmap();
    for (let slot = 0; slot < this.ops.length; slot++) {
      const op = this.ops[slot]!;
      if (op.cb) this.done(slot, op, new Error('image closed with I/O in flight'));
    }
  }
}

function ioError(code: number, errno: number): Error {
  const what = code === OP_READV ? 'read' : code === OP_WRITEV ? 'write' : 'fdatasync';
  const e = new Error(`${what} failed: errno ${errno}`) as NodeJS.ErrnoException;
  e.errno = errno;
  return e;
}
