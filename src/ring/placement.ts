// Where each queue's data path runs. A device supplies one runner (its data
// path) and says which queues belong together (a net queue pair); the
// placement puts each group on the daemon's thread or on one of --threads
// queue threads. Either way the same executor runs the same runner.
import { CounterSet, RING_COUNTERS } from './counters.js';
import type { LogArea } from './dirty-log.js';
import { native } from '../native/index.js';
import { QueueExecutor, RingError, type QueueLogger, type QueueRunner, type RingConfig } from './executor.js';
import type { GuestMemory } from './guest-memory.js';
import type { InflightQueue } from './inflight.js';
import type { QueueHost } from './queue.js';
import { QueueThread, ThreadHost } from './queue-thread.js';

/** What a device tells the placement about its data path. */
export interface QueueRunnerSource {
  /** The runner on the daemon's thread. */
  readonly runner: QueueRunner;
  /** A module exporting `createRunner(log): QueueRunner`, for queue threads; absent if the device cannot run on one. */
  readonly runnerModule?: URL;
  /** Plain data the runner needs for queue `index` at each start (posted to a thread as is). */
  queueSetup(index: number): unknown;
  /** Queues with the same group run on the same thread (default: each queue its own group). */
  queueGroup?(index: number): number;
}

export interface PlacementOptions {
  /** Queue threads; 0 runs every queue on the daemon's thread. */
  threads: number;
  logLevel: string;
  /** Names the threads in logs. */
  name: string;
  /** Busy-poll each queue this long after a burst (µs; 0 or absent: off). */
  pollUs?: number;
}

export class Placement {
  private readonly threads: QueueThread[];
  /** Ring counters per queue index, kept across connections. */
  private readonly counters: CounterSet[] = [];

  constructor(
    private readonly source: QueueRunnerSource,
    private readonly opts: PlacementOptions,
  ) {
    const module = source.runnerModule;
    if (opts.threads > 0 && !module) throw new Error(`${opts.name} queues cannot run on queue threads`);
    this.threads = Array.from({ length: module ? opts.threads : 0 }, (_, i) =>
      new QueueThread({ runner: module!, logLevel: opts.logLevel, name: `${opts.name}-thread-${i}` }),
    );
  }

  get threadCount(): number {
    return this.threads.length;
  }

  /** The host for queue `index` of a connection whose guest memory is `mem`. */
  host(index: number, mem: GuestMemory, log: QueueLogger & { bindings?(): Record<string, unknown> }): QueueHost {
    const setup = (): unknown => this.source.queueSetup(index);
    const counters = this.queueCounters(index);
    const pollUs = this.opts.pollUs ?? 0;
    if (!this.threads.length) return new LocalHost(mem, log, this.source.runner, setup, counters, pollUs);
    const group = this.source.queueGroup?.(index) ?? index;
    return new ThreadHost(index, mem, this.threads[group % this.threads.length]!, log, setup, counters, pollUs);
  }

  /** The ring counters of queue `index` (created at its first use). */
  queueCounters(index: number): CounterSet {
    return (this.counters[index] ??= new CounterSet(RING_COUNTERS));
  }

  /** End the queue threads (after every connection has closed). */
  async close(): Promise<void> {
    await Promise.all(this.threads.map((t) => t.close()));
  }
}

/** A queue whose executor runs on the daemon's own thread. */
export class LocalHost implements QueueHost {
  onFailed: ((reason: string) => void) | undefined;
  report: unknown;
  private exec: QueueExecutor | undefined;

  constructor(
    private readonly mem: GuestMemory,
    private readonly log: QueueLogger,
    private readonly runner: QueueRunner,
    private readonly setup: () => unknown,
    private readonly counters: CounterSet,
    private readonly pollUs: number,
  ) {}

  start(cfg: RingConfig, inflight: InflightQueue | undefined, fresh: boolean, log: LogArea | undefined): void {
    let exec: QueueExecutor;
    try {
      exec = new QueueExecutor(cfg, this.mem, this.log, inflight, this.counters);
    } catch (e) {
      if (!(e instanceof RingError)) throw e;
      return this.startFailed(cfg, e.message);
    }
    exec.onFail = (reason) => this.onFailed?.(reason);
    exec.pollUs = this.pollUs;
    exec.setLog(log?.log, cfg.logAddr);
    this.exec = exec;
    try {
      exec.start(this.runner, this.setup(), fresh);
    } catch (e) {
      if (!(e instanceof RingError)) throw e;
      exec.fail(e.message);
    }
  }

  /** A ring that never ran: say so as an executor would have. */
  private startFailed(cfg: RingConfig, reason: string): void {
    this.log.error({ queue: cfg.index, reason }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (cfg.err >= 0) native.write(cfg.err, new BigUint64Array([1n]));
    this.onFailed?.(reason);
  }

  async halt(): Promise<number | undefined> {
    const exec = this.exec;
    if (!exec) return undefined;
    const next = await exec.stop();
    this.report = this.runner.stop(exec);
    this.exec = undefined;
    return next;
  }

  setEnabled(on: boolean): void {
    this.exec?.setEnabled(on);
  }

  setFd(which: 'call' | 'err', fd: number): void {
    if (which === 'call') this.exec?.setCall(fd);
    else this.exec?.setErr(fd);
  }

  setLog(log: LogArea | undefined, logAddr: number | undefined): void {
    this.exec?.setLog(log?.log, logAddr);
  }

  fail(reason: string): void {
    this.exec?.fail(reason);
  }
}

