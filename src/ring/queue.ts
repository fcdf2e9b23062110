// One virtqueue as the protocol layer drives it: the configuration the
// front-end sends, the fds it owns, and one lifecycle, wherever the data path
// runs. The placement (placement.ts) supplies a QueueHost that runs the
// executor on this thread or on a queue thread; the lifecycle is the same.
//
//   idle ──start──▶ running ──quiesce──▶ draining ──▶ paused ──resume──▶ running
//                      │  (enable/disable change nothing here)
//                      └──fail──▶ failed   (quiesce keeps it failed)
//   any started state ──stop──▶ draining ──▶ idle
//
// stop (GET_VRING_BASE) drains from any started state back to idle; a failed
// queue serves nothing until its kick fd is sent again.
import type { RingFeatures } from '../features.js';
import { native } from '../native/index.js';
import type { LogArea } from './dirty-log.js';
import type { RingConfig, QueueLogger } from './executor.js';
import type { GuestMemory } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import type { RingAddresses } from './split-ring.js';

export type QueueState = 'idle' | 'running' | 'failed' | 'draining' | 'paused';

/** Where a queue's executor runs; the placement decides (this thread, or a queue thread). */
export interface QueueHost {
  /** Start the executor with this configuration. A ring that cannot start reports through onFailed. */
  start(cfg: RingConfig, inflight: InflightQueue | undefined, fresh: boolean, log: LogArea | undefined): void;
  /**
   * Drain and let go of guest memory and every fd. Resolves to the next avail
   * index; undefined when no executor was running; 'lost' when it died with the ring.
   */
  halt(): Promise<number | 'lost' | undefined>;
  setEnabled(on: boolean): void | Promise<void>;
  /** Once this settles, the executor writes the new fd and never the old one. */
  setFd(which: 'call' | 'err', fd: number): void | Promise<void>;
  /** Once this settles, the executor marks its writes in `log` (undefined: marks nothing) and no other log. */
  setLog(log: LogArea | undefined, logAddr: number | undefined): void | Promise<void>;
  /** Fail the running executor (it logs, signals err, and reports). */
  fail(reason: string): void;
  /** What the device's runner said when the executor last stopped. */
  readonly report: unknown;
  /** Called with the reason whenever the executor fails. */
  onFailed: ((reason: string) => void) | undefined;
}

/** The protocol layer's view of one virtqueue. */
export interface Virtqueue {
  readonly index: number;
  size: number;
  base: number;
  addrs: RingAddresses | undefined;
  /** Shared record of chains in flight (INFLIGHT_SHMFD), set before the ring starts. */
  inflightRecord: InflightQueue | undefined;
  /** log_guest_addr of SET_VRING_ADDR when its log flag was set. */
  logAddr: number | undefined;
  readonly enabled: boolean;
  readonly state: QueueState;
  /** Set when the ring is unusable until the front-end reconfigures it. */
  readonly failed: string | undefined;
  /** Between start() and stop(). */
  readonly started: boolean;
  /** Whether everything a start needs has arrived. */
  readonly configured: boolean;
  /** What the device's runner reported when the ring last stopped. */
  readonly report: unknown;
  /** Once this settles, the data path runs by the new state. */
  setEnabled(on: boolean): void | Promise<void>;
  setKick(fd: number | null): void;
  /** A new call fd; once this settles, no signal goes to the old one. */
  setCall(fd: number | null): void | Promise<void>;
  setErr(fd: number | null): void | Promise<void>;
  /** Dirty logging on (a log) or off; once this settles, nothing marks any earlier log. */
  setLog(log: LogArea | undefined): void | Promise<void>;
  /** Start on its kick; a ring that cannot start fails (the queue, not the caller). */
  start(features: RingFeatures): void;
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

const ONE = new BigUint64Array([1n]);

export class Queue implements Virtqueue {
  size = 0;
  base = 0;
  addrs: RingAddresses | undefined;
  enabled = false;
  inflightRecord: InflightQueue | undefined;
  logAddr: number | undefined;
  failed: string | undefined;

  private current: QueueState = 'idle';
  private kickFd = -1;
  private kickReady = false;
  private callFd = -1;
  private errFd = -1;
  private features: RingFeatures | undefined;
  private dirtyLog: LogArea | undefined;
  /** The host holds the ring (between host.start and host.halt). */
  private hosted = false;
  /** A halt on its way: whoever else needs the ring stopped waits for the same one. */
  private halting: Promise<void> | undefined;

  constructor(
    readonly index: number,
    private readonly mem: GuestMemory,
    private readonly host: QueueHost,
    private readonly log: QueueLogger,
  ) {
    host.onFailed = (reason) => this.executorFailed(reason);
  }

  get state(): QueueState {
    return this.current;
  }

  get started(): boolean {
    return this.current !== 'idle';
  }

  get report(): unknown {
    return this.host.report;
  }

  get configured(): boolean {
    return this.kickReady && this.size > 0 && this.addrs !== undefined && this.mem.regionCount > 0;
  }

