// Queues whose data path runs on a worker thread of their own, so that a
// device's queues (net queue pairs) are serviced in parallel.
//
// The daemon's thread keeps the protocol, the mapping of guest memory and
// every fd the front-end sent; it alone closes them. A queue thread gets, per
// ring start: views of that mapping (never a mapping of its own), the numbers
// of the kick/call/err fds (borrowed), the ring's configuration and the
// device's setup for it. It runs an ordinary Vring against them with the data
// path a device module provides (see QueueRunner). Anything the thread can see
// is unmapped or closed only after the thread has said it let go of it: a stop
// (GET_VRING_BASE, memory changes, resets, disconnects) waits for the thread's
// ring to drain, and a call/err fd swap waits for the thread to switch.
import { Worker } from 'node:worker_threads';
import { native } from '../native/index.js';
import type { GuestMemory, SharedRegion } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import type { RingAddresses, RingFeatures } from './split-ring.js';
import type { QueueOwner, Virtqueue, VringHandler, VringLogger, Vring } from './vring.js';

/**
 * A device's data path as a queue thread runs it. The device names a module
 * whose `createRunner(log)` returns one; the thread calls it once.
 */
export interface QueueRunner {
  /** A queue starts on this thread: return who handles its kicks. `setup` is the device's queueSetup(). */
  start(q: Vring, setup: unknown): VringHandler;
  /** The queue stopped and drained; the result is posted back to the device (stats, say). */
  stop(q: Vring): unknown;
}

export interface QueueThreadOptions {
  /** Module (a file URL) exporting `createRunner(log): QueueRunner`. */
  runner: URL;
  /** For the thread's own log lines. */
  logLevel: string;
  /** Names the thread in logs. */
  name: string;
}

/** Daemon to thread. `seq` asks for an answer carrying it. */
export type ToThread =
  | {
      op: 'start';
      index: number;
      size: number;
      base: number;
      addrs: RingAddresses;
      features: RingFeatures;
      enabled: boolean;
      /** The daemon's fds, -1 for none: the thread uses them and never closes them. */
      kick: number;
      call: number;
      err: number;
      memory: SharedRegion[];
      memoryVersion: number;
      setup: unknown;
      /** A real start (not a resume after a memory change): one catch-up interrupt. */
      fresh: boolean;
      logBindings: Record<string, unknown>;
    }
  | { op: 'stop'; index: number; seq: number }
  | { op: 'call' | 'err'; index: number; fd: number; seq: number }
  | { op: 'enable'; index: number; on: boolean; seq: number }
  | { op: 'fail'; index: number; reason: string };

/** Thread to daemon. */
export type FromThread =
  | { op: 'stopped'; index: number; seq: number; base: number | undefined; report: unknown }
  | { op: 'done'; index: number; seq: number }
  | { op: 'failed'; index: number; reason: string };

export interface ThreadInit {
  runner: string;
  logLevel: string;
  name: string;
}

type Answer = Extract<FromThread, { seq: number }>;

/**
 * One worker thread and the queues it runs. The worker starts with the first
 * ring and lives until close(); a worker that dies fails its queues, answers
 * what they were waiting for, and is replaced at the next start.
 */
export class QueueThread {
  private worker: Worker | undefined;
  private readonly queues = new Map<number, RemoteVring>();
  private readonly pending = new Map<number, { index: number; resolve: (a: Answer | undefined) => void }>();
  private seq = 0;

  constructor(private readonly opts: QueueThreadOptions) {}

  /** Register the daemon-side half of queue `index` (replacing an earlier connection's). */
  attach(q: RemoteVring): void {
    this.queues.set(q.index, q);
  }

  post(msg: ToThread): void {
    this.spawn().postMessage(msg);
    this.updateRef();
  }

