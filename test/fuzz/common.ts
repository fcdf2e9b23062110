// Shared by the socket and ring fuzzers: stats, failures, progress, the
// "daemon still serves a well-formed session" check and the leak check.
import { randomBytes, S } from '../driver/blk.js';
import { PeerClosedError } from '../driver/frontend.js';
import { Session } from '../driver/session.js';
import { Req, VERSION } from '../driver/wire.js';
import { frame, RawConn } from './client.js';
import { fdGrowth, type FdSnapshot, type FuzzDaemon } from './daemon.js';

export interface Failure {
  seed: number;
  /** Input index (replay: --seed <seed> --start <index> --count 1); -1 for run-level checks. */
  index: number;
  kind: string;
  message: string;
}

export interface Progress {
  target: 'socket' | 'ring' | 'net';
  inputs: number;
  /** What the inputs carried: vhost-user messages (socket) or descriptor chains (ring). */
  messages: number;
  elapsedMs: number;
  /** Inputs per second since the start. */
  rate: number;
  failures: number;
}

export interface FuzzStats {
  target: 'socket' | 'ring' | 'net';
  seed: number;
  inputs: number;
  /** vhost-user messages (socket) or descriptor chains (ring) the inputs carried. */
  messages: number;
  /** Inputs that ended with the daemon closing the connection (socket), or the queue failing (ring). */
  closes: number;
  /** Inputs that ended with a correct reply to the final probe (socket), or all requests completed (ring). */
  replies: number;
  failures: Failure[];
  elapsedMs: number;
  rate: number;
  /** Target-specific counters. */
  extra: Record<string, number>;
}

export interface RunOptions {
  seed: number;
  count: number;
  /** First input index (default 0): replay one input with start=index, count=1. */
  start?: number;
  onProgress?: (p: Progress) => void;
  /** Inputs between leak checks and healthy-session checks. */
  batch?: number;
  /** Stop after this many failures (default 20). */
  maxFailures?: number;
  /** Bug classes not to generate (for exploring past a known bug locally; CI sets none). */
  avoid?: string[];
  /** Stop early (the CLI's Ctrl-C): the run finishes its checks and returns. */
  signal?: AbortSignal;
  /** Diagnostic lines (failures as they happen). */
  log?: (line: string) => void;
}

/**
 * Known-bug suppression within one run: once inputs tagged with a bug class
 * (a region past the end of its fd, a ring overlapping another...) have
 * failed `limit` times, the generator stops making them, so one bug that
 * crashes or hangs the daemon does not eat the whole run. The failures stay
 * recorded: the run still fails.
 */
export class Suppressor {
  private readonly counts = new Map<string, number>();
  constructor(
    readonly avoid: Set<string>,
    private readonly log: (line: string) => void,
    private readonly limit = 2,
  ) {}

  failed(tags: Iterable<string>): void {
    for (const t of tags) {
      const n = (this.counts.get(t) ?? 0) + 1;
      this.counts.set(t, n);
      if (n === this.limit && !this.avoid.has(t)) {
        this.avoid.add(t);
        this.log(`(bug class '${t}' failed ${n} times: no longer generated in this run)`);
      }
    }
  }
}

