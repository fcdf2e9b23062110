// One vhost-user front-end connection: reads messages (with their fds) off the
// socket, applies them to guest memory, the vrings and the device, and replies.
// Messages are handled strictly one at a time, even when a handler waits (as
// GET_VRING_BASE does for requests in flight).
import type { Logger } from 'pino';
import type { Device } from '../device.js';
import { native, EAGAIN, EINTR, MFD_CLOEXEC, POLL_READABLE, type WatchHandle } from '../native/index.js';
import { ftruncateSync } from 'node:fs';
import { GuestMemory, MemoryError } from '../ring/guest-memory.js';
import { InflightArea, InflightError, inflightQueueBytes } from '../ring/inflight.js';
import { ringFeatures } from '../features.js';
import { MAX_QUEUE_SIZE } from '../limits.js';
import type { Placement } from '../ring/placement.js';
import { Queue, type Virtqueue } from '../ring/queue.js';
import { RingError } from '../ring/ring.js';
import {
  bit,
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMessage,
  encodeU64,
  encodeVringState,
  expectSize,
  F_PROTOCOL_FEATURES,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  MAX_FDS,
  MAX_PAYLOAD,
  ProtocolError,
  ProtocolFeature,
  Req,
  requestName,
  SIZE_INFLIGHT,
  SIZE_SINGLE_REGION,
  SIZE_U64,
  SIZE_VRING_ADDR,
  SIZE_VRING_STATE,
  VERSION,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from './messages.js';

/** Protocol features implemented here, for every device. Devices add their own. */
export const BASE_PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.REPLY_ACK) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  bit(ProtocolFeature.RESET_DEVICE);

/** Messages buffered while one is still being handled (e.g. GET_VRING_BASE draining I/O). */
const MAX_QUEUED = 256;

/** Memory slots offered with CONFIGURE_MEM_SLOTS. QEMU caps it at its own limit. */
export const MAX_MEM_SLOTS = 32;

/** A handler found the connection closed while it waited; close() has released everything. */
class ConnectionClosed extends Error {}

interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
}

export class Connection {
  private readonly mem = new GuestMemory();
  private inflight: InflightArea | undefined;
  private readonly vrings: Virtqueue[];
  private watch: WatchHandle | undefined;
  private readonly header = new Uint8Array(HEADER_SIZE);
  private readonly fdScratch = new Int32Array(MAX_FDS);
  private reading: { buf: Uint8Array; got: number; fds: number[]; header?: { request: number; flags: number } };
  private queue: Message[] = [];
  private busy = false;
  private closed = false;
  private ackedFeatures = 0n;
  private ackedProtocol = 0n;
  private featuresSet = false;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;
  readonly log: Logger;

  constructor(
    private readonly fd: number,
    private readonly device: Device,
    placement: Placement,
    log: Logger,
  ) {
    this.log = log;
    this.vrings = Array.from({ length: device.numQueues }, (_, i) => new Queue(i, this.mem, placement.host(i, this.mem, log), log));
    this.reading = { buf: this.header, got: 0, fds: [] };
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
    this.watch = native.watch(fd, POLL_READABLE, () => this.onReadable());
  }

  /** Resolves once the connection is gone and all its resources are released. */
  get done(): Promise<void> {
    return this.closedPromise;
  }

  get protocolFeatures(): bigint {
    return BASE_PROTOCOL_FEATURES | this.device.protocolFeatures;
  }

  get features(): bigint {
    return this.device.features | bit(F_PROTOCOL_FEATURES);
  }

