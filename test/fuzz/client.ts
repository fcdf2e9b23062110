// A lean vhost-user connection for the fuzzers. Unlike test/driver/frontend.ts
// (which polls every millisecond, on purpose leaning on as little native code
// as it can), this one is woken by native.watch() on the socket, so an input
// costs round trips of tens of microseconds instead of milliseconds.
import { native, EAGAIN, EINTR, POLL_READABLE, type WatchHandle } from '../../src/native/index.js';

const ENOENT = 2;
const ECONNREFUSED = 111;
const EPIPE = 32;
const ECONNRESET = 104;
const HDR = 12;

export interface Reply {
  request: number;
  flags: number;
  size: number;
  payload: Uint8Array;
  /** fds that came with it (a reply must carry none); already closed. */
  fds: number;
}

export type SendResult = 'ok' | 'closed';

export class RawConn {
  readonly replies: Reply[] = [];
  eof = false;
  eofReason = '';
  /** A reply the back-end framed impossibly (size > 4096). */
  garbage: string | undefined;
  private rx = new Uint8Array(4096);
  private rxLen = 0;
  private rxFds = 0;
  private watch: WatchHandle | undefined;
  private wake: (() => void) | undefined;
  private closed = false;
  private static readonly scratch = new Uint8Array(65536);
  private static readonly fdScratch = new Int32Array(8);

  private constructor(readonly fd: number) {
    this.watch = native.watch(fd, POLL_READABLE, () => this.onReadable());
  }

  /** Connect; undefined while the socket is absent or refusing (ENOENT, ECONNREFUSED, EAGAIN). */
  static tryConnect(path: string): RawConn | undefined {
    const fd = native.connect(path);
    if (fd >= 0) return new RawConn(fd);
    if (fd === -ENOENT || fd === -ECONNREFUSED || fd === -EAGAIN) return undefined;
    throw new Error(`connect ${path}: errno ${-fd}`);
  }

  private onReadable(): void {
    if (this.closed) return;
    for (;;) {
      const [n, nfds] = native.recvmsg(this.fd, RawConn.scratch, RawConn.fdScratch);
      for (let i = 0; i < nfds; i++) {
        native.close(RawConn.fdScratch[i]!);
        this.rxFds++;
      }
      if (n === -EAGAIN) break;
      if (n === -EINTR) continue;
      if (n <= 0) {
        this.markEof(n === 0 ? 'closed by the back-end' : `recvmsg errno ${-n}`);
        break;
      }
      if (this.rxLen + n > this.rx.length) {
        const bigger = new Uint8Array(Math.max(this.rx.length * 2, this.rxLen + n));
        bigger.set(this.rx.subarray(0, this.rxLen));
        this.rx = bigger;
      }
      this.rx.set(RawConn.scratch.subarray(0, n), this.rxLen);
      this.rxLen += n;
      this.parse();
    }
    this.notify();
  }

  /**
   * Split the bytes into replies. fds travel with the first byte of the sendmsg that carried them, and a
   * read stops after the segment holding them, so they belong to the last reply this read completed.
   */
  private parse(): void {
    const first = this.replies.length;
    let off = 0;
    while (this.rxLen - off >= HDR) {
      const dv = new DataView(this.rx.buffer, off, HDR);
      const size = dv.getUint32(8, true);
      if (size > 4096) {
        this.garbage ??= `back-end sent a header announcing ${size} payload bytes`;
        this.markEof('garbage from the back-end');
        this.rxLen = 0;
        return;
      }
      if (this.rxLen - off < HDR + size) break;
      this.replies.push({
        request: dv.getUint32(0, true),
        flags: dv.getUint32(4, true),
        size,
        payload: this.rx.slice(off + HDR, off + HDR + size),
        fds: 0,
      });
      off += HDR + size;
    }
    if (this.rxFds && this.replies.length > first) {
      this.replies[this.replies.length - 1]!.fds = this.rxFds;
      this.rxFds = 0;
    }
    if (off) {
      this.rx.copyWithin(0, off, this.rxLen);
      this.rxLen -= off;
    }
  }

  /** Take whatever the socket holds now, without waiting. */
  poll(): void {
    if (!this.eof && !this.closed) this.onReadable();
  }

  /** Bytes of a reply still incomplete when the connection ended. */
  get partialBytes(): number {
    return this.rxLen;
  }

  private markEof(reason: string): void {
    if (this.eof) return;
    this.eof = true;
    this.eofReason = reason;
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Send bytes (fds ride on the first byte). 'closed' if the back-end has gone. */
  async send(bytes: Uint8Array, fds: readonly number[] = [], timeoutMs = 5_000): Promise<SendResult> {
    if (this.closed) throw new Error('send on a closed RawConn');
    let off = 0;
    let first = true;
    let deadline = 0;
    while (off < bytes.length || (first && fds.length)) {
      const n = native.sendmsg(this.fd, bytes.subarray(off), first ? (fds as number[]) : []);
      if (n === -EAGAIN || n === -EINTR) {
        // The back-end always reads; a full buffer drains quickly unless it is hung.
        if (!deadline) deadline = Date.now() + timeoutMs;
        if (Date.now() > deadline) throw new Error(`back-end stopped reading: send blocked for ${timeoutMs} ms`);
        await new Promise((r) => setImmediate(r));
        continue;
      }
      if (n === -EPIPE || n === -ECONNRESET) return 'closed';
      if (n < 0) throw new Error(`sendmsg errno ${-n}`);
      off += n;
      first = false;
    }
    return 'ok';
  }

  /** Wait until pred() holds or the back-end closes; false on timeout. */
  async until(pred: () => boolean, timeoutMs: number): Promise<boolean> {
    if (pred() || this.eof) return true;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // A safety poll every 20 ms: the watcher is the fast path, not the only one.
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.wake = undefined;
          resolve();
        }, Math.min(left, 20));
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      if (!this.eof && !this.closed) this.onReadable();
      if (pred() || this.eof) return true;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    native.close(this.fd);
    this.notify();
  }
}

/** Frame a message (the size field defaults to the payload length). */
export function frame(request: number, flags: number, payload: Uint8Array, size = payload.length): Uint8Array {
  const out = new Uint8Array(HDR + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request >>> 0, true);
  dv.setUint32(4, flags >>> 0, true);
  dv.setUint32(8, size >>> 0, true);
  out.set(payload, HDR);
  return out;
}
