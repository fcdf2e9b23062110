// One virtqueue as the front-end configures it: size, base, addresses, the
// kick/call/err eventfds and the enable bit. It starts when it has all of
// them, tells its handler when the driver kicks, counts chains in flight so a
// stop can wait for them, and signals the driver through the call fd.
import { native, errnoError, POLL_READABLE, EAGAIN, type WatchHandle } from '../native/index.js';
import { GuestMemory } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import { Chain, RingError, SplitRing, type RingAddresses, type RingFeatures } from './split-ring.js';

export interface VringHandler {
  /** The driver published new chains (or the ring just started). */
  kick(): void;
  /**
   * Hand malformed chains to the device (with `chain.error` set) instead of
   * failing the queue; the device must still complete them. Net TX drops
   * them; blk cannot even find a status byte, so it lets the queue fail.
   */
  tolerateBadChains?: boolean;
  /**
   * Keep taking chains while the ring is started but disabled (the handler
   * sees `enabled` false). The spec asks this of a net device's TX ring, whose
   * packets are then discarded; other rings wait until they are enabled.
   */
  serveWhileDisabled?: boolean;
}

/** Whoever runs a queue's data path (the device). */
export interface QueueOwner {
  /** The queue starts on this thread: return who handles its kicks. */
  startQueue(q: Vring): VringHandler;
  /** The queue starts on a queue thread: what that thread's runner needs (posted, so plain data). */
  queueSetup?(index: number): unknown;
}

/**
 * One virtqueue as the protocol layer drives it: its configuration and
 * lifecycle, wherever its data path runs (a Vring here, a RemoteVring on a
 * queue thread).
 */
export interface Virtqueue {
  readonly index: number;
  size: number;
  base: number;
  addrs: RingAddresses | undefined;
  /** Shared record of chains in flight (INFLIGHT_SHMFD), set before the ring starts. */
  inflightRecord: InflightQueue | undefined;
  readonly enabled: boolean;
  /** Set when the ring is unusable until the front-end reconfigures it. */
  readonly failed: string | undefined;
  /** Between start() and stop(). */
  readonly started: boolean;
  /** Whether everything a start needs has arrived. */
  readonly configured: boolean;
  /** Once this settles, the data path runs by the new state. */
  setEnabled(on: boolean): void | Promise<void>;
  setKick(fd: number | null): void;
  /** A new call fd; once this settles, no signal goes to the old one. */
  setCall(fd: number | null): void | Promise<void>;
  setErr(fd: number | null): void | Promise<void>;
  /** Start on its kick; a ring that cannot start fails (the queue, not the caller). */
  start(features: RingFeatures, owner: QueueOwner): void;
  /** GET_VRING_BASE: drain, go silent, resolve to the next avail index. */
  stop(): Promise<number>;
  /** Stop taking chains and drain, keeping the configuration (memory is about to change). */
  quiesce(): Promise<void>;
  /** Continue after quiesce(), through the current memory table. */
  resume(): void;
  /** Mark the queue broken, log it and signal the err fd. */
  fail(reason: string): void;
  /** Release every fd and return to the initial state. */
  reset(): void;
}

