// Queue threads: worker threads that run executors, so that a device's queues
// (net queue pairs) are serviced in parallel.
//
// The daemon's thread keeps the protocol, the mapping of guest memory and
// every fd the front-end sent; it alone closes them. A queue thread gets, per
// ring start: views of that mapping (never a mapping of its own), the numbers
// of the kick/call/err fds (borrowed), the ring's configuration and the
// device's setup for it, and runs an ordinary QueueExecutor with the runner
// the device's module provides. Anything the thread can see is unmapped or
// closed only after the thread has said it let go of it: a halt waits for the
// thread's executor to drain, and a call/err fd swap waits for it to switch.
import { CounterSet } from './counters.js';
import { Worker } from 'node:worker_threads';
import type { LogArea, SharedLog } from './dirty-log.js';
import type { RingConfig, QueueLogger } from './executor.js';
import type { GuestMemory, SharedRegion } from './guest-memory.js';
import type { InflightQueue, SharedInflight } from './inflight.js';
import type { QueueHost } from './queue.js';

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
      cfg: RingConfig;
      memory: SharedRegion[];
      memoryVersion: number;
      setup: unknown;
      /** A real start (not a resume after a memory change): recovery and one catch-up interrupt. */
      fresh: boolean;
      logBindings: Record<string, unknown>;
      /** The queue's ring counters (shared, so the daemon reads them live). */
      counters: SharedArrayBuffer;
      pollUs: number;
      /** The queue's INFLIGHT_SHMFD record, as mapped by the daemon (the thread views it). */
      inflight?: SharedInflight;
      /** The dirty log while migration logs writes, as mapped by the daemon. */
      log?: SharedLog;
    }
  | { op: 'log'; index: number; log: SharedLog | undefined; logAddr: number | undefined; seq: number }
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
  private readonly hosts = new Map<number, ThreadHost>();
  private readonly pending = new Map<number, { resolve: (a: Answer | undefined) => void }>();
  private seq = 0;

  constructor(private readonly opts: QueueThreadOptions) {}

  /** Register the host of queue `index` (replacing an earlier connection's). */
  attach(h: ThreadHost): void {
    this.hosts.set(h.index, h);
  }

  post(msg: ToThread): void {
    this.spawn().postMessage(msg);
    this.updateRef();
  }

  /** Post and wait for the answer; undefined if the worker died first. */
  request(
    msg:
      | { op: 'stop'; index: number }
      | { op: 'call' | 'err'; index: number; fd: number }
      | { op: 'enable'; index: number; on: boolean }
      | { op: 'log'; index: number; log: SharedLog | undefined; logAddr: number | undefined },
  ): Promise<Answer | undefined> {
    const seq = ++this.seq;
    return new Promise((resolve) => {
      this.pending.set(seq, { resolve });
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
    for (const h of this.hosts.values()) busy ||= h.busy;
    if (busy) w.ref();
    else w.unref();
  }

  private spawn(): Worker {
    if (this.worker) return this.worker;
    const init: ThreadInit = { runner: this.opts.runner.href, logLevel: this.opts.logLevel, name: this.opts.name };
    const w = new Worker(new URL('./queue-thread-worker.js', import.meta.url), { workerData: init, name: this.opts.name });
    w.on('message', (m: FromThread) => {
      if (this.worker !== w) return; // a dead worker's last words
      if (m.op === 'failed') this.hosts.get(m.index)?.threadFailed(m.reason);
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
    for (const h of this.hosts.values()) h.threadDied(reason);
    for (const seq of [...this.pending.keys()]) this.answer(seq, undefined);
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = undefined;
    if (w) await w.terminate();
  }
}

/** The daemon's side of a queue placed on a QueueThread: the lifecycle's host, as messages. */
export class ThreadHost implements QueueHost {
  onFailed: ((reason: string) => void) | undefined;
  report: unknown;
  /** The executor runs on the thread (between start and the answer to its stop). */
  private running = false;
  private stopping = false;

  constructor(
    readonly index: number,
    private readonly mem: GuestMemory,
    private readonly thread: QueueThread,
    private readonly log: QueueLogger & { bindings?(): Record<string, unknown> },
    private readonly setup: () => unknown,
    private readonly counters: CounterSet,
    private readonly pollUs: number,
  ) {
    thread.attach(this);
  }

  get busy(): boolean {
    return this.running;
  }

  start(cfg: RingConfig, inflight: InflightQueue | undefined, fresh: boolean, log: LogArea | undefined): void {
    this.running = true;
    this.thread.post({
      op: 'start',
      cfg,
      memory: this.mem.shared(),
      memoryVersion: this.mem.version,
      setup: this.setup(),
      fresh,
      logBindings: this.log.bindings?.() ?? {},
      counters: this.counters.buffer,
      pollUs: this.pollUs,
      ...(inflight?.shared && { inflight: inflight.shared }),
      ...(log && { log: log.shared }),
    });
  }

  async halt(): Promise<number | 'lost' | undefined> {
    if (!this.running) return undefined;
    this.stopping = true;
    try {
      const a = await this.thread.request({ op: 'stop', index: this.index });
      if (a?.op !== 'stopped') return 'lost';
      this.report = a.report;
      return a.base;
    } finally {
      this.running = false;
      this.stopping = false;
    }
  }

  async setEnabled(on: boolean): Promise<void> {
    if (this.running && !this.stopping) await this.thread.request({ op: 'enable', index: this.index, on });
  }

  async setFd(which: 'call' | 'err', fd: number): Promise<void> {
    if (this.running && !this.stopping) await this.thread.request({ op: which, index: this.index, fd });
  }

  async setLog(log: LogArea | undefined, logAddr: number | undefined): Promise<void> {
    if (this.running && !this.stopping) await this.thread.request({ op: 'log', index: this.index, log: log?.shared, logAddr });
  }

  fail(reason: string): void {
    if (this.running) this.thread.post({ op: 'fail', index: this.index, reason });
  }

  /** The thread's executor failed (and logged it). */
  threadFailed(reason: string): void {
    this.onFailed?.(reason);
  }

  /** The worker is gone, and whatever its executor held with it. */
  threadDied(reason: string): void {
    if (!this.running) return;
    this.log.error({ queue: this.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    this.onFailed?.(reason);
  }
}
