// Entry of a queue thread (see queue-thread.ts): mirrors the daemon's guest
// memory, runs one executor per started queue with the device's runner, and
// answers a stop once the executor has drained and let go of memory and fds.
import { CounterSet, RING_COUNTERS } from './counters.js';
import { parentPort, workerData } from 'node:worker_threads';
import { pino } from 'pino';
import { QueueExecutor, RingError, type QueueLogger, type QueueRunner } from './executor.js';
import { DirtyLog, type SharedLog } from './dirty-log.js';
import { GuestMemory } from './guest-memory.js';
import { InflightQueue } from './inflight.js';
import type { FromThread, ThreadInit, ToThread } from './queue-thread.js';
import { native } from '../native/index.js';

const init = workerData as ThreadInit;
const port = parentPort!;
// Synchronous writes of whole lines to the daemon's stdout, like its own logger.
const log = pino({ name: 'vhostd', level: init.logLevel }, pino.destination({ dest: 1, sync: true })).child({ thread: init.name });
const { createRunner } = (await import(init.runner)) as { createRunner(log: QueueLogger): QueueRunner };
const runner = createRunner(log);
const mem = new GuestMemory();
let memVersion = -1;
const executors = new Map<number, QueueExecutor>();
/** Views of the daemon's inflight records, per queue, while its executor runs (detached at its stop). */
const inflightViews = new Map<number, ArrayBuffer>();

/** Views of the daemon's dirty logs by version, and the queues marking each (detached when none does). */
const logs = new Map<number, { buffer: ArrayBuffer; log: DirtyLog; users: Set<number> }>();
const logOf = new Map<number, number>();

const post = (m: FromThread): void => port.postMessage(m);

/** Point queue `index` at `shared` (or at no log), letting go of the view it used before. */
function useLog(index: number, exec: QueueExecutor | undefined, shared: SharedLog | undefined, logAddr: number | undefined): void {
  const next = exec && shared ? shared.version : undefined;
  if (logOf.get(index) !== next) releaseLog(index);
  let entry;
  if (next !== undefined) {
    entry = logs.get(next);
    if (!entry) {
      const buffer = native.view(shared!.address, shared!.length);
      entry = { buffer, log: new DirtyLog(new Uint8Array(buffer)), users: new Set<number>() };
      logs.set(next, entry);
    }
    entry.log.kick = shared!.kick;
    entry.users.add(index);
    logOf.set(index, next);
  }
  exec?.setLog(entry?.log, logAddr);
}

function releaseLog(index: number): void {
  const version = logOf.get(index);
  if (version === undefined) return;
  logOf.delete(index);
  const entry = logs.get(version)!;
  entry.users.delete(index);
  if (entry.users.size) return;
  native.detach(entry.buffer);
  logs.delete(version);
}

function start(m: Extract<ToThread, { op: 'start' }>): void {
  const index = m.cfg.index;
  if (executors.has(index)) throw new Error(`queue ${index} is already running here`);
  if (m.memoryVersion !== memVersion) {
    // The daemon changes memory only with every executor halted (and so none here).
    if (executors.size) throw new Error(`memory table changed under running queues ${[...executors.keys()].join(', ')}`);
    mem.mirror(m.memory);
    memVersion = m.memoryVersion;
  }
  const qlog = log.child(m.logBindings);
  let exec: QueueExecutor;
  try {
    exec = new QueueExecutor(m.cfg, mem, qlog, inflightFor(m), new CounterSet(RING_COUNTERS, m.counters));
  } catch (e) {
    if (!(e instanceof RingError)) throw e;
    qlog.error({ queue: index, reason: e.message }, 'virtqueue failed; it stays stopped until the front-end resets it');
    if (m.cfg.err >= 0) native.write(m.cfg.err, new BigUint64Array([1n]));
    post({ op: 'failed', index, reason: e.message });
    releaseMemoryIfIdle();
    return;
  }
  exec.onFail = (reason) => post({ op: 'failed', index, reason });
  exec.pollUs = m.pollUs;
  useLog(index, exec, m.log, m.cfg.logAddr);
  executors.set(index, exec);
  try {
    exec.start(runner, m.setup, m.fresh);
  } catch (e) {
    if (!(e instanceof RingError)) throw e;
    exec.fail(e.message);
  }
}

/** A view of the queue's inflight record; a resume goes on with the numbering the record holds. */
function inflightFor(m: Extract<ToThread, { op: 'start' }>): InflightQueue | undefined {
  if (!m.inflight) return undefined;
  const buffer = native.view(m.inflight.address, m.inflight.length);
  inflightViews.set(m.cfg.index, buffer);
  const q = new InflightQueue(new DataView(buffer), m.inflight.capacity);
  if (!m.fresh) q.resumeNumbering(m.cfg.size);
  return q;
}

function releaseInflight(index: number): void {
  const b = inflightViews.get(index);
  if (b) native.detach(b);
  inflightViews.delete(index);
}

/** Nothing of guest memory may stay visible here once no executor runs: the daemon may unmap it next. */
function releaseMemoryIfIdle(): void {
  if (executors.size) return;
  mem.clear();
  memVersion = -1;
}

async function stop(index: number, seq: number): Promise<void> {
  const exec = executors.get(index);
  let base: number | undefined;
  let report: unknown;
  try {
    if (exec) {
      base = await exec.stop();
      report = runner.stop(exec);
    }
  } finally {
    executors.delete(index);
    releaseLog(index);
    releaseInflight(index);
    releaseMemoryIfIdle();
    post({ op: 'stopped', index, seq, base, report });
  }
}

async function handle(m: ToThread): Promise<void> {
  if (m.op === 'start') return start(m);
  const exec = executors.get(m.index);
  switch (m.op) {
    case 'stop':
      return stop(m.index, m.seq);
    case 'enable':
      exec?.setEnabled(m.on);
      post({ op: 'done', index: m.index, seq: m.seq });
      return;
    case 'call':
    case 'err':
      // From now on the executor writes the new fd; the daemon closes the old one after this answer.
      if (m.op === 'call') exec?.setCall(m.fd);
      else exec?.setErr(m.fd);
      post({ op: 'done', index: m.index, seq: m.seq });
      return;
    case 'log':
      // From now on the executor marks the new log only; the daemon may unmap the old one after this answer.
      useLog(m.index, exec, m.log, m.logAddr);
      post({ op: 'done', index: m.index, seq: m.seq });
      return;
    case 'fail':
      exec?.fail(m.reason);
      return;
  }
}

port.on('message', (m: ToThread) => {
  handle(m).catch((e: unknown) => {
    const index = m.op === 'start' ? m.cfg.index : m.index;
    log.error({ queue: index, op: m.op, err: e }, 'internal error in a queue thread');
    const exec = executors.get(index);
    if (exec) exec.fail(`internal error: ${(e as Error).message}`);
    else post({ op: 'failed', index, reason: `internal error: ${(e as Error).message}` });
  });
});
