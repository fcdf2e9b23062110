// Runs one queue's data path on the thread it was placed on: watches the kick
// fd, hands chains to the device's handler within a per-turn budget and a
// bound on what the queue holds in flight, publishes completions, decides on
// notifications, and drains on request. It borrows every fd (the queue's
// lifecycle owns them) and never decides the queue's state: it reports.
import {
  MAX_INFLIGHT_BYTES,
  MAX_INFLIGHT_SEGMENTS,
  POLL_INTERVAL_MS,
  RUN_BUDGET_CHAINS,
  RUN_BUDGET_DESCRIPTORS,
} from '../limits.js';
import type { RingFeatures } from '../features.js';
import { native, errnoError, POLL_READABLE, EAGAIN, type WatchHandle } from '../native/index.js';
import { CounterSet, latencyBucket, RC, RING_COUNTERS } from './counters.js';
import type { DescriptorChain } from './chain.js';
import type { DirtyLog } from './dirty-log.js';
import type { GuestMemory } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import { RingError, type Ring } from './ring.js';

export { RingError };
import { SplitRing, type RingAddresses } from './split-ring.js';
import { microtask } from '../microtask.js';

/**
 * What a device may do with a chain the ring layer found malformed:
 * - 'fail': nothing (net RX): the queue fails and the chain stays in the ring;
 * - 'status': every chain must end in a writable status byte (blk); a
 *   malformed one is completed with an error status, and one without a status
 *   byte fails the queue and stays in the ring;
 * - 'deliver': the device takes every chain and drops the bad ones (net TX).
 */
export type FaultPolicy = 'fail' | 'status' | 'deliver';

/**
 * Why a handler's run() returned:
 * - 'idle': it took everything there was; notifications are re-armed;
 * - 'waiting': it waits for something outside the ring and will call schedule();
 * - a number n: it needs more than n available entries before it can go on
 *   (net RX gathering buffers for a frame): the driver is asked to notify then.
 */
export type RunResult = 'idle' | 'waiting' | number;

export interface QueueHandler {
  run(): RunResult;
  readonly faults: FaultPolicy;
  /** Keep taking chains while started but disabled (net TX, whose packets are then discarded). */
  readonly serveWhileDisabled?: boolean;
  /** Called while the executor busy-polls (--poll-us): finish whatever completed meanwhile (blk: reap io_uring). */
  poll?(): void;
}

/** A device's data path, as every placement runs it. */
export interface QueueRunner {
  /** A queue starts here: return its handler. `setup` is the device's queueSetup(), posted as plain data. */
  start(q: QueueExecutor, setup: unknown): QueueHandler;
  /** The queue stopped and drained; the result goes back to the device (stats, say). */
  stop(q: QueueExecutor): unknown;
}

