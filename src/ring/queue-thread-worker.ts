// Entry of a queue thread (see queue-thread.ts): mirrors the daemon's guest
// memory, runs one Vring per started queue with the device's runner, and
// answers a stop once the ring has drained and let go of memory and fds.
import { parentPort, workerData } from 'node:worker_threads';
import { pino } from 'pino';
import { GuestMemory } from './guest-memory.js';
import type { FromThread, QueueRunner, ThreadInit, ToThread } from './queue-thread.js';
import { Vring, type VringLogger } from './vring.js';

const init = workerData as ThreadInit;
const port = parentPort!;
// Synchronous writes of whole lines to the daemon's stdout, like its own logger.
const log = pino({ name: 'vhostd', level: init.logLevel }, pino.destination({ dest: 1, sync: true })).child({ thread: init.name });
const { createRunner } = (await import(init.runner)) as { createRunner(log: VringLogger): QueueRunner };
const runner = createRunner(log);
const mem = new GuestMemory();
let memVersion = -1;
const rings = new Map<number, Vring>();

const post = (m: FromThread): void => port.postMessage(m);
const fdOrNull = (fd: number): number | null => (fd < 0 ? null : fd);

function start(m: Extract<ToThread, { op: 'start' }>): void {
  if (rings.has(m.index)) throw new Error(`queue ${m.index} is already running here`);
  if (m.memoryVersion !== memVersion) {
    // The daemon changes memory only with every ring stopped (and so none here).
    if (rings.size) throw new Error(`memory table changed under running rings ${[...rings.keys()].join(', ')}`);
    mem.mirror(m.memory);
    memVersion = m.memoryVersion;
  }
  // The fds are the daemon's: this Vring uses them and never closes them.
  const v = new Vring(m.index, mem, log.child(m.logBindings), true);
  v.size = m.size;
  v.base = m.base;
  v.addrs = m.addrs;
  v.enabled = m.enabled;
  v.setKick(fdOrNull(m.kick));
  v.setCall(fdOrNull(m.call));
  v.setErr(fdOrNull(m.err));
  v.onFail = (reason) => post({ op: 'failed', index: m.index, reason });
  rings.set(m.index, v);
  v.start(m.features, { startQueue: (q) => runner.start(q, m.setup) }, m.fresh);
}

async function stop(index: number, seq: number): Promise<void> {
  const v = rings.get(index);
  let base: number | undefined;
  let report: unknown;
  try {
    if (v) {
      base = await v.stop();
      report = runner.stop(v);
    }
  } finally {
    v?.reset();
    rings.delete(index);
    // Nothing of guest memory may stay visible here once no ring runs: the daemon may unmap it next.
    if (!rings.size) {
      mem.clear();
      memVersion = -1;
    }
    post({ op: 'stopped', index, seq, base, report });
  }
}

async function handle(m: ToThread): Promise<void> {
  const v = rings.get(m.index);
  switch (m.op) {
    case 'start':
      return start(m);
    case 'stop':
      return stop(m.index, m.seq);
    case 'enable':
      v?.setEnabled(m.on);
      post({ op: 'done', index: m.index, seq: m.seq });
      return;
    case 'call':
    case 'err':
      // From now on the ring writes the new fd; the daemon closes the old one after this answer.
      if (m.op === 'call') v?.setCall(fdOrNull(m.fd));
      else v?.setErr(fdOrNull(m.fd));
      post({ op: 'done', index: m.index, seq: m.seq });
      return;
    case 'fail':
      v?.fail(m.reason);
      return;
  }
}

port.on('message', (m: ToThread) => {
  handle(m).catch((e: unknown) => {
    log.error({ queue: m.index, op: m.op, err: e }, 'internal error in a queue thread');
    const v = rings.get(m.index);
    if (v) v.fail(`internal error: ${(e as Error).message}`);
    else post({ op: 'failed', index: m.index, reason: `internal error: ${(e as Error).message}` });
  });
});
