// A vhost-user front-end (the QEMU side) for protocol tests: one Unix socket
// connection, messages with real fds, replies read with a timeout so a silent
// back-end fails a test instead of hanging it.
//
// Replies are read by polling a non-blocking socket, not with native.watch():
// the driver leans on as little of the code under test as it can, and a
// watcher bug (there was a use-after-free in unwatch) would otherwise take the
// test process down with the daemon.
import { native, EAGAIN, EINTR } from '../../src/native/index.js';
import {
  bit,
  configMsg,
  F_NEED_REPLY,
  frame,
  HDR,
  inflightMsg,
  INFLIGHT_MSG_SIZE,
  memTable,
  PF,
  readInflightMsg,
  readU64,
  REPLY_FLAGS,
  Req,
  reqName,
  singleRegion,
  u64,
  VERSION,
  VRING_NOFD,
  vringAddr,
  vringState,
  type InflightMsg,
  type RegionMsg,
  type VringAddrMsg,
} from './wire.js';

const ENOENT = 2;
const ECONNREFUSED = 111;
const EPIPE = 32;
const ECONNRESET = 104;

export interface Message {
  request: number;
  flags: number;
  size: number;
  payload: Uint8Array;
  fds: number[];
}

export class FrontEndError extends Error {}
/** The back-end closed the connection (or reset it). */
export class PeerClosedError extends FrontEndError {}
/** A REPLY_ACK came back non-zero. */
export class NackError extends FrontEndError {
  constructor(
    readonly request: number,
    readonly value: bigint,
  ) {
    super(`${reqName(request)}: back-end acked with failure ${value}`);
  }
}

export interface RegionWithFd extends RegionMsg {
  fd: number;
}

export interface ConfigReply {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array;
}

