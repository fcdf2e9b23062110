// Queues whose data path runs on a worker thread of their own, so that a
// device's queues (net queue pairs) are serviced in parallel.
//
// The daemon's thread keeps the protocol, the mapping of guest memory and
// every fd the front-end sent. A queue thread gets, per ring start: views of
// that mapping (never a mapping of its own), dups of the kick/call/err fds
// (its own to close), the ring's configuration and the device's setup for it.
// It runs an ordinary Vring against them, with the data path a device module
// provides (see QueueRunner). GET_VRING_BASE, memory changes and resets stop
// the thread's ring and wait for its drain before anything it can see is
// unmapped or closed.
import { Worker } from 'node:worker_threads';
import { native } from '../native/index.js';
import type { GuestMemory, SharedRegion } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import type { RingAddresses, RingFeatures } from './split-ring.js';
import type { QueueOwner, Virtqueue, VringHandler, VringLogger, Vring } from './vring.js';

/**
 * A device's data path as a queue thread runs it. The device names a module
 * whose `createRunner()` returns one; the thread calls it once.
 */
export interface QueueRunner {
  /** A queue starts on this thread: return who handles its kicks. `setup` is the device's queueSetup(). */
  start(q: Vring, setup: unknown): VringHandler;
  /** The queue stopped and drained; the result is posted back to the device (stats, say). */
  stop(q: Vring): unknown;
}

export interface QueueThreadOptions {
  /** Module (a file URL) exporting `createRunner(): QueueRunner`. */
  runner: URL;
  /** For the thread's own log lines. */
  logLevel: string;
  /** Names the thread in logs. */
  name: string;
}

