// The state one front-end builds up (features, guest memory, rings, the
// inflight area) and what each request does to it. Messages arrive here
// already checked against their entry in requests.ts (size, fds, feature).
//
// A handler returns a promise only when it has to wait (rings draining, a
// queue thread answering); everything else runs synchronously, so a burst of
// such messages is applied in order without yielding.
import type { Logger } from 'pino';
import { ftruncateSync } from 'node:fs';
import type { Device } from '../device.js';
import { has, ringFeatures, VHOST_F_LOG_ALL } from '../features.js';
import { LogArea, LogError } from '../ring/dirty-log.js';
import { MAX_MEM_SLOTS, MAX_QUEUE_SIZE } from '../limits.js';
import { native, MFD_CLOEXEC } from '../native/index.js';
import { GuestMemory } from '../ring/guest-memory.js';
import { InflightArea, inflightQueueBytes } from '../ring/inflight.js';
import type { Placement } from '../ring/placement.js';
import { Queue, type Virtqueue } from '../ring/queue.js';
import { RingError } from '../ring/ring.js';
import {
  bit,
  decodeConfig,
  decodeInflight,
  decodeLogBase,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeU64,
  encodeVringState,
  F_PROTOCOL_FEATURES,
  ProtocolError,
  BackendReq,
  ProtocolFeature,
  requestName,
  VRING_F_LOG,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
  type MemRegion,
} from './messages.js';
import type { Message } from './requests.js';
import { BackendChannel } from './backend-channel.js';

/** Protocol features implemented here, for every device. Devices add their own. */
export const BASE_PROTOCOL_FEATURES =
  bit(ProtocolFeature.MQ) |
  bit(ProtocolFeature.LOG_SHMFD) |
  bit(ProtocolFeature.REPLY_ACK) |
  bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  bit(ProtocolFeature.RESET_DEVICE) |
  bit(ProtocolFeature.STATUS);

/** Device status bits (VIRTIO 1.2 §2.1). */
export const Status = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

export { MAX_MEM_SLOTS };

/** A handler found the connection closed while it waited; close() has released everything. */
export class ConnectionClosed extends Error {}

/** How handlers answer the front-end; the connection implements it. */
export interface Replies {
  /** The connection is gone (checked after every wait). */
  readonly closed: boolean;
  send(request: number, payload: Uint8Array, fds?: number[]): void;
  /** The REPLY_ACK answer, when the message asked for one. */
  ack(msg: Message, ok: boolean): void;
}

type Maybe = void | Promise<void>;

const isPromise = (r: unknown): r is Promise<unknown> => r instanceof Promise;

/** Run `next` after `r`: at once when r is not a promise, so synchronous paths stay synchronous. */
function then(r: unknown, next: () => void): Maybe {
  return isPromise(r) ? r.then(next) : next();
}

/** Settle all of them; a promise only if one of them is. */
function all(results: unknown[]): void | Promise<unknown> {
  const waits = results.filter(isPromise);
  return waits.length ? Promise.all(waits) : undefined;
}

export class Handlers {
  readonly mem = new GuestMemory();
  readonly vrings: Virtqueue[];
  private inflight: InflightArea | undefined;
  ackedFeatures = 0n;
  ackedProtocol = 0n;
  private backend: BackendChannel | undefined;
  private featuresSet = false;
  /** SET_LOG_BASE's dirty log; the queues mark it while VHOST_F_LOG_ALL is acked. */
  private logArea: LogArea | undefined;
  /** SET_LOG_FD's eventfd, kicked after marks (libvhost-user's convention; QEMU sends none). */
  private logKick = -1;
  /** The device status byte as the front-end last set it (STATUS). */
  private status = 0;
  /** Rings whose kick fd came before the rest of their configuration: started once that is complete. */
  private readonly waitingForConfig = new Set<Virtqueue>();

