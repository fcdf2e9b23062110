// The dirty page log of live migration (vhost-user "Migration", LOG_SHMFD):
// one bit per 4 KiB page of guest physical memory, bit (page % 8) of byte
// (page / 8), in memory shared with the front-end, which collects and clears
// it while the guest runs. A page vhostd writes and does not mark here reaches
// the destination stale, so the ring layer marks every write it or a device
// makes into guest memory, after the write and before the used index that
// tells the guest about it. Marks are atomic ORs: the front-end clears bits
// concurrently, and queue threads mark the same bytes.
import { fstatSync } from 'node:fs';
import { MAX_LOG_BYTES } from '../limits.js';
import { native, PROT_READ, PROT_WRITE } from '../native/index.js';

export const LOG_PAGE = 4096;

/** Where the daemon mapped the log, so a queue thread can view it (never map it again). */
export interface SharedLog {
  address: bigint;
  length: number;
  /** Changes with every new log: a thread keeps one view per version. */
  version: number;
  /** SET_LOG_FD's eventfd (borrowed; -1 for none): written after a batch of marks. */
  kick: number;
}

export class LogError extends Error {}

export class DirtyLog {
  /** Marks that fell past the end of the log (a front-end that sized it too small): counted, never written. */
  outside = 0;
  /** Set by every mark; the executor clears it when it kicks the log fd. */
  dirtied = false;

  constructor(
    private readonly bits: Uint8Array,
    /** SET_LOG_FD's eventfd (borrowed), or -1. */
    public kick = -1,
  ) {}

  get pages(): number {
    return this.bits.length * 8;
  }

  /** Mark the pages of [gpa, gpa + len). */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    this.dirtied = true;
    let page = Math.floor(gpa / LOG_PAGE);
    const last = Math.floor((gpa + len - 1) / LOG_PAGE);
    const end = Math.min(last, this.pages - 1);
    if (last > end) this.outside++;
    const bits = this.bits;
    while (page <= end) {
      const byte = Math.floor(page / 8);
      const from = page - byte * 8;
      const to = Math.min(7, end - byte * 8);
      Atomics.or(bits, byte, (0xff << from) & (0xff >> (7 - to)));
      page = byte * 8 + 8;
    }
  }
}

let versions = 0;

/**
 * SET_LOG_BASE's area, mapped once by the daemon; queue threads view the same
 * mapping. Closed (views detached, then unmapped) only after every executor
 * that marked it let go of it.
 */
export class LogArea {
  readonly log: DirtyLog;
  readonly shared: SharedLog;
  private readonly buffer: ArrayBuffer;
  private closed = false;

  /** Takes ownership of fd (closed once mapped, or on failure); `kick` is borrowed. */
  constructor(fd: number, size: bigint, offset: bigint, kick: number) {
    try {
      if (size === 0n || size > BigInt(MAX_LOG_BYTES)) throw new LogError(`log size ${size} is outside 1..${MAX_LOG_BYTES} bytes`);
      if (offset % 4096n || offset > 1n << 40n) throw new LogError(`log mmap offset ${offset} is not a page-aligned offset below 1 TiB`);
      let st;
      try {
        st = fstatSync(fd);
      } catch {
        throw new LogError(`log fd ${fd} is not a valid file descriptor`);
      }
      // A mapping past the end of its file raises SIGBUS on the first mark there.
      if (!st.isFile() || BigInt(st.size) < offset + size) {
        throw new LogError(`log fd holds ${st.size} bytes, the log needs ${offset + size}`);
      }
      const length = Number(size);
      let address: bigint;
      try {
        address = native.mmap(fd, length, offset, PROT_READ | PROT_WRITE);
      } catch (e) {
        throw new LogError(`cannot map the dirty log: ${(e as Error).message}`);
      }
      this.buffer = native.view(address, length);
      this.shared = { address, length, version: ++versions, kick };
      this.log = new DirtyLog(new Uint8Array(this.buffer), kick);
    } finally {
      native.close(fd);
    }
  }

  /** A new SET_LOG_FD eventfd (the queues pick it up when they are told of this log again). */
  setKick(fd: number): void {
    this.shared.kick = fd;
    this.log.kick = fd;
  }

  /** Bytes of guest memory the log covers. */
  get covers(): number {
    return this.log.pages * LOG_PAGE;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.detach(this.buffer);
    native.munmap(this.shared.address, this.shared.length);
  }
}