  private onReadable(): void {
    try {
      for (;;) {
        const r = this.reading;
        const [n, nfds, trunc] = native.recvmsg(this.fd, r.buf.subarray(r.got), this.fdScratch);
        for (let i = 0; i < nfds; i++) r.fds.push(this.fdScratch[i]!);
        if (n === -EAGAIN) return;
        if (n === -EINTR) continue;
        if (n < 0) throw new ProtocolError(`socket read failed: errno ${-n}`);
        if (trunc) throw new ProtocolError('message carried more than 8 fds');
        if (n === 0) {
          if (r.got > 0 || r.header) throw new ProtocolError('front-end closed the socket in the middle of a message');
          this.log.info('front-end disconnected');
          void this.close();
          return;
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
        this.queue.push({ request: r.header.request, flags: r.header.flags, payload: r.buf, fds: r.fds });
        // QEMU waits for each reply; a peer that floods us while a handler waits is hostile.
        if (this.queue.length > MAX_QUEUED) throw new ProtocolError(`more than ${MAX_QUEUED} messages queued behind a pending one`);
        this.reading = { buf: this.header, got: 0, fds: [] };
        void this.pump();
      }
    } catch (e) {
      this.fatal(e);
    }
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (!this.closed && this.queue.length) {
        const msg = this.queue.shift()!;
        try {
          await this.dispatch(msg);
        } finally {
          for (const fd of msg.fds) native.close(fd);
        }
      }
    } catch (e) {
      this.fatal(e);
    } finally {
      this.busy = false;
    }
  }

  private fatal(e: unknown): void {
    if (this.closed) return; // ConnectionClosed included
    const clean = e instanceof ProtocolError || e instanceof MemoryError || e instanceof RingError || e instanceof InflightError;
    if (clean) this.log.error({ reason: (e as Error).message }, 'closing connection: protocol violation');
    else this.log.error({ err: e }, 'closing connection: internal error');
    void this.close();
  }

  private send(request: number, payload: Uint8Array, fds: number[] = []): void {
    // A handler that waited (for a drain) may finish after a disconnect: its fd number may be reused by now.
    if (this.closed) return;
    const n = native.sendmsg(this.fd, encodeMessage(request, VERSION | FLAG_REPLY, payload), fds);
    if (n < 0) throw new ProtocolError(`cannot send ${requestName(request)} reply: errno ${-n}`);
  }

  private ack(msg: Message, ok: boolean): void {
    if (msg.flags & FLAG_NEED_REPLY && this.ackedProtocol & bit(ProtocolFeature.REPLY_ACK)) {
      this.send(msg.request, encodeU64(ok ? 0n : 1n));
    }
  }

  /** Take the one fd a message must carry; the rest stay in msg.fds and get closed. */
  private takeFd(msg: Message): number {
    if (msg.fds.length !== 1) throw new ProtocolError(`${requestName(msg.request)}: expected 1 fd, got ${msg.fds.length}`);
    return msg.fds.pop()!;
  }

  private noFds(msg: Message): void {
    if (msg.fds.length) throw new ProtocolError(`${requestName(msg.request)}: carries ${msg.fds.length} unexpected fds`);
  }

  private vring(index: number, request: number): Virtqueue {
    const v = this.vrings[index];
    if (!v) throw new ProtocolError(`${requestName(request)}: queue ${index} does not exist (device has ${this.vrings.length})`);
    return v;
  }

  /** A queue whose configuration may change: it must not be running. */
  private idleVring(index: number, request: number): Virtqueue {
    const v = this.vring(index, request);
    if (v.started) throw new ProtocolError(`${requestName(request)}: queue ${index} is running`);
    return v;
  }