export interface QueueLogger {
  error(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

/** Everything a ring start needs; plain data, so it can be posted to a queue thread. */
export interface RingConfig {
  index: number;
  size: number;
  base: number;
  addrs: RingAddresses;
  features: RingFeatures;
  enabled: boolean;
  /** Borrowed fds, -1 for none. */
  kick: number;
  call: number;
  err: number;
  /** SET_VRING_ADDR's log_guest_addr, when its log flag was set: where the used ring is, for the dirty log. */
  logAddr?: number | undefined;
}

const ONE = new BigUint64Array([1n]);

/**
 * The ring for a start, by layout: split today (VIRTIO_F_RING_PACKED is not
 * offered); a packed ring will implement the same Ring. Throws RingError for
 * rings outside memory or misaligned: the caller fails the queue.
 */
function createRing(cfg: RingConfig, mem: GuestMemory): Ring {
  return new SplitRing(mem, cfg.size, cfg.addrs, cfg.features, cfg.base);
}

export class QueueExecutor {
  readonly index: number;
  readonly size: number;
  enabled: boolean;
  /** Set once the data path found the ring unusable; it serves nothing more. */
  failed: string | undefined;
  /** Told of a failure (the lifecycle, or a queue thread reporting to the daemon). */
  onFail: ((reason: string) => void) | undefined;

  private readonly ring: Ring;
  private handler: QueueHandler | undefined;
  private kickFd: number;
  private callFd: number;
  private errFd: number;
  private kickWatch: WatchHandle | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  private readonly inflightRecord: InflightQueue | undefined;
  /** Heads an earlier back-end left in flight, to run before anything new. */
  private resubmit: number[] = [];

  // What the queue holds in flight.
  private held = 0;
  private heldSegments = 0;
  private heldBytes = 0;
  private throttled = false;
  private drainWaiters: (() => void)[] = [];

  // This turn's work: a turn is the callback that opened it, and a microtask queued at its first work ends it.
  private turnChains = 0;
  private turnOpen = false;
  /** performance.now() as first read in this turn (see clock()); -1 before. */
  private turnClock = -1;
  private budgetHit = false;
  /** Descriptors resolved this turn. */
  private turnWork = 0;
  private readonly endTurn = (): void => {
    this.turnOpen = false;
    this.turnClock = -1;
    this.turnChains = 0;
    this.turnWork = 0;
    this.ring.takeWork();
  };
  private readonly flushSoon = (): void => this.flushNotify();
  private runScheduled = false;
  private notifyPending = false;
  private notifyScheduled = false;
  private readonly scratch = new BigUint64Array(1);

  /**
   * Busy-poll the avail ring this long (µs) after a run that did work, before
   * re-arming notifications: a driver that answers a completion quickly is
   * served without a kick, at the price of the CPU spent spinning. 0: off.
   */
  pollUs = 0;
  private workedSincePoll = false;

  /** This queue's counters (they outlive the executor: the placement keeps them per queue index). */
  readonly counters: CounterSet;
  private readonly c: Float64Array;
  /** When each head in flight was taken (performance.now()), for the latency histogram. */
  private readonly takenAt: Float64Array;
  /** The dirty log while migration logs writes (VHOST_F_LOG_ALL and a log base); else undefined. */
  private dirty: DirtyLog | undefined;
  /** The used ring's guest physical address, found through the memory table (when log_guest_addr is not given). */
  private readonly usedGpa: number;

  constructor(
    cfg: RingConfig,
    mem: GuestMemory,
    /** The queue's logger: it names the device, the connection and (with queue:) the queue. */
    readonly log: QueueLogger,
    inflight: InflightQueue | undefined,
    counters: CounterSet = new CounterSet(RING_COUNTERS),
  ) {
    this.counters = counters;
    this.c = counters.values;
    this.c[RC.inflight] = 0;
    this.takenAt = new Float64Array(cfg.size);
    this.index = cfg.index;
    this.size = cfg.size;
    this.enabled = cfg.enabled;
    this.kickFd = cfg.kick;
    this.callFd = cfg.call;
    this.errFd = cfg.err;
    this.inflightRecord = inflight;
    this.ring = createRing(cfg, mem);
    this.usedGpa = mem.uvaToGpa(cfg.addrs.used) ?? 0;
    this.setLog(undefined, cfg.logAddr);
  }

  /**
   * Mark every write into guest memory in `log` from now on (undefined: stop).
   * Takes effect between two chains, so a switch mid-flight loses or doubles
   * nothing: a chain completed after it is marked whole.
   */
  setLog(log: DirtyLog | undefined, logAddr: number | undefined): void {
    this.dirty = log;
    this.ring.setLog(log, logAddr ?? this.usedGpa);
  }

  /**
   * Mark what the device wrote into the chain: the first `written` bytes of
   * its writable part, and the status byte, which sits at the end of that
   * part and not always right after what was written before it.
   */
  private logWrites(log: DirtyLog, chain: DescriptorChain, written: number): void {
    let left = written;
    for (let i = chain.readableSegs; i < chain.count && left > 0; i++) {
      const n = Math.min(chain.segs[i]!.length, left);
      log.mark(chain.gpaOf[i]!, n);
      left -= n;
    }
    if (chain.statusWritten) log.mark(chain.statusGpa, 1);
  }

  /**
   * Start serving: recover what a dead back-end left in flight, watch the kick
   * fd and run once, since the driver may have kicked before we listened. A
   * resume after a memory change passes fresh = false.
   */
  start(runner: QueueRunner, setup: unknown, fresh: boolean): void {
    if (fresh && this.inflightRecord) this.recoverInflight();
    // A back-end that died may have published completions without signalling them.
    if (fresh && this.enabled) this.signalCall();
    if (this.kickFd >= 0) {
      const fd = this.kickFd;
      try {
        this.kickWatch = native.watch(fd, POLL_READABLE, () => this.onKick(fd));
      } catch (e) {
        throw new RingError(`kick fd cannot be polled: ${(e as Error).message}`);
      }
    } else {
      this.pollTimer = setInterval(() => this.service(), POLL_INTERVAL_MS);
    }
    // Runs are scheduled, never synchronous: the handler is in place before the first.
    this.handler = runner.start(this, setup);
    this.schedule();
  }

  /** The next entry to take: what GET_VRING_BASE reports. */
  get nextAvail(): number {
    return this.ring.nextAvail;
  }

  get inFlight(): number {
    return this.held;
  }

  /** Chains may be taken: not failed or stopping, and enabled (or serving a disabled ring). */
  get serving(): boolean {
    return !this.failed && !this.stopping && this.handler !== undefined && (this.enabled || this.handler.serveWhileDisabled === true);
  }

  /** Serving and enabled. */
  get active(): boolean {
    return this.serving && this.enabled;
  }

  setEnabled(on: boolean): void {
    this.enabled = on;
    this.schedule();
  }

  /** A new call fd. It hears once at once: completions may have gone unsignalled before it came. */
  setCall(fd: number): void {
    this.callFd = fd;
    this.signalCall();
  }

  setErr(fd: number): void {
    this.errFd = fd;
  }

  private onKick(fd: number): void {
    // Drain the eventfd counter; EAGAIN just means another reader got it.
    const n = native.read(fd, this.scratch);
    if (n < 0 && n !== -EAGAIN) {
      this.fail(errnoError('read kick eventfd', n).message);
      return;
    }
    this.c[RC.kicks]++;
    this.service();
  }

  /** Run the handler soon: at start, on enable, after a budget ran out or when the handler is unblocked. */
  schedule(): void {
    if (this.runScheduled) return;
    this.runScheduled = true;
    setImmediate(() => {
      this.runScheduled = false;
      this.service();
    });
  }

  /** Whether the handler should stop now: the turn's budget is spent, or the in-flight bound reached. */
  get yielding(): boolean {
    return this.budgetHit || this.throttled;
  }

  /**
   * Serve the queue until the handler is idle or waiting (kicks, schedule(),
   * and a device's own readiness callbacks come here); a bug while doing so
   * fails this queue.
   */
  service(): void {
    for (;;) {
      if (!this.serving) return;
      this.budgetHit = false;
      this.throttled = false;
      let r: RunResult;
      try {
        r = this.handler!.run();
      } catch (e) {
        this.log.error({ queue: this.index, err: e }, 'internal error while servicing the queue');
        this.fail(`internal error: ${(e as Error).message}`);
        return;
      }
      if (!this.serving) return;
      if (this.budgetHit) return this.schedule();
      if (this.throttled || r === 'waiting') return; // a completion, or the handler, schedules the next run
      if (this.pollUs > 0 && this.workedSincePoll && this.pollAvail()) continue;
      try {
        if (!this.ring.enableNotifications(r === 'idle' ? 0 : r)) return;
      } catch (e) {
        return this.ringFault(e);
      }
    }
  }

  /**
   * Spin up to pollUs for new avail entries, first sending the notification for
   * what just completed (the driver's next request follows it). With event index
   * the avail_event left from the last re-arm is behind, so the driver does not
   * kick meanwhile. True when entries came.
   */
  private pollAvail(): boolean {
    this.workedSincePoll = false;
    const until = performance.now() + this.pollUs / 1000;
    this.ring.disableNotifications();
    try {
      do {
        if (this.notifyPending) this.flushNotify();
        this.handler!.poll?.();
        if (!this.serving) return false;
        if (this.ring.pending() > 0) {
          this.c[RC.pollHits]++;
          return true;
        }
      } while (performance.now() < until);
    } catch (e) {
      this.ringFault(e);
      return false;
    }
    return false;
  }

  private ringFault(e: unknown): void {
    if (!(e instanceof RingError)) throw e;
    this.fail(e.message);
  }

  /** Whether this turn may do more work; marks the budget spent when not. */
  private withinBudget(): boolean {
    if (!this.turnOpen) {
      this.turnOpen = true;
      // The turn is the callback that opened it: it ends when that callback returns.
      microtask(this.endTurn);
    }
    this.turnWork += this.ring.takeWork();
    if (this.turnChains < RUN_BUDGET_CHAINS && this.turnWork < RUN_BUDGET_DESCRIPTORS) return true;
    this.budgetHit = true;
    return false;
  }

  /** Whether the queue may take another chain without exceeding what it may hold. */
  private roomInFlight(): boolean {
    if (this.heldSegments < MAX_INFLIGHT_SEGMENTS && this.heldBytes < MAX_INFLIGHT_BYTES) return true;
    this.throttled = true;
    return false;
  }

  /** Entries available to take now (0 when the ring is unusable; the queue has failed then). */
  available(): number {
    if (!this.serving) return 0;
    try {
      return this.resubmit.length + this.ring.pending();
    } catch (e) {
      this.ringFault(e);
      return 0;
    }
  }

  /**
   * Take the next chain into `chain`. Returns false when there is none, the
   * budget or the in-flight bound says wait, or the queue cannot be served.
   * A malformed chain is handled by the handler's fault policy: it comes back
   * with chain.fault set, or the queue fails and the chain stays in the ring.
   */
  pop(chain: DescriptorChain): boolean {
    if (!this.serving || !this.withinBudget() || !this.roomInFlight()) return false;
    const resubmitted = this.resubmit.length > 0;
    if (resubmitted) {
      this.ring.chainAt(this.resubmit[0]!, chain);
    } else {
      try {
        if (this.ring.pending() === 0) return false;
        this.ring.peek(0, chain);
      } catch (e) {
        this.ringFault(e);
        return false;
      }
    }
    if (!this.acceptable(chain)) return false;
    if (resubmitted) this.resubmit.shift();
    else this.ring.take(1);
    this.hold(chain);
    return true;
  }

  /**
   * Resolve the k-th available chain without taking it (net RX gathers
   * buffers for one frame, then takes as many as it filled). False when
   * there is no k-th chain, the budget is spent, or it is malformed (the
   * queue has failed then).
   */
  peek(k: number, chain: DescriptorChain): boolean {
    if (!this.serving || !this.withinBudget()) return false;
    if (this.resubmit.length) throw new Error('peek() on a queue with resubmissions pending');
    try {
      if (k >= this.ring.pending()) return false;
      this.ring.peek(k, chain);
    } catch (e) {
      this.ringFault(e);
      return false;
    }
    return this.acceptable(chain);
  }

  /** Take the first n chains peek() returned (chains[0..n-1]). */
  take(chains: readonly DescriptorChain[], n: number): void {
    this.ring.take(n);
    for (let i = 0; i < n; i++) this.hold(chains[i]!);
  }

  private acceptable(chain: DescriptorChain): boolean {
    const policy = this.handler!.faults;
    if (policy === 'status') {
      // Without a status byte no answer can reach the driver: taking the chain would read as success.
      if (chain.statusBytes) return true;
      this.fail(chain.fault ?? `chain at head ${chain.head} has no writable status byte`);
      return false;
    }
    if (!chain.fault || policy === 'deliver') return true;
    this.fail(chain.fault);
    return false;
  }

  private hold(chain: DescriptorChain): void {
    this.inflightRecord?.fetched(chain.head);
    const c = this.c;
    this.workedSincePoll = true;
    c[RC.chains]++;
    if (chain.fault) c[RC.faults]++;
    if (++c[RC.inflight]! > c[RC.inflightPeak]!) c[RC.inflightPeak] = c[RC.inflight]!;
    this.takenAt[chain.head] = this.clock();
    this.held++;
    this.heldSegments += chain.count;
    this.heldBytes += chain.readableBytes + chain.writableBytes;
    this.turnChains++;
  }

  /**
   * The time for the latency histogram. Inside a turn, one reading serves every
   * chain taken or completed in it, so a chain completed in the turn that took it
   * counts zero time (net's whole life) and a packet costs no clock read; outside
   * a turn (a reap of async completions) each call reads the clock.
   */
  private clock(): number {
    if (!this.turnOpen) return performance.now();
    return this.turnClock >= 0 ? this.turnClock : (this.turnClock = performance.now());
  }

  private release(chain: DescriptorChain): void {
    const c = this.c;
    c[RC.completed]++;
    c[RC.inflight]--;
    c[RC.latency + latencyBucket(1000 * (this.clock() - this.takenAt[chain.head]!))]++;
    this.held--;
    this.heldSegments -= chain.count;
    this.heldBytes -= chain.readableBytes + chain.writableBytes;
  }

  /** Complete a taken chain; `written` is the used length. The notification is batched to the end of the turn. */
  complete(chain: DescriptorChain, written: number): void {
    if (this.held === 0) return;
    const rec = this.inflightRecord;
    rec?.completing(chain.head);
    if (this.dirty) this.logWrites(this.dirty, chain, written);
    this.ring.add(chain.head, written);
    this.ring.publish();
    if (rec) {
      rec.done(chain.head);
      rec.caughtUp(this.ring.usedIdx);
    }
    this.release(chain);
    this.completed();
  }

  /** Complete several chains at once (one packet over several buffers): the driver sees all or none. */
  completeMany(chains: readonly DescriptorChain[], written: readonly number[], n: number): void {
    if (this.held < n) return;
    const rec = this.inflightRecord;
    for (let i = 0; i < n; i++) {
      rec?.completing(chains[i]!.head);
      if (this.dirty) this.logWrites(this.dirty, chains[i]!, written[i]!);
      this.ring.add(chains[i]!.head, written[i]!);
    }
    this.ring.publish();
    for (let i = 0; i < n; i++) {
      rec?.done(chains[i]!.head);
      this.release(chains[i]!);
    }
    rec?.caughtUp(this.ring.usedIdx);
    this.completed();
  }

  private completed(): void {
    this.notifyPending = true;
    if (!this.notifyScheduled) {
      // One call for every completion of this callback (a run turn, a reap), sent
      // as it returns: a setImmediate would cost the loop a check phase per I/O.
      this.notifyScheduled = true;
      microtask(this.flushSoon);
    }
    if (this.held === 0) this.resolveDrain();
    // Room again after the in-flight bound stopped us: go on.
    if (this.throttled && this.heldSegments < MAX_INFLIGHT_SEGMENTS && this.heldBytes < MAX_INFLIGHT_BYTES) {
      this.throttled = false;
      this.schedule();
    }
  }

  /** The handler took its share of this turn: serve the loop's other work, then run again. */
  yieldTurn(): void {
    this.budgetHit = true;
  }

  /** Send the call for what completed so far now, rather than as the callback returns. */
  notifyNow(): void {
    if (this.notifyPending) this.flushNotify();
  }

  private flushNotify(): void {
    this.notifyScheduled = false;
    if (!this.notifyPending) return;
    this.notifyPending = false;
    const log = this.dirty;
    if (log?.dirtied && log.kick >= 0) {
      log.dirtied = false;
      native.write(log.kick, ONE);
    }
    if (this.callFd < 0) return;
    if (this.ring.needsNotify()) this.signalCall();
    else this.c[RC.suppressed]++;
  }

  private signalCall(): void {
    if (this.callFd < 0) return;
    this.c[RC.calls]++;
    const n = native.write(this.callFd, ONE);
    if (n < 0 && n !== -EAGAIN) this.log.warn({ queue: this.index, errno: -n }, 'cannot signal call eventfd');
  }

  /** Stop serving: log, signal the err fd, tell the owner. Chains in flight still complete. */
  fail(reason: string): void {
    if (this.failed) return;
    this.failed = reason;
    this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (this.errFd >= 0) native.write(this.errFd, ONE);
    this.onFail?.(reason);
  }

  /**
   * Stop taking chains, wait until those in flight are completed and
   * signalled, and let go of the kick fd. Resolves to the next avail index.
   */
  async stop(): Promise<number> {
    this.stopping = true;
    this.stopWatching();
    if (this.held > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    this.flushNotify();
    return this.ring.nextAvail;
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

  /**
   * Chains taken but never completed by an earlier back-end come first. The
   * front-end restores the avail index to used->idx after a crash, so the next
   * new chain is the one after those still in flight.
   */
  private recoverInflight(): void {
    const ring = this.ring;
    const r = this.inflightRecord!.start(this.size, ring.usedIdx);
    if (r.reason) this.log.warn({ queue: this.index, reason: r.reason }, 'inflight record reset');
    if (!r.recovered) return;
    this.resubmit = r.resubmit;
    const next = (ring.usedIdx + r.resubmit.length) & 0xffff;
    if (next !== ring.nextAvail || r.resubmit.length) {
      this.log.info({ queue: this.index, resubmit: r.resubmit.length, base: ring.nextAvail, next }, 'resuming requests left in flight');
    } else {
      this.log.debug({ queue: this.index, base: ring.nextAvail }, 'inflight record: nothing left in flight');
    }
    ring.rewindTo(next);
  }
}