  /** Post and wait for the answer; undefined if the worker died first. */
  request(
    msg: { op: 'stop'; index: number } | { op: 'call' | 'err'; index: number; fd: number } | { op: 'enable'; index: number; on: boolean },
  ): Promise<Answer | undefined> {
    const seq = ++this.seq;
    return new Promise((resolve) => {
      this.pending.set(seq, { index: msg.index, resolve });
      this.post({ ...msg, seq } as ToThread);
    });
  }

  /**
   * An idle worker must not keep the daemon alive, but a busy one must: the
   * daemon may be waiting for nothing but its answer.
   */
  private updateRef(): void {
    const w = this.worker;
    if (!w) return;
    let busy = this.pending.size > 0;
    for (const q of this.queues.values()) busy ||= q.busy;
    if (busy) w.ref();
    else w.unref();
  }

  private spawn(): Worker {
    if (this.worker) return this.worker;
    const init: ThreadInit = { runner: this.opts.runner.href, logLevel: this.opts.logLevel, name: this.opts.name };
    const w = new Worker(new URL('./queue-thread-worker.js', import.meta.url), { workerData: init, name: this.opts.name });
    w.on('message', (m: FromThread) => {
      if (this.worker !== w) return; // a dead worker's last words
      if (m.op === 'failed') this.queues.get(m.index)?.threadFailed(m.reason);
      else this.answer(m.seq, m);
      this.updateRef();
    });
    w.on('error', (e) => this.died(w, e));
    w.on('exit', (code) => this.died(w, new Error(`exited with code ${code}`)));
    this.worker = w;
    return w;
  }

  private answer(seq: number, a: Answer | undefined): void {
    const p = this.pending.get(seq);
    this.pending.delete(seq);
    p?.resolve(a);
  }

  private died(w: Worker, e: Error): void {
    if (this.worker !== w) return;
    this.worker = undefined;
    const reason = `queue thread ${this.opts.name} died: ${e.message}`;
    for (const q of this.queues.values()) q.threadDied(reason);
    for (const seq of [...this.pending.keys()]) this.answer(seq, undefined);
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = undefined;
    if (w) await w.terminate();
  }
}

/**
 * The daemon-side half of a queue that runs on a QueueThread: it holds the
 * configuration and owns the front-end's fds, and turns the lifecycle into
 * messages. Mirrors Vring's rules (see there).
 */
export class RemoteVring implements Virtqueue {
  size = 0;
  base = 0;
  addrs: RingAddresses | undefined;
  enabled = false;
  failed: string | undefined;
  inflightRecord: InflightQueue | undefined;
  /** What the thread's runner said when the ring last stopped. */
  report: unknown;

  private kickFd = -1;
  private kickReady = false;
  private callFd = -1;
  private errFd = -1;
  private features: RingFeatures | undefined;
  private setup: unknown;
  private isStarted = false;
  /** The ring runs on the thread (started, not quiesced, not failed at start). */
  private running = false;
  /** A stop on its way: whoever else needs the ring stopped waits for the same one. */
  private halting: Promise<void> | undefined;

  constructor(
    readonly index: number,
    private readonly mem: GuestMemory,
    private readonly thread: QueueThread,
    private readonly log: VringLogger & { bindings?(): Record<string, unknown> },
  ) {
    thread.attach(this);
  }

  get started(): boolean {
    return this.isStarted;
  }

  /** Running on the thread, or being stopped there. */
  get busy(): boolean {
    return this.running || this.halting !== undefined;
  }

  get configured(): boolean {
    return this.kickReady && this.size > 0 && this.addrs !== undefined && this.mem.regionCount > 0;
  }

  /** Settles once the thread's ring has switched, so a reply to the front-end comes after it. */
  async setEnabled(on: boolean): Promise<void> {
    this.enabled = on;
    if (this.running) await this.thread.request({ op: 'enable', index: this.index, on });
  }

  setKick(fd: number | null): void {
    // Only ever called with the ring stopped: the thread holds no kick fd now.
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd ?? -1;
    this.kickReady = true;
  }

  setCall(fd: number | null): Promise<void> {
    return this.replaceFd('call', fd);
  }

  setErr(fd: number | null): Promise<void> {
    return this.replaceFd('err', fd);
  }