  private async dispatch(msg: Message): Promise<void> {
    const { request, payload } = msg;
    this.log.debug({ request: requestName(request), size: payload.length, fds: msg.fds.length }, 'message');
    if (request !== Req.SET_MEM_TABLE && request !== Req.ADD_MEM_REG && request !== Req.REM_MEM_REG &&
        request !== Req.SET_VRING_KICK && request !== Req.SET_VRING_CALL && request !== Req.SET_VRING_ERR &&
        request !== Req.SET_INFLIGHT_FD) {
      this.noFds(msg);
    }
    switch (request) {
      case Req.GET_FEATURES:
        expectSize(request, payload, 0);
        this.send(request, encodeU64(this.features));
        return;
      case Req.SET_FEATURES: {
        expectSize(request, payload, SIZE_U64);
        const f = decodeU64(payload);
        if (f & ~this.features) throw new ProtocolError(`SET_FEATURES: 0x${f.toString(16)} has bits never offered`);
        // QEMU repeats SET_FEATURES for each vhost device sharing the connection (net queue pairs).
        const running = this.vrings.some((v) => v.started);
        if (running && (!this.featuresSet || f !== this.ackedFeatures)) {
          throw new ProtocolError('SET_FEATURES changes features while rings are running');
        }
        if (!running) this.device.setFeatures(f & ~bit(F_PROTOCOL_FEATURES));
        this.ackedFeatures = f;
        this.featuresSet = true;
        // Without protocol features a ring is enabled as soon as it exists.
        if (!(f & bit(F_PROTOCOL_FEATURES))) {
          await Promise.all(this.vrings.map((v) => v.setEnabled(true)));
          if (this.closed) return;
        }
        this.ack(msg, true);
        return;
      }
      case Req.GET_PROTOCOL_FEATURES:
        expectSize(request, payload, 0);
        this.send(request, encodeU64(this.protocolFeatures));
        return;
      case Req.SET_PROTOCOL_FEATURES: {
        expectSize(request, payload, SIZE_U64);
        const f = decodeU64(payload);
        if (f & ~this.protocolFeatures) throw new ProtocolError(`SET_PROTOCOL_FEATURES: 0x${f.toString(16)} has bits never offered`);
        this.ackedProtocol = f;
        this.ack(msg, true);
        return;
      }
      case Req.SET_OWNER:
        expectSize(request, payload, 0);
        this.ack(msg, true);
        return;
      case Req.RESET_OWNER:
      case Req.RESET_DEVICE:
        expectSize(request, payload, 0);
        if (request === Req.RESET_DEVICE && !(this.ackedProtocol & bit(ProtocolFeature.RESET_DEVICE))) {
          throw new ProtocolError('RESET_DEVICE without the RESET_DEVICE protocol feature');
        }
        await this.resetDevice();
        this.ack(msg, true);
        return;
      case Req.GET_QUEUE_NUM:
        expectSize(request, payload, 0);
        this.send(request, encodeU64(BigInt(this.device.queueNum)));
        return;
      case Req.GET_MAX_MEM_SLOTS:
        expectSize(request, payload, 0);
        this.send(request, encodeU64(BigInt(MAX_MEM_SLOTS)));
        return;
      case Req.SET_MEM_TABLE: {
        const regions = decodeMemTable(payload);
        if (msg.fds.length !== regions.length) {
          throw new ProtocolError(`SET_MEM_TABLE: ${regions.length} regions but ${msg.fds.length} fds`);
        }
        await this.withRingsQuiesced(() => {
          const fds = msg.fds.splice(0);
          this.mem.clear();
          for (let i = 0; i < regions.length; i++) {
            try {
              this.mem.add({ ...regions[i]!, fd: fds[i]! }); // owns the fd from here, even on failure
            } catch (e) {
              for (const fd of fds.slice(i + 1)) native.close(fd);
              this.mem.clear();
              throw e;
            }
          }
        });
        this.logMemory();
        this.ack(msg, true);
        return;
      }
      case Req.ADD_MEM_REG: {
        this.requireProtocol(request, ProtocolFeature.CONFIGURE_MEM_SLOTS);
        expectSize(request, payload, SIZE_SINGLE_REGION);
        if (msg.fds.length !== 1) throw new ProtocolError(`ADD_MEM_REG: expected 1 fd, got ${msg.fds.length}`);
        if (this.mem.regionCount >= MAX_MEM_SLOTS) throw new ProtocolError(`ADD_MEM_REG: all ${MAX_MEM_SLOTS} memory slots are in use`);
        const region = decodeSingleRegion(payload);
        await this.withRingsQuiesced(() => void this.mem.add({ ...region, fd: this.takeFd(msg) }));
        this.logMemory();
        this.ack(msg, true);
        return;
      }
      case Req.REM_MEM_REG: {
        this.requireProtocol(request, ProtocolFeature.CONFIGURE_MEM_SLOTS);
        expectSize(request, payload, SIZE_SINGLE_REGION);
        if (msg.fds.length > 1) throw new ProtocolError(`REM_MEM_REG: carries ${msg.fds.length} fds`);
        const region = decodeSingleRegion(payload);
        let found = false;
        await this.withRingsQuiesced(() => void (found = this.mem.remove(region)));
        if (!found) this.log.warn({ gpa: region.guestPhysAddr.toString(16) }, 'REM_MEM_REG: no such region');
        this.ack(msg, found);
        return;
      }
      case Req.SET_VRING_NUM: {
        expectSize(request, payload, SIZE_VRING_STATE);
        const s = decodeVringState(payload);
        const v = this.idleVring(s.index, request);
        const max = Math.min(this.device.maxQueueSize, MAX_QUEUE_SIZE);
        if (s.num < 1 || s.num > max || (s.num & (s.num - 1)) !== 0) {
          throw new ProtocolError(`SET_VRING_NUM: size ${s.num} is not a power of two in 1..${max}`);
        }
        v.size = s.num;
        this.ack(msg, true);
        return;
      }
      case Req.SET_VRING_BASE: {
        expectSize(request, payload, SIZE_VRING_STATE);
        const s = decodeVringState(payload);
        const v = this.idleVring(s.index, request);
        if (s.num > 0xffff) throw new ProtocolError(`SET_VRING_BASE: ${s.num} does not fit a split ring index`);
        v.base = s.num;
        this.ack(msg, true);
        return;
      }
      case Req.SET_VRING_ADDR: {
        expectSize(request, payload, SIZE_VRING_ADDR);
        const a = decodeVringAddr(payload);
        const v = this.idleVring(a.index, request);
        const limit = BigInt(Number.MAX_SAFE_INTEGER);
        if (a.desc > limit || a.avail > limit || a.used > limit) throw new ProtocolError('SET_VRING_ADDR: address beyond 2^53');
        v.addrs = { desc: Number(a.desc), avail: Number(a.avail), used: Number(a.used) };
        this.ack(msg, true);
        return;
      }
      case Req.GET_VRING_BASE: {
        expectSize(request, payload, SIZE_VRING_STATE);
        const s = decodeVringState(payload);
        const v = this.vring(s.index, request);
        const wasStarted = v.started;
        const next = await v.stop();
        if (this.closed) return; // close() stopped it too, and told the device
        if (wasStarted) this.device.stopQueue(v.index, v.report);
        this.log.debug({ queue: s.index, base: next }, 'queue stopped');
        this.send(request, encodeVringState({ index: s.index, num: next }));
        return;
      }
      case Req.SET_VRING_KICK:
      case Req.SET_VRING_CALL:
      case Req.SET_VRING_ERR: {
        expectSize(request, payload, SIZE_U64);
        const u = Number(decodeU64(payload) & 0xffffffffn);
        const v = this.vring(u & VRING_IDX_MASK, request);
        const nofd = (u & VRING_NOFD_MASK) !== 0;
        if (nofd && msg.fds.length) throw new ProtocolError(`${requestName(request)}: fd sent with the no-fd flag`);
        if (!nofd && msg.fds.length !== 1) throw new ProtocolError(`${requestName(request)}: expected 1 fd, got ${msg.fds.length}`);
        if (request === Req.SET_VRING_CALL) await v.setCall(nofd ? null : this.takeFd(msg));
        else if (request === Req.SET_VRING_ERR) await v.setErr(nofd ? null : this.takeFd(msg));
        else {
          if (v.started) {
            // A new kick fd for a running ring: finish what is in flight first.
            await v.stop();
            if (this.closed) return;
            this.device.stopQueue(v.index, v.report);
          }
          v.setKick(nofd ? null : this.takeFd(msg));
          this.startRing(v);
        }
        this.ack(msg, true);
        return;
      }
      case Req.SET_VRING_ENABLE: {
        expectSize(request, payload, SIZE_VRING_STATE);
        const s = decodeVringState(payload);
        const v = this.vring(s.index, request);
        // Allowed as soon as we offer protocol features (always): QEMU's net front-end
        // sends it before SET_FEATURES.
        if (s.num > 1) throw new ProtocolError(`SET_VRING_ENABLE: value ${s.num} is not 0 or 1`);
        await v.setEnabled(s.num === 1);
        if (this.closed) return;
        this.ack(msg, true);
        return;
      }
      case Req.GET_CONFIG: {
        this.requireProtocol(request, ProtocolFeature.CONFIG);
        const c = decodeConfig(request, payload);
        const data = this.device.readConfig(c.offset, c.size);
        if (!data) this.log.warn({ offset: c.offset, size: c.size }, 'GET_CONFIG: range not readable');
        // An empty payload is the protocol's way to report failure.
        this.send(request, data ? encodeConfig({ ...c, data }) : new Uint8Array(0));
        return;
      }
      case Req.SET_CONFIG: {
        this.requireProtocol(request, ProtocolFeature.CONFIG);
        const c = decodeConfig(request, payload);
        const err = this.device.writeConfig(c.offset, c.data);
        if (err) this.log.warn({ offset: c.offset, size: c.size, reason: err }, 'SET_CONFIG refused');
        this.ack(msg, !err);
        return;
      }
      case Req.GET_INFLIGHT_FD: {
        this.requireProtocol(request, ProtocolFeature.INFLIGHT_SHMFD);
        expectSize(request, payload, SIZE_INFLIGHT);
        const m = decodeInflight(payload);
        if (m.numQueues < 1 || m.numQueues > this.vrings.length || m.queueSize < 1 || m.queueSize > this.device.maxQueueSize) {
          throw new ProtocolError(`GET_INFLIGHT_FD: ${m.numQueues} queues of ${m.queueSize} is outside what the device offers`);
        }
        const size = m.numQueues * inflightQueueBytes(m.queueSize);
        // A fresh, zeroed area; the front-end keeps it across our restarts and hands it back.
        const fd = native.memfdCreate('vhostd-inflight', MFD_CLOEXEC);
        try {
          ftruncateSync(fd, size);
          this.send(request, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: m.numQueues, queueSize: m.queueSize }), [fd]);
        } finally {
          native.close(fd);
        }
        return;
      }
      case Req.SET_INFLIGHT_FD: {
        this.requireProtocol(request, ProtocolFeature.INFLIGHT_SHMFD);
        expectSize(request, payload, SIZE_INFLIGHT);
        const fd = this.takeFd(msg);
        const m = decodeInflight(payload);
        if (this.vrings.some((v) => v.started)) {
          native.close(fd);
          throw new ProtocolError('SET_INFLIGHT_FD while rings are running');
        }
        if (m.numQueues > this.vrings.length) {
          native.close(fd);
          throw new ProtocolError(`SET_INFLIGHT_FD: ${m.numQueues} queues, the device has ${this.vrings.length}`);
        }
        this.inflight?.close();
        this.inflight = undefined;
        this.inflight = new InflightArea(fd, m.mmapSize, m.mmapOffset, m.numQueues, m.queueSize);
        this.vrings.forEach((v, i) => (v.inflightRecord = this.inflight!.queue(i)));
        this.ack(msg, true);
        return;
      }
      case Req.NET_SET_MTU: {
        this.requireProtocol(request, ProtocolFeature.MTU);
        expectSize(request, payload, SIZE_U64);
        const mtu = decodeU64(payload);
        const err =
          mtu > 0xffffn ? `MTU ${mtu} is out of range`
          : this.device.setMtu ? this.device.setMtu(Number(mtu))
          : 'this device has no MTU';
        if (err) this.log.warn({ mtu: mtu.toString(), reason: err }, 'NET_SET_MTU refused');
        this.ack(msg, !err);
        return;
      }
      case Req.SEND_RARP: {
        this.requireProtocol(request, ProtocolFeature.RARP);
        expectSize(request, payload, SIZE_U64);
        this.device.sendRarp?.(payload.slice(0, 6));
        this.ack(msg, true);
        return;
      }
      default:
        throw new ProtocolError(`${requestName(request)}: request not supported by this back-end`);
    }
  }

  private requireProtocol(request: number, feature: number): void {
    if (!(this.ackedProtocol & bit(feature))) {
      throw new ProtocolError(`${requestName(request)} without its protocol feature negotiated`);
    }
  }

  private startRing(v: Virtqueue): void {
    if (!v.configured) {
      this.log.warn({ queue: v.index }, 'kick fd arrived before the ring was configured; waiting');
      return;
    }
    if (!this.featuresSet) this.log.warn({ queue: v.index }, 'ring started before SET_FEATURES');
    const f = this.ackedFeatures;
    // A ring that cannot start (rings outside memory, an unpollable kick fd) fails itself.
    v.start(ringFeatures(f));
    this.log.debug({ queue: v.index, size: v.size, base: v.base }, 'queue started');
  }

  /**
   * Memory is about to change under running rings: stop taking requests,
   * let those in flight finish (their buffers live in the old mapping),
   * change it, then restart the rings against the new mapping.
   */
  private async withRingsQuiesced(change: () => void): Promise<void> {
    const running = this.vrings.filter((v) => v.started);
    for (const v of running) await v.quiesce();
    // Closed while waiting: close() released the memory; changing it now would leak the new table.
    if (this.closed) throw new ConnectionClosed();
    try {
      change();
    } finally {
      for (const v of running) {
        try {
          v.resume();
        } catch (e) {
          if (!(e instanceof RingError)) throw e;
          v.fail(`ring no longer in guest memory: ${e.message}`);
        }
      }
    }
  }

  private logMemory(): void {
    this.log.info(
      {
        regions: this.mem.list().map((r) => ({
          gpa: `0x${r.gpa.toString(16)}`,
          size: r.size,
          offset: r.mmapOffset,
        })),
      },
      'guest memory mapped',
    );
  }

  private async resetDevice(): Promise<void> {
    for (const v of this.vrings) {
      if (v.started) {
        await v.stop();
        if (this.closed) throw new ConnectionClosed(); // close() finishes the teardown
        this.device.stopQueue(v.index, v.report);
      }
      v.reset();
    }
    this.device.reset();
    this.inflight?.close();
    this.inflight = undefined;
    // With CONFIGURE_MEM_SLOTS QEMU only ever sends changes to the table it
    // believes we hold, so keep it; otherwise the next SET_MEM_TABLE brings it.
    if (!(this.ackedProtocol & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS))) this.mem.clear();
    this.ackedFeatures = 0n;
    this.featuresSet = false;
  }

  /**
   * Tear down: stop the rings, wait for I/O into guest memory to finish,
   * unmap it and close every fd. Safe to call more than once.
   */
  async close(): Promise<void> {
    if (this.closed) return this.closedPromise;
    this.closed = true;
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    for (const m of this.queue) for (const fd of m.fds) native.close(fd);
    this.queue = [];
    for (const fd of this.reading.fds) native.close(fd);
    this.reading.fds = [];
    try {
      for (const v of this.vrings) {
        if (v.started) {
          await v.stop();
          this.device.stopQueue(v.index, v.report);
        }
        v.reset();
      }
      this.device.reset();
    } catch (e) {
      this.log.error({ err: e }, 'error while stopping rings');
    }
    this.mem.clear();
    this.inflight?.close();
    this.inflight = undefined;
    native.close(this.fd);
    this.resolveClosed();
  }
}