export interface VringLogger {
  error(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

/** How long a ring with no kick fd (VRING_NOFD) waits between polls. */
const POLL_INTERVAL_MS = 1;
/**
 * Chains one event-loop turn may take before the queue yields. A driver that
 * republishes as fast as we complete (or a used ring laid over the avail ring)
 * would otherwise starve every other queue and the control socket.
 */
const RUN_BUDGET = 1024;
const ONE = new BigUint64Array([1n]);

export class Vring implements Virtqueue {
  readonly index: number;
  size = 0;
  base = 0;
  addrs: RingAddresses | undefined;
  enabled = false;
  ring: SplitRing | undefined;
  /** Set when the ring is unusable until the front-end reconfigures it. */
  failed: string | undefined;
  /** Shared record of chains in flight (INFLIGHT_SHMFD), set before the ring starts. */
  inflightRecord: InflightQueue | undefined;
  /** Heads an earlier back-end left in flight, to run before anything new. */
  private resubmit: number[] = [];
  /** Told whenever the queue fails (a queue thread reports it to the daemon's side). */
  onFail: ((reason: string) => void) | undefined;

  private kickFd = -1;
  private callFd = -1;
  private errFd = -1;
  private kickWatch: WatchHandle | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private kickReady = false;
  private handler: VringHandler | undefined;
  private features: RingFeatures | undefined;
  private inflight = 0;
  private drainWaiters: (() => void)[] = [];
  private notifyPending = false;
  private notifyScheduled = false;
  private runScheduled = false;
  /** Chains taken in this event-loop turn (reset by an immediate queued at the first). */
  private taken = 0;
  private readonly resetTaken = (): void => {
    this.taken = 0;
  };
  /** After GET_VRING_BASE nothing is popped and the call fd is never written. */
  private stopping = false;
  private readonly scratch = new BigUint64Array(1);

  /**
   * @param borrowedFds the kick/call/err fds belong to someone else (a queue
   *   thread's Vring uses the daemon's): never close them.
   */
  constructor(
    index: number,
    private readonly mem: GuestMemory,
    private readonly log: VringLogger,
    private readonly borrowedFds = false,
  ) {
    this.index = index;
  }

  private release(fd: number): void {
    if (fd >= 0 && !this.borrowedFds) native.close(fd);
  }

  get started(): boolean {
    return this.ring !== undefined;
  }

  get inFlight(): number {
    return this.inflight;
  }

  /** Ready to service: started, enabled and not failed. */
  get active(): boolean {
    return this.ring !== undefined && this.enabled && !this.failed && !this.stopping;
  }

  /** Chains may be taken: active, or started and disabled with a handler that serves that state. */
  private get serving(): boolean {
    return this.ring !== undefined && !this.failed && !this.stopping && (this.enabled || this.handler?.serveWhileDisabled === true);
  }

  setEnabled(on: boolean): void {
    this.enabled = on;
    if (this.started) this.schedule();
  }

  setKick(fd: number | null): void {
    this.closeKick();
    if (fd !== null) this.kickFd = fd;
    this.kickReady = true;
  }

  setCall(fd: number | null): void {
    this.release(this.callFd);
    this.callFd = fd ?? -1;
  }

  setErr(fd: number | null): void {
    this.release(this.errFd);
    this.errFd = fd ?? -1;
  }

  get configured(): boolean {
    return this.kickReady && this.size > 0 && this.addrs !== undefined && this.mem.regionCount > 0;
  }

  /**
   * Start the ring (on its kick): build the ring views, watch the kick fd and
   * process once, since the driver may have kicked before we listened. A
   * queue thread passes fresh = false when it resumes after a memory change.
   */
  start(features: RingFeatures, owner: QueueOwner, fresh = true): void {
    this.features = features;
    this.failed = undefined;
    this.resubmit = [];
    try {
      this.attach(fresh);
      // Runs are scheduled, never synchronous: the handler is in place before the first.
      this.handler = owner.startQueue(this);
    } catch (e) {
      if (!(e instanceof RingError)) throw e;
      this.fail(e.message);
    }
  }

  private attach(fresh: boolean): void {
    this.stopWatching();
    this.stopping = false;
    try {
      this.ring = new SplitRing(this.mem, this.size, this.addrs!, this.features!, this.base);
    } catch (e) {
      this.ring = undefined;
      throw e;
    }
    if (fresh && this.inflightRecord) this.recoverInflight(this.ring);
    // A back-end that died may have published completions without signalling
    // them; one spurious interrupt at start costs nothing and strands nobody.
    if (fresh && this.callFd >= 0 && this.enabled) this.signalCall();
    if (this.kickFd >= 0) {
      const fd = this.kickFd;
      try {
        this.kickWatch = native.watch(fd, POLL_READABLE, () => this.onKick(fd));
      } catch (e) {
        throw new RingError(`kick fd cannot be polled: ${(e as Error).message}`);
      }
    } else {
      this.pollTimer = setInterval(() => this.run(), POLL_INTERVAL_MS);
    }
    this.schedule();
  }

  private onKick(fd: number): void {
    // Drain the eventfd counter; EAGAIN just means another reader got it.
    const n = native.read(fd, this.scratch);
    if (n < 0 && n !== -EAGAIN) {
      this.fail(errnoError('read kick eventfd', n).message);
      return;
    }
    this.run();
  }

  /** Run the handler soon, e.g. at start, when the ring is enabled, or after a run used its budget. */
  schedule(): void {
    if (this.runScheduled) return;
    this.runScheduled = true;
    setImmediate(() => {
      this.runScheduled = false;
      this.run();
    });
  }

  /** Service the queue; a bug while doing so fails this queue, not the daemon. */
  private run(): void {
    if (!this.serving) return;
    try {
      this.handler!.kick();
    } catch (e) {
      this.log.error({ queue: this.index, err: e }, 'internal error while servicing the queue');
      this.fail(`internal error: ${(e as Error).message}`);
    }
  }

  /**
   * Pop the next chain into `chain`. Returns false when there is none or the
   * ring cannot be serviced. A malformed chain or ring fails the queue.
   */
  pop(chain: Chain): boolean {
    if (!this.serving) return false;
    const resubmitted = this.resubmit.shift();
    if (resubmitted !== undefined) {
      this.ring!.chainAt(resubmitted, chain);
    } else {
      try {
        if (!this.ring!.pop(chain)) return false;
      } catch (e) {
        if (e instanceof RingError) {
          this.fail(e.message);
          return false;
        }
        throw e;
      }
      this.inflightRecord?.fetched(chain.head);
    }
    this.inflight++;
    if (this.taken++ === 0) setImmediate(this.resetTaken);
    if (chain.error && !this.handler!.tolerateBadChains) {
      this.complete(chain.head, 0);
      this.fail(chain.error);
      return false;
    }
    return true;
  }

  /**
   * True if more chains arrived while kicks were off, or resubmissions wait:
   * keep going. Once this loop turn has used its budget, a run is scheduled
   * for the next turn instead and this returns false.
   */
  rearm(): boolean {
    if (!this.serving) return false;
    if (this.taken >= RUN_BUDGET) {
      this.schedule();
      return false;
    }
    return this.resubmit.length > 0 || this.ring!.enableKicks();
  }

  /** Complete a popped chain. The notification is batched to the end of this loop turn. */
  complete(head: number, written: number): void {
    const ring = this.ring;
    if (!ring || this.inflight === 0) return;
    const rec = this.inflightRecord;
    rec?.completing(head);
    ring.push(head, written);
    rec?.completed([head], ring.usedIdx);
    this.completed(1);
  }

  /** Complete several chains at once: the driver sees all of them or none. */
  completeMany(heads: readonly number[], written: readonly number[]): void {
    const ring = this.ring;
    if (!ring || this.inflight < heads.length) return;
    const rec = this.inflightRecord;
    for (let i = 0; i < heads.length; i++) {
      rec?.completing(heads[i]!);
      ring.add(heads[i]!, written[i]!);
    }
    ring.publish();
    rec?.completed(heads, ring.usedIdx);
    this.completed(heads.length);
  }

  /** Return the last `n` popped chains to the avail ring unused. */
  unpop(n: number): void {
    if (!this.ring || n === 0) return;
    if (this.inflightRecord) throw new Error('unpop with inflight tracking is not supported');
    this.ring.unpop(n);
    this.inflight -= n;
    if (this.inflight === 0) this.resolveDrain();
  }

  private completed(n: number): void {
    this.inflight -= n;
    this.notifyPending = true;
    if (!this.notifyScheduled) {
      this.notifyScheduled = true;
      setImmediate(() => this.flushNotify());
    }
    if (this.inflight === 0) this.resolveDrain();
  }

  private flushNotify(): void {
    this.notifyScheduled = false;
    if (!this.notifyPending || !this.ring) return;
    this.notifyPending = false;
    if (this.callFd >= 0 && this.ring.needsNotify()) this.signalCall();
  }

  private signalCall(): void {
    const n = native.write(this.callFd, ONE);
    if (n < 0 && n !== -EAGAIN) this.log.warn({ queue: this.index, errno: -n }, 'cannot signal call eventfd');
  }

  /** Mark the queue broken: stop servicing it and tell the front-end through the err fd. */
  fail(reason: string): void {
    if (this.failed) return;
    this.failed = reason;
    this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (this.errFd >= 0) native.write(this.errFd, ONE);
    this.onFail?.(reason);
  }

  /**
   * Stop taking chains and wait until those in flight are completed and
   * signalled. The ring keeps its configuration; resume() continues it.
   */
  async quiesce(): Promise<void> {
    this.stopping = true;
    this.stopWatching();
    if (this.inflight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    this.flushNotify();
    if (this.ring) this.base = this.ring.lastAvail;
  }

  /** Continue after quiesce(), re-reading the ring through the current memory table. */
  resume(): void {
    if (this.ring) this.attach(false);
  }

  /**
   * Chains taken but never completed by an earlier back-end come first. The
   * front-end restores the avail index to used->idx after a crash, so the next
   * new chain is the one after those still in flight.
   */
  private recoverInflight(ring: SplitRing): void {
    const r = this.inflightRecord!.start(this.size, ring.usedIdx);
    if (r.reason) this.log.warn({ queue: this.index, reason: r.reason }, 'inflight record reset');
    if (!r.recovered) return;
    this.resubmit = r.resubmit;
    const next = (ring.usedIdx + r.resubmit.length) & 0xffff;
    if (next !== ring.lastAvail || r.resubmit.length) {
      this.log.info({ queue: this.index, resubmit: r.resubmit.length, base: ring.lastAvail, next }, 'resuming requests left in flight');
    } else {
      this.log.debug({ queue: this.index, base: ring.lastAvail }, 'inflight record: nothing left in flight');
    }
    ring.lastAvail = next;
  }

  /**
   * GET_VRING_BASE: quiesce, then go silent until a new kick fd restarts the
   * ring. Resolves to the next avail index.
   */
  async stop(): Promise<number> {
    await this.quiesce();
    this.ring = undefined;
    this.handler = undefined;
    this.kickReady = false;
    return this.base;
  }

  private resolveDrain(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const w of waiters) w();
  }

  private stopWatching(): void {
    if (this.kickWatch) native.unwatch(this.kickWatch);
    this.kickWatch = undefined;
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = undefined;
  }

  private closeKick(): void {
    this.stopWatching();
    this.release(this.kickFd);
    this.kickFd = -1;
    this.kickReady = false;
  }

  /** Release every fd and return to the initial state. */
  reset(): void {
    this.stopping = true;
    this.closeKick();
    this.setCall(null);
    this.setErr(null);
    this.ring = undefined;
    this.handler = undefined;
    this.size = 0;
    this.base = 0;
    this.addrs = undefined;
    this.enabled = false;
    this.failed = undefined;
    this.inflightRecord = undefined;
    this.resubmit = [];
    this.stopping = false;
    this.notifyPending = false;
  }
}