  constructor(
    private readonly device: Device,
    placement: Placement,
    private readonly io: Replies,
    private readonly log: Logger,
  ) {
    this.vrings = Array.from({ length: device.numQueues }, (_, i) => new Queue(i, this.mem, placement.host(i, this.mem, log), log));
  }

  get protocolFeatures(): bigint {
    return BASE_PROTOCOL_FEATURES | this.device.protocolFeatures;
  }

  get features(): bigint {
    return this.device.features | bit(F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
  }

  /** The log the queues mark now: a log base was given and the front-end asked for logging. */
  private get activeLog(): LogArea | undefined {
    return has(this.ackedFeatures, VHOST_F_LOG_ALL) ? this.logArea : undefined;
  }

  /** After a wait: carry on only if the connection is still there. */
  private ackIfOpen(msg: Message): () => void {
    return () => {
      if (!this.io.closed) this.io.ack(msg, true);
    };
  }

  // ---- features and ownership ----

  getFeatures(msg: Message): void {
    this.io.send(msg.request, encodeU64(this.features));
  }

  setFeatures(msg: Message): Maybe {
    const f = decodeU64(msg.payload);
    if (f & ~this.features) throw new ProtocolError(`SET_FEATURES: 0x${f.toString(16)} has bits never offered`);
    const transport = bit(F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
    // QEMU repeats SET_FEATURES for each vhost device sharing the connection (net queue
    // pairs), and turns VHOST_F_LOG_ALL on and off under running rings (migration).
    const running = this.vrings.some((v) => v.started);
    if (running && (!this.featuresSet || (f ^ this.ackedFeatures) & ~bit(VHOST_F_LOG_ALL))) {
      throw new ProtocolError('SET_FEATURES changes features other than VHOST_F_LOG_ALL while rings are running');
    }
    if (!running) this.device.setFeatures(f & ~transport);
    const wasLogging = has(this.ackedFeatures, VHOST_F_LOG_ALL);
    this.ackedFeatures = f;
    this.featuresSet = true;
    const logging = has(f, VHOST_F_LOG_ALL);
    const steps: unknown[] = [];
    if (logging !== wasLogging) {
      if (logging && !this.logArea) {
        // Nothing to mark into: a migration now would copy stale pages. QEMU always sends the log base first.
        this.log.error('VHOST_F_LOG_ALL acked without SET_LOG_BASE: writes into guest memory cannot be logged');
      } else {
        this.log.info({ logging }, logging ? 'dirty logging on: every write into guest memory is marked' : 'dirty logging off');
      }
      steps.push(this.applyLog());
    }
    // Without protocol features a ring is enabled as soon as it exists.
    if (!(f & bit(F_PROTOCOL_FEATURES))) steps.push(this.enableAll(true));
    return then(all(steps), this.ackIfOpen(msg));
  }

  getProtocolFeatures(msg: Message): void {
    this.io.send(msg.request, encodeU64(this.protocolFeatures));
  }

  setProtocolFeatures(msg: Message): void {
    const f = decodeU64(msg.payload);
    if (f & ~this.protocolFeatures) throw new ProtocolError(`SET_PROTOCOL_FEATURES: 0x${f.toString(16)} has bits never offered`);
    this.ackedProtocol = f;
    this.io.ack(msg, true);
  }

  setOwner(msg: Message): void {
    this.io.ack(msg, true);
  }

  /**
   * vhost-user.rst: treating RESET_OWNER as a full reset leads to bugs; a
   * back-end should ignore it or disable all rings. Disable them, and keep
   * memory and ring configuration, so SET_VRING_ENABLE(1) resumes.
   */
  resetOwner(msg: Message): Maybe {
    return then(this.enableAll(false), this.ackIfOpen(msg));
  }

  resetDevice(msg: Message): Maybe {
    return then(this.reset(), () => this.io.ack(msg, true));
  }

  getQueueNum(msg: Message): void {
    this.io.send(msg.request, encodeU64(BigInt(this.device.queueNum)));
  }

  // ---- guest memory ----

  getMaxMemSlots(msg: Message): void {
    this.io.send(msg.request, encodeU64(BigInt(MAX_MEM_SLOTS)));
  }

  setMemTable(msg: Message): Maybe {
    const regions = decodeMemTable(msg.payload);
    return then(
      this.withRingsQuiesced(() => {
        const fds = msg.fds.splice(0); // mem.add() owns each one it is given, even on failure
        this.mem.clear();
        for (let i = 0; i < regions.length; i++) {
          try {
            this.mem.add({ ...regions[i]!, fd: fds[i]! });
          } catch (e) {
            for (const fd of fds.slice(i + 1)) native.close(fd);
            this.mem.clear();
            throw e;
          }
        }
      }),
      () => {
        this.logMemory();
        this.memoryChanged(msg, true);
      },
    );
  }

  addMemReg(msg: Message): Maybe {
    const region = decodeSingleRegion(msg.payload);
    // An identical region only counts a reference (QEMU's second vhost_dev of a net
    // device sends the same regions again), so it needs no slot.
    if (!this.isMapped(region) && this.mem.regionCount >= MAX_MEM_SLOTS) {
      throw new ProtocolError(`ADD_MEM_REG: all ${MAX_MEM_SLOTS} memory slots are in use`);
    }
    return then(this.withRingsQuiesced(() => void this.mem.add({ ...region, fd: msg.fds.pop()! })), () => {
      this.logRegion('guest memory region added', region);
      this.memoryChanged(msg, true);
    });
  }

  remMemReg(msg: Message): Maybe {
    const region = decodeSingleRegion(msg.payload);
    let found = false;
    return then(this.withRingsQuiesced(() => void (found = this.mem.remove(region))), () => {
      if (!found) this.log.warn({ gpa: region.guestPhysAddr.toString(16) }, 'REM_MEM_REG: no such region');
      else this.logRegion('guest memory region removed', region);
      this.memoryChanged(msg, found);
    });
  }

  /** Same test GuestMemory.add uses to fold a region into a mapped one. */
  private isMapped(r: MemRegion): boolean {
    return this.mem.list().some(
      (m) =>
        BigInt(m.gpa) === r.guestPhysAddr &&
        BigInt(m.size) === r.memorySize &&
        BigInt(m.uva) === r.userspaceAddr &&
        BigInt(m.mmapOffset) === r.mmapOffset,
    );
  }

  private memoryChanged(msg: Message, ok: boolean): void {
    this.startWaiting();
    this.io.ack(msg, ok);
  }

  // ---- rings ----

  setVringNum(msg: Message): void {
    const s = decodeVringState(msg.payload);
    const v = this.idleVring(s.index, msg.request);
    const max = Math.min(this.device.maxQueueSize, MAX_QUEUE_SIZE);
    const where = `SET_VRING_NUM: queue ${s.index}: size ${s.num}`;
    if (s.num === 0) throw new ProtocolError(`${where}; a ring needs at least one descriptor`);
    if (s.num > max) throw new ProtocolError(`${where} is above the device maximum of ${max}`);
    if ((s.num & (s.num - 1)) !== 0) throw new ProtocolError(`${where} is not a power of two`);
    v.size = s.num;
    this.startIfWaiting(v);
    this.io.ack(msg, true);
  }

  setVringBase(msg: Message): void {
    const s = decodeVringState(msg.payload);
    const v = this.idleVring(s.index, msg.request);
    if (s.num > 0xffff) throw new ProtocolError(`SET_VRING_BASE: ${s.num} does not fit a split ring index`);
    v.base = s.num;
    this.io.ack(msg, true);
  }

  setVringAddr(msg: Message): Maybe {
    const a = decodeVringAddr(msg.payload);
    const v = this.vring(a.index, msg.request);
    const limit = BigInt(Number.MAX_SAFE_INTEGER);
    if (a.desc > limit || a.avail > limit || a.used > limit) throw new ProtocolError('SET_VRING_ADDR: address beyond 2^53');
    if (a.flags & ~VRING_F_LOG) throw new ProtocolError(`SET_VRING_ADDR: unknown flags 0x${a.flags.toString(16)}`);
    const logging = (a.flags & VRING_F_LOG) !== 0;
    if (logging && a.log > limit) throw new ProtocolError('SET_VRING_ADDR: log address beyond 2^53');
    const addrs = { desc: Number(a.desc), avail: Number(a.avail), used: Number(a.used) };
    const logAddr = logging ? Number(a.log) : undefined;
    if (v.started) {
      // Migration turns the log flag on and off under a running ring; the ring itself must stay where it is.
      const cur = v.addrs!;
      if (cur.desc !== addrs.desc || cur.avail !== addrs.avail || cur.used !== addrs.used) {
        throw new ProtocolError(`SET_VRING_ADDR: queue ${a.index} is running; only its log flag and address may change`);
      }
      if (v.logAddr === logAddr) return this.io.ack(msg, true);
      v.logAddr = logAddr;
      return then(v.setLog(this.activeLog), this.ackIfOpen(msg));
    }
    v.addrs = addrs;
    v.logAddr = logAddr;
    this.startIfWaiting(v);
    this.io.ack(msg, true);
  }

  // ---- dirty logging (live migration) ----

  /**
   * SET_LOG_BASE: map the new log, move every running queue onto it, and only
   * then let the old one go and answer: the front-end reads the old log a last
   * time after this reply and frees it. The reply is owed whatever need_reply
   * says (QEMU waits for it), and it is the only one.
   */
  setLogBase(msg: Message): Maybe {
    const l = decodeLogBase(msg.payload);
    let area: LogArea;
    try {
      area = new LogArea(msg.fds.pop()!, l.mmapSize, l.mmapOffset, this.logKick);
    } catch (e) {
      if (e instanceof LogError) throw new ProtocolError(`SET_LOG_BASE: ${e.message}`);
      throw e;
    }
    const old = this.logArea;
    this.logArea = area;
    this.log.info({ bytes: area.shared.length, covers: area.covers }, 'dirty log mapped');
    return then(this.applyLog(), () => {
      old?.close();
      if (this.io.closed) return;
      this.io.send(msg.request, encodeU64(0n));
    });
  }

  /** SET_LOG_FD: an eventfd to kick after marking; the old one is closed once no queue kicks it. */
  setLogFd(msg: Message): Maybe {
    const old = this.logKick;
    this.logKick = msg.fds.pop()!;
    this.logArea?.setKick(this.logKick);
    return then(this.applyLog(), () => {
      if (old >= 0) native.close(old);
      this.io.ack(msg, true);
    });
  }

  /** Tell every queue which log to mark now (or none); settles once they all switched. */
  private applyLog(): void | Promise<unknown> {
    const log = this.activeLog;
    return all(this.vrings.map((v) => v.setLog(log)));
  }

  private closeLog(): void {
    this.logArea?.close();
    this.logArea = undefined;
    if (this.logKick >= 0) native.close(this.logKick);
    this.logKick = -1;
  }

  getVringBase(msg: Message): Promise<void> {
    const s = decodeVringState(msg.payload);
    const v = this.vring(s.index, msg.request);
    const wasStarted = v.started;
    this.waitingForConfig.delete(v); // stopped: only a new kick fd starts it again
    return v.stop().then(async (next) => {
      if (this.io.closed) return; // close() stopped it too, and told the device
      // The device settles first (blk flushes): a migration's destination may open the image next.
      if (wasStarted) await this.device.stopQueue(v.index, v.report);
      if (this.io.closed) return;
      this.log.debug({ queue: s.index, base: next }, 'queue stopped');
      this.io.send(msg.request, encodeVringState({ index: s.index, num: next }));
    });
  }

  /** The queue of a KICK/CALL/ERR message, and a taker for its fd (null: no fd, poll instead). */
  private vringFd(msg: Message): { v: Virtqueue; take: () => number | null } {
    const u = Number(decodeU64(msg.payload) & 0xffffffffn);
    const v = this.vring(u & VRING_IDX_MASK, msg.request);
    return { v, take: () => (u & VRING_NOFD_MASK ? null : msg.fds.pop()!) };
  }

  setVringKick(msg: Message): Maybe {
    const { v, take } = this.vringFd(msg);
    const install = (): void => {
      v.setKick(take());
      this.startRing(v);
      this.io.ack(msg, true);
    };
    if (!v.started) return install();
    // A new kick fd for a running ring: finish what is in flight first.
    return v.stop().then(() => {
      if (this.io.closed) return; // the fd is still in msg.fds: the connection closes it
      void this.device.stopQueue(v.index, v.report);
      install();
    });
  }

  setVringCall(msg: Message): Maybe {
    const { v, take } = this.vringFd(msg);
    return then(v.setCall(take()), this.ackIfOpen(msg));
  }

  setVringErr(msg: Message): Maybe {
    const { v, take } = this.vringFd(msg);
    return then(v.setErr(take()), this.ackIfOpen(msg));
  }

  setVringEnable(msg: Message): Maybe {
    const s = decodeVringState(msg.payload);
    const v = this.vring(s.index, msg.request);
    if (s.num > 1) throw new ProtocolError(`SET_VRING_ENABLE: value ${s.num} is not 0 or 1`);
    return then(v.setEnabled(s.num === 1), this.ackIfOpen(msg));
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

  private enableAll(on: boolean): void | Promise<unknown> {
    return all(this.vrings.map((v) => v.setEnabled(on)));
  }

  /** A kick fd arrived: start the ring, or remember it until its configuration is complete. */
  private startRing(v: Virtqueue): void {
    if (!v.configured) {
      this.log.debug({ queue: v.index }, 'kick fd arrived before the ring was configured; starting it once it is');
      this.waitingForConfig.add(v);
      return;
    }
    this.waitingForConfig.delete(v);
    if (!this.featuresSet) this.log.warn({ queue: v.index }, 'ring started before SET_FEATURES');
    const f = this.ackedFeatures;
    // A ring that cannot start (rings outside memory, an unpollable kick fd) fails itself.
    v.start(ringFeatures(f));
    this.log.debug({ queue: v.index, size: v.size, base: v.base }, 'queue started');
  }

  private startIfWaiting(v: Virtqueue): void {
    if (this.waitingForConfig.has(v) && v.configured && !v.started) this.startRing(v);
  }

  /** After the memory table changed: rings that only lacked memory can start now. */
  private startWaiting(): void {
    for (const v of [...this.waitingForConfig]) this.startIfWaiting(v);
  }

  /**
   * Memory is about to change under running rings: stop taking requests,
   * let those in flight finish (their buffers live in the old mapping),
   * change it, then restart the rings against the new mapping. Synchronous
   * when no ring runs.
   */
  private withRingsQuiesced(change: () => void): Maybe {
    const running = this.vrings.filter((v) => v.started);
    const apply = (): void => {
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
    };
    if (!running.length) return apply();
    return (async () => {
      for (const v of running) await v.quiesce();
      // Closed while waiting: close() released the memory; changing it now would leak the new table.
      if (this.io.closed) throw new ConnectionClosed();
      apply();
    })();
  }

  /** One region and the count: with hundreds of slots, logging the whole table each time would be quadratic. */
  private logRegion(what: string, r: MemRegion): void {
    this.log.info({ gpa: `0x${r.guestPhysAddr.toString(16)}`, size: Number(r.memorySize), offset: Number(r.mmapOffset), regions: this.mem.regionCount }, what);
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

  // ---- config space, inflight area, net ----

  getConfig(msg: Message): void {
    const c = decodeConfig(msg.request, msg.payload);
    const data = this.device.readConfig(c.offset, c.size);
    if (!data) this.log.warn({ offset: c.offset, size: c.size }, 'GET_CONFIG: range not readable');
    // An empty payload is the protocol's way to report failure.
    this.io.send(msg.request, data ? encodeConfig({ ...c, data }) : new Uint8Array(0));
  }

  setConfig(msg: Message): void {
    const c = decodeConfig(msg.request, msg.payload);
    const err = this.device.writeConfig(c.offset, c.data);
    if (err) this.log.warn({ offset: c.offset, size: c.size, reason: err }, 'SET_CONFIG refused');
    this.io.ack(msg, !err);
  }

  getInflightFd(msg: Message): void {
    const m = decodeInflight(msg.payload);
    if (m.numQueues < 1 || m.numQueues > this.vrings.length || m.queueSize < 1 || m.queueSize > this.device.maxQueueSize) {
      throw new ProtocolError(`GET_INFLIGHT_FD: ${m.numQueues} queues of ${m.queueSize} is outside what the device offers`);
    }
    const size = m.numQueues * inflightQueueBytes(m.queueSize);
    // A fresh, zeroed area; the front-end keeps it across our restarts and hands it back.
    const fd = native.memfdCreate('vhostd-inflight', MFD_CLOEXEC);
    try {
      ftruncateSync(fd, size);
      this.io.send(msg.request, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: m.numQueues, queueSize: m.queueSize }), [fd]);
    } finally {
      native.close(fd);
    }
  }

  /** SET_BACKEND_REQ_FD: the channel for the back-end's own requests (config changes). */
  setBackendReqFd(msg: Message): void {
    this.backend?.close();
    this.backend = new BackendChannel(msg.fds.pop()!, (this.ackedProtocol & bit(ProtocolFeature.REPLY_ACK)) !== 0n);
    const channel = this.backend;
    this.device.setConfigNotifier?.(async () => {
      if (!(this.ackedProtocol & bit(ProtocolFeature.CONFIG))) return 'the front-end did not negotiate CONFIG';
      const why = await channel.request(BackendReq.CONFIG_CHANGE_MSG);
      if (why) this.log.warn({ reason: why }, 'CONFIG_CHANGE_MSG failed');
      else this.log.info('front-end told of the config change');
      return why;
    });
    this.io.ack(msg, true);
  }

  private closeBackendChannel(): void {
    this.device.setConfigNotifier?.(undefined);
    this.backend?.close();
    this.backend = undefined;
  }

  setInflightFd(msg: Message): void {
    const m = decodeInflight(msg.payload);
    // Refusals leave the fd in msg.fds, where the connection closes it.
    if (this.vrings.some((v) => v.started)) throw new ProtocolError('SET_INFLIGHT_FD while rings are running');
    if (m.numQueues > this.vrings.length) {
      throw new ProtocolError(`SET_INFLIGHT_FD: ${m.numQueues} queues, the device has ${this.vrings.length}`);
    }
    this.inflight?.close();
    this.inflight = undefined;
    this.inflight = new InflightArea(msg.fds.pop()!, m.mmapSize, m.mmapOffset, m.numQueues, m.queueSize);
    this.vrings.forEach((v, i) => (v.inflightRecord = this.inflight!.queue(i)));
    this.io.ack(msg, true);
  }

  netSetMtu(msg: Message): void {
    const mtu = decodeU64(msg.payload);
    const err =
      mtu > 0xffffn ? `MTU ${mtu} is out of range`
      : this.device.setMtu ? this.device.setMtu(Number(mtu))
      : 'this device has no MTU';
    if (err) this.log.warn({ mtu: mtu.toString(), reason: err }, 'NET_SET_MTU refused');
    this.io.ack(msg, !err);
  }

  sendRarp(msg: Message): void {
    this.device.sendRarp?.(msg.payload.slice(0, 6));
    this.io.ack(msg, true);
  }

  // ---- device status ----

  /**
   * SET_STATUS. FEATURES_OK stays clear unless features were negotiated (the
   * driver reads the status back and gives up). Status 0 resets the device:
   * every ring stops and drains, as GET_VRING_BASE would stop it, keeping its
   * next avail index, because QEMU 7.2 sends 0 on every stop of the VM and
   * only then GET_VRING_BASE. Config space (the cache mode the guest chose) is
   * kept for the same reason: a paused and resumed guest never sets it again.
   */
  setStatus(msg: Message): Maybe {
    const s = decodeU64(msg.payload);
    if (s > 0xffn) throw new ProtocolError(`SET_STATUS: 0x${s.toString(16)} is not a status byte`);
    let status = Number(s) & ~Status.DEVICE_NEEDS_RESET; // the device's bit, never the driver's
    if (status === 0) {
      this.status = 0;
      return then(this.stopAll(), this.ackIfOpen(msg));
    }
    if (status & Status.FEATURES_OK && !this.featuresSet) {
      this.log.warn({ status }, 'SET_STATUS: FEATURES_OK before SET_FEATURES; left clear');
      status &= ~Status.FEATURES_OK;
    }
    if (status & Status.FAILED && !(this.status & Status.FAILED)) this.log.warn({ status }, 'the driver gave up on the device (status FAILED)');
    this.status = status;
    this.io.ack(msg, true);
  }

  /** GET_STATUS: what the driver set, with DEVICE_NEEDS_RESET while a ring has failed. */
  getStatus(msg: Message): void {
    const needsReset = this.vrings.some((v) => v.failed !== undefined);
    this.io.send(msg.request, encodeU64(BigInt(this.status | (needsReset ? Status.DEVICE_NEEDS_RESET : 0))));
  }

  /** Stop every running ring (drained, its next avail index kept); synchronous when none runs. */
  private stopAll(): Maybe {
    const running = this.vrings.filter((v) => v.started);
    if (!running.length) return;
    return (async () => {
      for (const v of running) {
        this.waitingForConfig.delete(v);
        await v.stop();
        if (this.io.closed) throw new ConnectionClosed();
        await this.device.stopQueue(v.index, v.report);
      }
      this.log.debug({ queues: running.length }, 'rings stopped (device status 0 or reset)');
    })();
  }

  // ---- resets and teardown ----

  /** RESET_DEVICE: back to the state after SET_OWNER. Synchronous when no ring runs. */
  private reset(): Maybe {
    const finish = (): void => {
      for (const v of this.vrings) v.reset();
      this.waitingForConfig.clear();
      this.device.reset();
      this.closeLog();
      this.inflight?.close();
      this.inflight = undefined;
      // With CONFIGURE_MEM_SLOTS QEMU only ever sends changes to the table it
      // believes we hold, so keep it; otherwise the next SET_MEM_TABLE brings it.
      if (!(this.ackedProtocol & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS))) this.mem.clear();
      this.ackedFeatures = 0n;
      this.featuresSet = false;
      this.status = 0;
    };
    // A connection that closed while rings drained: close() finishes the teardown.
    return then(this.stopAll(), finish);
  }

  /** The connection is gone: stop the rings, wait for I/O into guest memory, release everything. */
  async teardown(): Promise<void> {
    this.waitingForConfig.clear();
    try {
      for (const v of this.vrings) {
        if (v.started) {
          await v.stop();
          await this.device.stopQueue(v.index, v.report);
        }
        v.reset();
      }
      this.device.reset();
    } catch (e) {
      this.log.error({ err: e }, 'error while stopping rings');
    }
    this.mem.clear();
    this.closeLog();
    this.inflight?.close();
    this.inflight = undefined;
    this.closeBackendChannel();
  }
}

