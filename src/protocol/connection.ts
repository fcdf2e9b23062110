// One vhost-user front-end connection: reads messages (with their fds) off the
// socket, checks each against its entry in requests.ts, runs its handler
// (handlers.ts) and closes the connection on any protocol violation.
//
// Messages are handled strictly one at a time. A handler that has to wait
// (GET_VRING_BASE draining requests in flight, a queue thread answering)
// pauses the socket watcher until it settles, so a front-end that keeps
// writing meanwhile fills its own socket buffer, never our memory: what we
// hold from the socket is at most the one message being read or handled
// (12 + MAX_PAYLOAD bytes, MAX_FDS fds). Messages that need no wait run
// synchronously, so a pipelined burst (QEMU sends queue setup without
// need_reply) is applied in order as fast as it is read. Replies get the same
// rule: one the socket cannot take now waits in a small outbox, and nothing
// more is read until the front-end has read it.
import type { Logger } from 'pino';
import { DeviceError, type Device } from '../device.js';
import { native, EAGAIN, EINTR, POLL_READABLE, POLL_WRITABLE, type WatchHandle } from '../native/index.js';
import { MemoryError } from '../ring/guest-memory.js';
import { InflightError } from '../ring/inflight.js';
import type { Placement } from '../ring/placement.js';
import { RingError } from '../ring/ring.js';
import { Handlers, type Replies } from './handlers.js';
import {
  bit,
  decodeHeader,
  encodeMessage,
  encodeU64,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  MAX_FDS,
  MAX_PAYLOAD,
  ProtocolError,
  ProtocolFeature,
  requestName,
  VERSION,
} from './messages.js';
import { checkMessage, type Message } from './requests.js';


const isViolation = (e: unknown): e is Error =>
  e instanceof ProtocolError || e instanceof MemoryError || e instanceof RingError || e instanceof InflightError || e instanceof DeviceError;

export class Connection implements Replies {
  private readonly h: Handlers;
  private watch: WatchHandle | undefined;
  private readonly header = new Uint8Array(HEADER_SIZE);
  private readonly fdScratch = new Int32Array(MAX_FDS);
  private reading: { buf: Uint8Array; got: number; fds: number[]; header?: { request: number; flags: number } };
  /** A handler is waiting on a promise; the socket is not read meanwhile. */
  private waiting = false;
  /**
   * Reply bytes the socket would not take yet (with dup'd fds for the first
   * piece). Nothing is read while it holds anything, so it holds at most the
   * replies to the message being handled.
   */
  private outbox: { request: number; bytes: Uint8Array; fds: number[] }[] = [];
  private isClosed = false;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;
  readonly log: Logger;

  constructor(
    private readonly fd: number,
    device: Device,
    placement: Placement,
    log: Logger,
  ) {
    this.log = log;
    this.h = new Handlers(device, placement, this, log);
    this.reading = { buf: this.header, got: 0, fds: [] };
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
    this.watch = native.watch(fd, POLL_READABLE, (status, events) => this.onReady(status, events));
  }