export interface SendOptions {
  /** Override the need_reply default (set whenever REPLY_ACK is negotiated). */
  needReply?: boolean;
  /** Return a non-zero ack instead of throwing NackError. */
  allowNack?: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class FrontEnd {
  /** Default reply timeout. Generous: back-ends may be busy draining I/O. */
  timeoutMs = 10_000;
  /** REPLY_ACK negotiated: messages without a reply body get need_reply and an ack. */
  replyAck = false;
  /** Every message sent and received, for failure messages. */
  readonly trace: string[] = [];

  private rx = new Uint8Array(0);
  private rxFds: number[] = [];
  private readonly inbox: Message[] = [];
  private eof = false;
  private eofReason = '';
  private closedLocally = false;
  private readonly scratch = new Uint8Array(65536);
  private readonly fdScratch = new Int32Array(8);

  private constructor(readonly fd: number) {}

  /** Connect, retrying while the back-end has not created or started listening on the socket yet. */
  static async connect(path: string, timeoutMs = 10_000): Promise<FrontEnd> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const fd = native.connect(path);
      if (fd >= 0) return new FrontEnd(fd);
      if ((fd !== -ENOENT && fd !== -ECONNREFUSED) || Date.now() > deadline) {
        throw new FrontEndError(`connect ${path}: errno ${-fd}`);
      }
      await sleep(20);
    }
  }

  get isClosed(): boolean {
    return this.eof;
  }

  /** Take whatever the socket holds. */
  private poll(): void {
    while (!this.eof) {
      const [n, nfds] = native.recvmsg(this.fd, this.scratch, this.fdScratch);
      for (let i = 0; i < nfds; i++) this.rxFds.push(this.fdScratch[i]!);
      if (n === -EAGAIN) break;
      if (n === -EINTR) continue;
      if (n <= 0) {
        this.markEof(n === 0 ? 'back-end closed the connection' : `recvmsg errno ${-n}`);
        break;
      }
      const merged = new Uint8Array(this.rx.length + n);
      merged.set(this.rx);
      merged.set(this.scratch.subarray(0, n), this.rx.length);
      this.rx = merged;
      this.parse();
    }
  }

  private parse(): void {
    while (this.rx.length >= HDR) {
      const dv = new DataView(this.rx.buffer, this.rx.byteOffset, HDR);
      const size = dv.getUint32(8, true);
      if (size > 4096) {
        this.markEof(`back-end sent a ${size}-byte payload; no reply is that large`);
        return;
      }
      if (this.rx.length < HDR + size) return;
      const m: Message = {
        request: dv.getUint32(0, true),
        flags: dv.getUint32(4, true),
        size,
        payload: this.rx.slice(HDR, HDR + size),
        fds: this.rxFds.splice(0),
      };
      this.rx = this.rx.slice(HDR + size);
      this.trace.push(`<- ${reqName(m.request)} flags=0x${m.flags.toString(16)} size=${size}${m.fds.length ? ` fds=${m.fds.length}` : ''}`);
      this.inbox.push(m);
    }
  }

  private markEof(reason: string): void {
    if (this.eof) return;
    this.eof = true;
    this.eofReason = reason;
    this.trace.push(`<- EOF (${reason})`);
  }

  /** Next message from the back-end. Throws on timeout or when the back-end closed. */
  async recv(timeoutMs = this.timeoutMs): Promise<Message> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.closedLocally) this.poll();
      const m = this.inbox.shift();
      if (m) return m;
      if (this.eof) throw new PeerClosedError(`${this.eofReason}\n${this.recentTrace()}`);
      if (Date.now() > deadline) throw new FrontEndError(`no message from the back-end within ${timeoutMs} ms\n${this.recentTrace()}`);
      await sleep(1);
    }
  }

  /**
   * Wait until the back-end closes the connection. Resolves with any messages
   * that arrived first; throws if it stays open for timeoutMs.
   */
  async waitClosed(timeoutMs = this.timeoutMs): Promise<Message[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.poll();
      if (this.eof) return this.inbox.splice(0);
      if (Date.now() > deadline) throw new FrontEndError(`back-end kept the connection open for ${timeoutMs} ms\n${this.recentTrace()}`);
      await sleep(1);
    }
  }

  /** Messages received and not yet consumed (a correct back-end leaves none). */
  pending(): Message[] {
    if (!this.closedLocally) this.poll();
    return this.inbox.splice(0);
  }

  recentTrace(n = 30): string {
    return this.trace.slice(-n).join('\n');
  }

  /** Raw bytes with optional fds, exactly as given: for malformed-message tests. */
  sendBytes(bytes: Uint8Array, fds: number[] = []): void {
    if (this.closedLocally) throw new FrontEndError('front-end already closed');
    let off = 0;
    let first = true;
    while (off < bytes.length) {
      const n = native.sendmsg(this.fd, bytes.subarray(off), first ? fds : []);
      if (n === -EAGAIN || n === -EINTR) continue; // a full socket buffer drains quickly
      if (n === -EPIPE || n === -ECONNRESET) throw new PeerClosedError(`send: back-end closed the connection\n${this.recentTrace()}`);
      if (n < 0) throw new FrontEndError(`sendmsg errno ${-n}`);
      off += n;
      first = false;
    }
  }

  /** Raw message: any request, flags, payload and fds (size defaults to the payload length). */
  send(request: number, flags: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = [], size?: number): void {
    this.trace.push(`-> ${reqName(request)} flags=0x${flags.toString(16)} size=${size ?? payload.length}${fds.length ? ` fds=${fds.length}` : ''}`);
    this.sendBytes(frame(request, flags, payload, size), fds);
  }

  /** Check a reply header exactly as QEMU does, plus the size we expect (and the fd count: none unless told). */
  checkReply(m: Message, request: number, size?: number, fds = 0): void {
    const where = `reply to ${reqName(request)}`;
    if (m.flags !== REPLY_FLAGS) throw new FrontEndError(`${where}: flags 0x${m.flags.toString(16)}, must be exactly 0x5`);
    if (m.request !== request) throw new FrontEndError(`${where}: carries request ${reqName(m.request)}`);
    if (size !== undefined && m.size !== size) throw new FrontEndError(`${where}: payload ${m.size} bytes, expected ${size}`);
    if (m.fds.length !== fds) throw new FrontEndError(`${where}: carries ${m.fds.length} fds, expected ${fds}`);
  }

  /** A request whose reply has a body (GET_*): exactly one reply. */
  async query(request: number, payload: Uint8Array, size: number | undefined, opts: SendOptions = {}): Promise<Uint8Array> {
    this.send(request, VERSION | (opts.needReply ? F_NEED_REPLY : 0), payload);
    const m = await this.recv();
    this.checkReply(m, request, size);
    return m.payload;
  }

  /** A request without a reply body: with REPLY_ACK it asks for and checks an ack. Returns the ack (0n when none). */
  async command(request: number, payload: Uint8Array, fds: number[] = [], opts: SendOptions = {}): Promise<bigint> {
    const needReply = opts.needReply ?? this.replyAck;
    this.send(request, VERSION | (needReply ? F_NEED_REPLY : 0), payload, fds);
    if (!needReply || !this.replyAck) return 0n;
    const m = await this.recv();
    this.checkReply(m, request, 8);
    const v = readU64(m.payload);
    if (v !== 0n && !opts.allowNack) throw new NackError(request, v);
    return v;
  }

  // ---- typed messages ----

  async getFeatures(opts?: SendOptions): Promise<bigint> {
    return readU64(await this.query(Req.GET_FEATURES, new Uint8Array(0), 8, opts));
  }

  setFeatures(features: bigint, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_FEATURES, u64(features), [], opts);
  }

  setOwner(opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_OWNER, new Uint8Array(0), [], opts);
  }

  async getProtocolFeatures(opts?: SendOptions): Promise<bigint> {
    return readU64(await this.query(Req.GET_PROTOCOL_FEATURES, new Uint8Array(0), 8, opts));
  }

  /** Like QEMU, never asks for an ack here: REPLY_ACK is only in force once this message is processed. */
  async setProtocolFeatures(features: bigint): Promise<void> {
    await this.command(Req.SET_PROTOCOL_FEATURES, u64(features), [], { needReply: false });
    this.replyAck = (features & bit(PF.REPLY_ACK)) !== 0n;
  }

  async getQueueNum(opts?: SendOptions): Promise<bigint> {
    return readU64(await this.query(Req.GET_QUEUE_NUM, new Uint8Array(0), 8, opts));
  }

  async getMaxMemSlots(): Promise<bigint> {
    return readU64(await this.query(Req.GET_MAX_MEM_SLOTS, new Uint8Array(0), 8));
  }

  /**
   * GET_CONFIG. Returns undefined when the back-end reports failure (an empty
   * payload); any other size than 12 + size is a protocol error.
   */
  async getConfig(offset: number, size: number, flags = 0): Promise<ConfigReply | undefined> {
    this.send(Req.GET_CONFIG, VERSION, configMsg(offset, size, flags));
    const m = await this.recv();
    this.checkReply(m, Req.GET_CONFIG);
    if (m.size === 0) return undefined;
    if (m.size !== 12 + size) throw new FrontEndError(`GET_CONFIG reply: ${m.size} bytes, must be ${12 + size} (QEMU: "bad msg size")`);
    const dv = new DataView(m.payload.buffer, m.payload.byteOffset, 12);
    return { offset: dv.getUint32(0, true), size: dv.getUint32(4, true), flags: dv.getUint32(8, true), data: m.payload.slice(12) };
  }

  setConfig(offset: number, data: Uint8Array, flags = 0, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_CONFIG, configMsg(offset, data.length, flags, data), [], opts);
  }

  setMemTable(regions: RegionWithFd[], opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_MEM_TABLE, memTable(regions), regions.map((r) => r.fd), opts);
  }

  addMemReg(region: RegionWithFd, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.ADD_MEM_REG, singleRegion(region), [region.fd], opts);
  }

  /** QEMU sends the region's fd along with REM_MEM_REG; so do we unless told otherwise. */
  remMemReg(region: RegionWithFd, opts: SendOptions & { withFd?: boolean } = {}): Promise<bigint> {
    return this.command(Req.REM_MEM_REG, singleRegion(region), opts.withFd === false ? [] : [region.fd], opts);
  }

  setVringNum(index: number, num: number, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_VRING_NUM, vringState(index, num), [], opts);
  }

  setVringAddr(addr: VringAddrMsg, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_VRING_ADDR, vringAddr(addr), [], opts);
  }

  setVringBase(index: number, base: number, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_VRING_BASE, vringState(index, base), [], opts);
  }

  /** Returns the back-end's next avail index; the reply must name the same queue. */
  async getVringBase(index: number, timeoutMs = this.timeoutMs): Promise<number> {
    this.send(Req.GET_VRING_BASE, VERSION, vringState(index, 0));
    const m = await this.recv(timeoutMs);
    this.checkReply(m, Req.GET_VRING_BASE, 8);
    const dv = new DataView(m.payload.buffer, m.payload.byteOffset, 8);
    const q = dv.getUint32(0, true);
    if (q !== index) throw new FrontEndError(`GET_VRING_BASE reply names queue ${q}, asked for ${index}`);
    return dv.getUint32(4, true);
  }

  private vringFd(request: number, index: number, fd: number | null, opts?: SendOptions): Promise<bigint> {
    const v = BigInt(index) | (fd === null ? BigInt(VRING_NOFD) : 0n);
    return this.command(request, u64(v), fd === null ? [] : [fd], opts);
  }

  setVringKick(index: number, fd: number | null, opts?: SendOptions): Promise<bigint> {
    return this.vringFd(Req.SET_VRING_KICK, index, fd, opts);
  }

  setVringCall(index: number, fd: number | null, opts?: SendOptions): Promise<bigint> {
    return this.vringFd(Req.SET_VRING_CALL, index, fd, opts);
  }

  setVringErr(index: number, fd: number | null, opts?: SendOptions): Promise<bigint> {
    return this.vringFd(Req.SET_VRING_ERR, index, fd, opts);
  }

  setVringEnable(index: number, enable: boolean, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_VRING_ENABLE, vringState(index, enable ? 1 : 0), [], opts);
  }

  /**
   * GET_INFLIGHT_FD: the reply carries the area's description and exactly one
   * fd, now ours to close. A wrong fd count closes whatever came and throws.
   */
  async getInflightFd(numQueues: number, queueSize: number): Promise<InflightMsg & { fd: number }> {
    const req = inflightMsg({ mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize });
    this.send(Req.GET_INFLIGHT_FD, VERSION, req);
    const m = await this.recv();
    try {
      this.checkReply(m, Req.GET_INFLIGHT_FD, INFLIGHT_MSG_SIZE, 1);
    } catch (e) {
      for (const fd of m.fds) native.close(fd);
      throw e;
    }
    return { ...readInflightMsg(m.payload), fd: m.fds[0]! };
  }

  /** SET_INFLIGHT_FD with the area's fd (or none, for malformed-message tests). */
  setInflightFd(desc: InflightMsg, fd: number | null, opts?: SendOptions): Promise<bigint> {
    return this.command(Req.SET_INFLIGHT_FD, inflightMsg(desc), fd === null ? [] : [fd], opts);
  }

  /** Close our end. Safe to call twice. */
  close(): void {
    if (this.closedLocally) return;
    this.closedLocally = true;
    native.close(this.fd);
    for (const fd of this.rxFds) native.close(fd);
    for (const m of this.inbox) for (const fd of m.fds) native.close(fd);
    this.eof = true;
  }
}