/** Daemon to thread. */
export type ToThread =
  | {
      op: 'start';
      index: number;
      size: number;
      base: number;
      addrs: RingAddresses;
      features: RingFeatures;
      enabled: boolean;
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
  | { op: 'stop'; index: number }
  | { op: 'enable'; index: number; on: boolean }
  | { op: 'call' | 'err'; index: number; fd: number }
  | { op: 'fail'; index: number; reason: string };

/** Thread to daemon. */
export type FromThread =
  | { op: 'stopped'; index: number; base: number | undefined; report: unknown }
  | { op: 'failed'; index: number; reason: string };

export interface ThreadInit {
  runner: string;
  logLevel: string;
  name: string;
}

/**
 * One worker thread and the queues it runs. The worker starts with the first
 * ring and lives until close(); a worker that dies fails its queues and is
 * replaced at the next start.
 */
export class QueueThread {
  private worker: Worker | undefined;
  private readonly queues = new Map<number, RemoteVring>();

  constructor(private readonly opts: QueueThreadOptions) {}

  /** Register the daemon-side half of queue `index`. */
  attach(q: RemoteVring): void {
    this.queues.set(q.index, q);
  }

  post(msg: ToThread): void {
    this.spawn().postMessage(msg);
    this.updateRef();
  }

  /**
   * An idle worker must not keep the daemon alive, but a busy one must: the
   * daemon may be waiting for nothing but its answer.
   */
  updateRef(): void {
    const w = this.worker;
    if (!w) return;
    let busy = false;
    for (const q of this.queues.values()) busy ||= q.busy;
    if (busy) w.ref();
    else w.unref();
  }

  private spawn(): Worker {
    if (this.worker) return this.worker;
    const init: ThreadInit = { runner: this.opts.runner.href, logLevel: this.opts.logLevel, name: this.opts.name };
    const w = new Worker(new URL('./queue-thread-worker.js', import.meta.url), { workerData: init, name: this.opts.name });
    w.on('message', (m: FromThread) => {
      this.queues.get(m.index)?.fromThread(m);
      this.updateRef();
    });
    w.on('error', (e) => this.died(w, e));
    w.on('exit', (code) => this.died(w, new Error(`exited with code ${code}`)));
    this.worker = w;
    return w;
  }

  private died(w: Worker, e: Error): void {
    if (this.worker !== w) return;
    this.worker = undefined;
    for (const q of this.queues.values()) q.threadDied(`queue thread ${this.opts.name} died: ${e.message}`);
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = undefined;
    if (w) await w.terminate();
  }
}

/**
 * The daemon-side half of a queue that runs on a QueueThread: it holds the
 * configuration and the front-end's fds, and turns the lifecycle into
 * messages. Mirrors Vring's rules exactly (see there).
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
  private stopWaiter: ((base: number) => void) | undefined;

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

  /** Running on the thread, or waiting for it to stop. */
  get busy(): boolean {
    return this.running || this.stopWaiter !== undefined;
  }

  get configured(): boolean {
    return this.kickReady && this.size > 0 && this.addrs !== undefined && this.mem.regionCount > 0;
  }

  setEnabled(on: boolean): void {
    this.enabled = on;
    if (this.running) this.thread.post({ op: 'enable', index: this.index, on });
  }

  setKick(fd: number | null): void {
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd ?? -1;
    this.kickReady = true;
  }

  setCall(fd: number | null): void {
    this.replaceFd('call', fd);
  }

  setErr(fd: number | null): void {
    this.replaceFd('err', fd);
  }

  /** Keep the new fd; a running ring gets its own dup (it closes the old one). */
  private replaceFd(which: 'call' | 'err', fd: number | null): void {
    const old = which === 'call' ? this.callFd : this.errFd;
    if (old >= 0) native.close(old);
    if (which === 'call') this.callFd = fd ?? -1;
    else this.errFd = fd ?? -1;
    if (!this.running) return;
    let copy: number;
    try {
      [copy] = dupAll([fd ?? -1]) as [number];
    } catch (e) {
      this.fail((e as Error).message);
      return;
    }
    this.thread.post({ op: which, index: this.index, fd: copy });
  }

  start(features: RingFeatures, owner: QueueOwner): void {
    if (!owner.queueSetup) throw new Error(`queue ${this.index} runs on a thread, but its device has no queueSetup()`);
    if (this.inflightRecord) {
      this.isStarted = true;
      this.fail('INFLIGHT_SHMFD is not supported for queues on threads');
      return;
    }
    this.features = features;
    this.setup = owner.queueSetup(this.index);
    this.failed = undefined;
    this.isStarted = true;
    this.launch(true);
  }

  private launch(fresh: boolean): void {
    let fds: number[];
    try {
      fds = dupAll([this.kickFd, this.callFd, this.errFd]);
    } catch (e) {
      this.fail((e as Error).message);
      return;
    }
    const [kick, call, err] = fds as [number, number, number];
    this.running = true;
    this.thread.post({
      op: 'start',
      index: this.index,
      size: this.size,
      base: this.base,
      addrs: this.addrs!,
      features: this.features!,
      enabled: this.enabled,
      kick,
      call,
      err,
      memory: this.mem.shared(),
      memoryVersion: this.mem.version,
      setup: this.setup,
      fresh,
      logBindings: this.log.bindings?.() ?? {},
    });
  }

  /** The thread drains its ring and closes its fds; the next avail index comes back. */
  private async halt(): Promise<void> {
    if (!this.running) return;
    this.running = false;
    this.base = await new Promise<number>((resolve) => {
      this.stopWaiter = resolve;
      this.thread.post({ op: 'stop', index: this.index });
    });
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
      // The thread's ring logs it and signals its err fd, then reports back.
      this.thread.post({ op: 'fail', index: this.index, reason });
      return;
    }
    this.failed = reason;
    this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (this.errFd >= 0) native.write(this.errFd, new BigUint64Array([1n]));
  }

  fromThread(m: FromThread): void {
    if (m.op === 'failed') {
      this.failed ??= m.reason;
    } else if (m.op === 'stopped') {
      this.report = m.report;
      const w = this.stopWaiter;
      this.stopWaiter = undefined;
      w?.(m.base ?? this.base);
    }
  }

  /** The worker is gone, and whatever its ring held with it. */
  threadDied(reason: string): void {
    if (!this.running && !this.stopWaiter) return;
    this.log.error({ queue: this.index, reason }, 'queue thread died');
    this.running = false;
    this.failed ??= reason;
    const w = this.stopWaiter;
    this.stopWaiter = undefined;
    w?.(this.base);
  }

  reset(): void {
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

/** Dups for the thread to own (-1 stays -1); all or none. */
function dupAll(fds: number[]): number[] {
  const out: number[] = [];
  for (const fd of fds) {
    const d = fd < 0 ? -1 : native.dup(fd);
    if (fd >= 0 && d < 0) {
      for (const o of out) if (o >= 0) native.close(o);
      throw new Error(`cannot hand the queue's fds to its thread: dup failed with errno ${-d}`);
    }
    out.push(d);
  }
  return out;
}