  /** Resolves once the connection is gone and all its resources are released. */
  get done(): Promise<void> {
    return this.closedPromise;
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** Each virtqueue's lifecycle state, for status lines. */
  queueStates(): string[] {
    return this.h.vrings.map((v) => v.state);
  }

  /** Each virtqueue as the front-end configured it, for stats. */
  queueInfo(): { index: number; state: string; size: number; enabled: boolean; failed?: string }[] {
    return this.h.vrings.map((v) => ({ index: v.index, state: v.state, size: v.size, enabled: v.enabled, ...(v.failed && { failed: v.failed }) }));
  }

  get protocolFeatures(): bigint {
    return this.h.protocolFeatures;
  }

  get features(): bigint {
    return this.h.features;
  }

  private onReady(status: number, events: number): void {
    if (status < 0) {
      // The socket is in error (a peer that hung up with our replies unread resets it), and libuv
      // has stopped watching it: nothing more will come, so go now, whatever we were waiting for.
      this.log.info({ errno: -status }, 'front-end connection reset');
      void this.close();
      return;
    }
    if (events & POLL_WRITABLE) {
      try {
        this.flush();
      } catch (e) {
        return this.fatal(e);
      }
      this.updateEvents();
    }
    if (events & POLL_READABLE) this.onReadable();
  }

  /** Read while nothing holds us back: no handler waiting, no reply waiting to go out. */
  private get canRead(): boolean {
    return !this.isClosed && !this.waiting && this.outbox.length === 0;
  }

  /** Watch for exactly what can be acted on: replies to flush, else messages to read. */
  private updateEvents(): void {
    if (this.isClosed || !this.watch) return;
    native.setEvents(this.watch, this.outbox.length ? POLL_WRITABLE : this.waiting ? 0 : POLL_READABLE);
  }

  private onReadable(): void {
    try {
      while (this.canRead) {
        const msg = this.readMessage();
        if (!msg) return;
        this.run(msg);
      }
    } catch (e) {
      this.fatal(e);
    }
  }

  /** The next whole message, or undefined when the socket has no more for now (or closed). */
  private readMessage(): Message | undefined {
    for (;;) {
      const r = this.reading;
      const [n, nfds, trunc] = native.recvmsg(this.fd, r.buf.subarray(r.got), this.fdScratch);
      for (let i = 0; i < nfds; i++) r.fds.push(this.fdScratch[i]!);
      if (n === -EAGAIN) return undefined;
      if (n === -EINTR) continue;
      if (n < 0) throw new ProtocolError(`socket read failed: errno ${-n}`);
      if (trunc) throw new ProtocolError('message carried more than 8 fds');
      if (n === 0) {
        if (r.got > 0 || r.header) throw new ProtocolError('front-end closed the socket in the middle of a message');
        this.log.info('front-end disconnected');
        void this.close();
        return undefined;
      }
      r.got += n;
      if (r.got < r.buf.length) continue;
      if (!r.header) {
        const h = decodeHeader(this.header);
        if ((h.flags & ~FLAG_NEED_REPLY) !== VERSION) {
          throw new ProtocolError(`${requestName(h.request)}: bad flags 0x${h.flags.toString(16)} (version must be 1, no reply bit)`);
        }
        if (h.size > MAX_PAYLOAD) throw new ProtocolError(`${requestName(h.request)}: payload size ${h.size} is too large`);
        r.header = { request: h.request, flags: h.flags };
        r.buf = new Uint8Array(h.size);
        r.got = 0;
        if (h.size > 0) continue;
      }
      const msg = { request: r.header.request, flags: r.header.flags, payload: r.buf, fds: r.fds };
      this.reading = { buf: this.header, got: 0, fds: [] };
      return msg;
    }
  }

  /** Check and handle one message; a handler that returns a promise pauses reading until it settles. */
  private run(msg: Message): void {
    let result: void | Promise<void>;
    try {
      this.log.debug({ request: requestName(msg.request), size: msg.payload.length, fds: msg.fds.length }, 'message');
      result = checkMessage(msg, this.h.ackedProtocol).handle(this.h, msg);
    } catch (e) {
      this.release(msg);
      throw named(e, msg);
    }
    if (!(result instanceof Promise)) {
      this.release(msg);
      return;
    }
    this.pause();
    result.then(
      () => {
        this.release(msg);
        this.resume();
      },
      (e: unknown) => {
        this.release(msg);
        this.fatal(named(e, msg));
      },
    );
  }

  /** Fds the handler did not take. */
  private release(msg: Message): void {
    for (const fd of msg.fds.splice(0)) native.close(fd);
  }

  private pause(): void {
    this.waiting = true;
    this.updateEvents();
  }

  private resume(): void {
    this.waiting = false;
    this.updateEvents();
    this.onReadable(); // whatever arrived meanwhile, without waiting a loop turn
  }

  private fatal(e: unknown): void {
    if (this.isClosed) return; // ConnectionClosed included
    if (isViolation(e)) this.log.error({ reason: e.message }, 'closing connection: protocol violation');
    else this.log.error({ err: e }, 'closing connection: internal error');
    void this.close();
  }

  /** Send a reply; what the socket cannot take now goes out when it is writable, before anything more is read. */
  send(request: number, payload: Uint8Array, fds: number[] = []): void {
    // A handler that waited (for a drain) may finish after a disconnect: its fd number may be reused by now.
    if (this.isClosed) return;
    const bytes = encodeMessage(request, VERSION | FLAG_REPLY, payload);
    if (this.outbox.length === 0) {
      const n = this.sendNow(bytes, fds, request);
      if (n === bytes.length) return;
      if (n > 0) {
        // The fds went with the first byte.
        this.outbox.push({ request, bytes: bytes.subarray(n), fds: [] });
        this.updateEvents();
        return;
      }
    }
    // The caller closes its fds after this returns: keep copies until they are sent.
    const copies: number[] = [];
    for (const fd of fds) {
      const d = native.dup(fd);
      if (d < 0) {
        for (const c of copies) native.close(c);
        throw new Error(`cannot keep an fd for the ${requestName(request)} reply: errno ${-d}`);
      }
      copies.push(d);
    }
    this.outbox.push({ request, bytes, fds: copies });
    this.updateEvents();
  }

  /** Bytes sent (0 when the socket is full); throws on a real error. */
  private sendNow(bytes: Uint8Array, fds: number[], request: number): number {
    for (;;) {
      const n = native.sendmsg(this.fd, bytes, fds);
      if (n >= 0) return n;
      if (n === -EINTR) continue;
      if (n === -EAGAIN) return 0;
      throw new ProtocolError(`cannot send ${requestName(request)} reply: errno ${-n}`);
    }
  }

  /** Send what the outbox holds, as far as the socket takes it. */
  private flush(): void {
    while (this.outbox.length) {
      const head = this.outbox[0]!;
      const n = this.sendNow(head.bytes, head.fds, head.request);
      if (n === 0) return;
      for (const fd of head.fds) native.close(fd);
      head.fds = [];
      if (n < head.bytes.length) {
        head.bytes = head.bytes.subarray(n);
        return;
      }
      this.outbox.shift();
    }
  }

  ack(msg: Message, ok: boolean): void {
    if (msg.flags & FLAG_NEED_REPLY && this.h.ackedProtocol & bit(ProtocolFeature.REPLY_ACK)) {
      this.send(msg.request, encodeU64(ok ? 0n : 1n));
    }
  }

  /**
   * Tear down: stop the rings, wait for I/O into guest memory to finish,
   * unmap it and close every fd. Safe to call more than once.
   */
  async close(): Promise<void> {
    if (this.isClosed) return this.closedPromise;
    this.isClosed = true;
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    for (const m of this.outbox.splice(0)) for (const fd of m.fds) native.close(fd);
    for (const fd of this.reading.fds) native.close(fd);
    this.reading.fds = [];
    await this.h.teardown();
    native.close(this.fd);
    this.resolveClosed();
  }
}

/** Violations name the request they were found in (memory and ring errors do not by themselves). */
function named(e: unknown, msg: Message): unknown {
  const name = requestName(msg.request);
  if (isViolation(e) && !e.message.startsWith(name)) e.message = `${name}: ${e.message}`;
  return e;
}