export function describeFailure(f: Failure, target: string): string {
  const where = f.index >= 0 ? `input ${f.index}` : 'run-level check';
  const replay = f.index >= 0 ? ` (replay: npm run fuzz -- --target ${target} --seed ${f.seed} --start ${f.index} --count 1)` : '';
  return `[${target} seed ${f.seed} ${where}] ${f.kind}: ${f.message}${replay}`;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function envAvoid(): string[] {
  return (process.env.VHOSTD_FUZZ_AVOID ?? '').split(',').map((s) => s.trim()).filter(Boolean);
}

/** RunOptions with every default filled in, as both fuzzers use them. */
export function withDefaults(opts: RunOptions): Required<Pick<RunOptions, 'start' | 'batch' | 'maxFailures' | 'log'>> & { seed: number; avoid: Set<string> } {
  return {
    seed: opts.seed >>> 0,
    start: opts.start ?? 0,
    batch: opts.batch ?? 2_000,
    maxFailures: opts.maxFailures ?? 20,
    avoid: new Set(opts.avoid ?? envAvoid()),
    log: opts.log ?? (() => {}),
  };
}

/**
 * A connection the daemon has accepted: vhostd serves one front-end at a time
 * and closes a second one at once, so a GET_FEATURES reply is the proof.
 * Returns undefined if none is accepted within timeoutMs.
 */
export async function connectAccepted(socket: string, timeoutMs = 5_000): Promise<RawConn | undefined> {
  const deadline = Date.now() + timeoutMs;
  const probe = frame(Req.GET_FEATURES, VERSION, new Uint8Array(0));
  while (Date.now() < deadline) {
    const c = RawConn.tryConnect(socket);
    if (c) {
      if ((await c.send(probe)) === 'ok') {
        await c.until(() => c.replies.length > 0, Math.max(1, deadline - Date.now()));
        if (c.replies.length > 0) return c;
      }
      c.close();
    }
    await new Promise((r) => setImmediate(r));
    if (!c) await sleep(1);
  }
  return undefined;
}

/**
 * A full, well-formed session (QEMU 7.2 start order, two queues), a 4 KiB
 * write on queue 0 read back on queue 1, and the stop order. Throws on any
 * deviation. Retries only while the daemon refuses the connection because it
 * is still tearing down the previous one.
 */
export async function healthySession(socket: string, sector: number, data: Uint8Array = randomBytes(4096)): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const s = await Session.open(socket);
    try {
      s.fe.timeoutMs = 3_000;
      await s.startDevice({ queues: 2 });
      const w = await s.blk[0]!.write(sector, data);
      if (w.status !== S.OK) throw new Error(`healthy session: write status ${w.status}`);
      const r = await s.blk[1]!.read(sector, data.length);
      if (r.status !== S.OK) throw new Error(`healthy session: read status ${r.status}`);
      for (let i = 0; i < data.length; i++) {
        if (r.data[i] !== data[i]) throw new Error(`healthy session: read back differs at byte ${i}`);
      }
      await s.stopDevice();
      return;
    } catch (e) {
      const refused = e instanceof PeerClosedError && !s.fe.trace.some((t) => t.startsWith('<- ') && !t.startsWith('<- EOF'));
      if (!refused || Date.now() > deadline) {
        (e as Error).message += `\n--- wire trace ---\n${s.fe.recentTrace(20)}`;
        throw e;
      }
    } finally {
      s.close();
    }
    await sleep(2);
  }
}

export interface Baseline {
  fds: FdSnapshot;
  maps: number;
}

/** fds and memfd mappings with one idle, accepted connection (no memory table): the state every check compares. */
export async function idleState(d: FuzzDaemon): Promise<{ fds: FdSnapshot; maps: string[] } | undefined> {
  const c = await connectAccepted(d.socket);
  if (!c) return undefined;
  try {
    return { fds: d.fds(), maps: d.memfdMaps() };
  } finally {
    c.close();
  }
}

/**
 * Leak check against the baseline, with a short settle time for teardown
 * still in progress. Returns a description of the leak, or undefined.
 */
export async function checkLeaks(d: FuzzDaemon, base: Baseline, settleMs = 1_000): Promise<string | undefined> {
  const deadline = Date.now() + settleMs;
  let last = '';
  for (;;) {
    const now = await idleState(d);
    if (!now) return 'the daemon did not accept a connection for the leak check within 5 s';
    // The image's own descriptors (buffered, O_DSYNC, O_DIRECT with --direct) are all opened at start.
    const imageFds = now.fds.targets.get(d.image) ?? 0;
    const grew = fdGrowth(base.fds, now.fds, (t) => t === d.image);
    const problems: string[] = [];
    const baseOthers = base.fds.count - (base.fds.targets.get(d.image) ?? 0);
    const nowOthers = now.fds.count - imageFds;
    if (nowOthers > baseOthers) problems.push(`open fds (not counting the image) ${baseOthers} -> ${nowOthers}${grew ? ` (${grew})` : ''}`);
    if (imageFds > 3) problems.push(`${imageFds} fds open on the image`);
    if (now.maps.length > base.maps) problems.push(`memfd mappings ${base.maps} -> ${now.maps.length}:\n  ${now.maps.slice(0, 8).join('\n  ')}`);
    if (!problems.length) return undefined;
    last = problems.join('; ');
    if (Date.now() > deadline) return last;
    await sleep(20);
  }
}

/** Progress reporting at most once a second. */
export class Ticker {
  private last = 0;
  /** Messages (socket) or chains (ring) sent so far. */
  messages = 0;
  constructor(
    private readonly target: 'socket' | 'ring' | 'net',
    private readonly t0: number,
    private readonly cb?: (p: Progress) => void,
  ) {}

  tick(inputs: number, failures: number, force = false): void {
    if (!this.cb) return;
    const now = Date.now();
    if (!force && now - this.last < 1_000) return;
    this.last = now;
    const elapsedMs = now - this.t0;
    this.cb({ target: this.target, inputs, messages: this.messages, elapsedMs, rate: elapsedMs ? (inputs * 1000) / elapsedMs : 0, failures });
  }
}