  setEnabled(on: boolean): void | Promise<void> {
    this.enabled = on;
    if (this.hosted && !this.halting) return this.host.setEnabled(on);
  }

  setKick(fd: number | null): void {
    // Only with the ring idle (the protocol stops a running one first): no executor holds the old fd.
    if (this.started) throw new Error(`queue ${this.index}: kick fd replaced while ${this.current}`);
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd ?? -1;
    this.kickReady = true;
  }

  setCall(fd: number | null): void | Promise<void> {
    return this.replaceFd('call', fd);
  }

  setErr(fd: number | null): void | Promise<void> {
    return this.replaceFd('err', fd);
  }

  setLog(log: LogArea | undefined): void | Promise<void> {
    this.dirtyLog = log;
    // A halt in progress may still mark the old log; the next start takes the new one.
    if (this.halting) return this.halting;
    if (this.hosted) return this.host.setLog(log, this.logAddr);
  }

  /** The executor switches first; the old fd is closed once it no longer writes it. */
  private replaceFd(which: 'call' | 'err', fd: number | null): void | Promise<void> {
    const old = which === 'call' ? this.callFd : this.errFd;
    const next = fd ?? -1;
    if (which === 'call') this.callFd = next;
    else this.errFd = next;
    const close = (): void => {
      if (old >= 0) native.close(old);
    };
    // A halt in progress may still signal the old fd: close it only once the executor let go.
    if (this.halting) return this.halting.then(close);
    if (!this.hosted) {
      // No executor: a late call fd still hears once, for completions it missed.
      if (which === 'call' && next >= 0) native.write(next, ONE);
      return close();
    }
    const r = this.host.setFd(which, next);
    if (r instanceof Promise) return r.then(close);
    close();
  }

  private config(): RingConfig {
    return {
      index: this.index,
      size: this.size,
      base: this.base,
      addrs: this.addrs!,
      features: this.features!,
      enabled: this.enabled,
      kick: this.kickFd,
      call: this.callFd,
      err: this.errFd,
      logAddr: this.logAddr,
    };
  }

  start(features: RingFeatures): void {
    if (this.started) throw new Error(`queue ${this.index}: start while ${this.current}`);
    this.features = features;
    this.failed = undefined;
    this.current = 'running';
    this.launch(true);
  }

  private launch(fresh: boolean): void {
    this.hosted = true;
    this.host.start(this.config(), this.inflightRecord, fresh, this.dirtyLog);
  }

  private executorFailed(reason: string): void {
    this.failed ??= reason;
    if (this.current === 'running') this.current = 'failed';
  }

  /** Drain the executor and let it go; the next avail index comes back. */
  private halt(): Promise<void> {
    if (this.halting) return this.halting;
    if (!this.hosted) return Promise.resolve();
    this.halting = (async () => {
      try {
        const next = await this.host.halt();
        // A thread that died with the ring: what the guest saw completed is all that is known.
        if (next === 'lost') this.base = this.usedIndex() ?? this.base;
        else if (next !== undefined) this.base = next;
      } finally {
        this.hosted = false;
        this.halting = undefined;
      }
    })();
    return this.halting;
  }

  /** used->idx as the guest sees it, if the ring is still in guest memory. */
  private usedIndex(): number | undefined {
    const p = this.addrs && this.mem.smallByUva(this.addrs.used, 4);
    return p ? p.bytes[p.offset + 2]! | (p.bytes[p.offset + 3]! << 8) : undefined;
  }

  async quiesce(): Promise<void> {
    if (this.current !== 'running' && this.current !== 'failed') return;
    const wasFailed = this.current === 'failed';
    this.current = 'draining';
    await this.halt();
    if (this.current === 'draining') this.current = wasFailed ? 'failed' : 'paused';
  }

  resume(): void {
    if (this.current !== 'paused') return;
    this.current = 'running';
    this.launch(false);
  }

  async stop(): Promise<number> {
    if (this.current !== 'idle') {
      this.current = 'draining';
      await this.halt();
    }
    this.current = 'idle';
    this.kickReady = false;
    return this.base;
  }

  fail(reason: string): void {
    if (this.failed) return;
    if (this.hosted && !this.halting) {
      // The executor logs it, signals the err fd and reports back.
      this.host.fail(reason);
      this.failed ??= reason;
    } else {
      this.failed = reason;
      this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
      if (this.errFd >= 0) native.write(this.errFd, ONE);
    }
    if (this.current === 'running' || this.current === 'paused') this.current = 'failed';
  }

  reset(): void {
    // Only with the ring idle: no executor holds any of these now.
    if (this.hosted) throw new Error(`queue ${this.index}: reset while ${this.current}`);
    for (const fd of [this.kickFd, this.callFd, this.errFd]) if (fd >= 0) native.close(fd);
    this.kickFd = this.callFd = this.errFd = -1;
    this.kickReady = false;
    this.size = 0;
    this.base = 0;
    this.addrs = undefined;
    this.enabled = false;
    this.failed = undefined;
    this.inflightRecord = undefined;
    this.logAddr = undefined;
    this.dirtyLog = undefined;
    this.current = 'idle';
  }
}