  /** A running ring switches first; the old fd is closed once the thread no longer writes it. */
  private async replaceFd(which: 'call' | 'err', fd: number | null): Promise<void> {
    const old = which === 'call' ? this.callFd : this.errFd;
    if (which === 'call') this.callFd = fd ?? -1;
    else this.errFd = fd ?? -1;
    if (this.running) await this.thread.request({ op: which, index: this.index, fd: fd ?? -1 });
    if (old >= 0) native.close(old);
  }

  start(features: RingFeatures, owner: QueueOwner): void {
    if (!owner.queueSetup) throw new Error(`queue ${this.index} runs on a thread, but its device has no queueSetup()`);
    this.isStarted = true;
    this.failed = undefined;
    if (this.inflightRecord) {
      this.fail('INFLIGHT_SHMFD is not supported for queues on threads');
      return;
    }
    this.features = features;
    this.setup = owner.queueSetup(this.index);
    this.launch(true);
  }

  private launch(fresh: boolean): void {
    this.running = true;
    this.thread.post({
      op: 'start',
      index: this.index,
      size: this.size,
      base: this.base,
      addrs: this.addrs!,
      features: this.features!,
      enabled: this.enabled,
      kick: this.kickFd,
      call: this.callFd,
      err: this.errFd,
      memory: this.mem.shared(),
      memoryVersion: this.mem.version,
      setup: this.setup,
      fresh,
      logBindings: this.log.bindings?.() ?? {},
    });
  }

  /** The thread drains its ring and lets go of everything; the next avail index comes back. */
  private halt(): Promise<void> {
    if (this.halting) return this.halting;
    if (!this.running) return Promise.resolve();
    this.running = false;
    this.halting = (async () => {
      const a = await this.thread.request({ op: 'stop', index: this.index });
      if (a?.op === 'stopped') {
        if (a.base !== undefined) this.base = a.base;
        this.report = a.report;
      } else {
        // The thread died with the ring: what the guest saw completed is all that is known.
        this.base = this.usedIndex() ?? this.base;
      }
      this.halting = undefined;
    })();
    return this.halting;
  }

  /** used->idx as the guest sees it, if the ring is still in guest memory. */
  private usedIndex(): number | undefined {
    const p = this.addrs && this.mem.smallByUva(this.addrs.used, 4);
    return p ? p.bytes[p.offset + 2]! | (p.bytes[p.offset + 3]! << 8) : undefined;
  }

  async quiesce(): Promise<void> {
    await this.halt();
  }

  resume(): void {
    if (this.isStarted && !this.running && !this.failed) this.launch(false);
  }

  async stop(): Promise<number> {
    await this.halt();
    this.isStarted = false;
    this.kickReady = false;
    return this.base;
  }

  fail(reason: string): void {
    if (this.failed) return;
    if (this.running) {
      // The thread's ring logs it and signals the err fd, then reports back.
      this.thread.post({ op: 'fail', index: this.index, reason });
      return;
    }
    this.failed = reason;
    this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (this.errFd >= 0) native.write(this.errFd, new BigUint64Array([1n]));
  }

  /** The thread's ring failed (and logged it). */
  threadFailed(reason: string): void {
    if (this.isStarted) this.failed ??= reason;
  }

  /** The worker is gone, and whatever its ring held with it. */
  threadDied(reason: string): void {
    if (!this.running && !this.halting) return;
    this.running = false;
    this.fail(reason);
  }

  reset(): void {
    // Only ever called with the ring stopped: the thread holds none of these now.
    for (const fd of [this.kickFd, this.callFd, this.errFd]) if (fd >= 0) native.close(fd);
    this.kickFd = this.callFd = this.errFd = -1;
    this.kickReady = false;
    this.size = 0;
    this.base = 0;
    this.addrs = undefined;
    this.enabled = false;
    this.failed = undefined;
    this.inflightRecord = undefined;
    this.isStarted = false;
    this.running = false;
  }
}
