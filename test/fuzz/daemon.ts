// One vhostd process for a fuzz run: spawned at log level warn (the protocol
// tests' startBackend() pins --log-level debug, far too chatty for 100k
// inputs), its output scanned line by line for crashes, and its fds and
// memfd mappings read from /proc for leak checks.
//
// Spawning follows test/protocol/backends.ts: the same binary, a private temp
// dir for socket and image, and a record in test/support/children.ts's orphan
// registry.
import { spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  lstatSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkBuilt, forget, reapOrphans, remember, VHOSTD_BIN } from '../support/children.js';


export interface DaemonOptions {
  numQueues?: number;
  /** Image size in bytes (default 4 MiB). */
  imageBytes?: number;
  /** Fill the image before start: called with the fd. */
  initImage?: (fd: number, bytes: number) => void;
  logLevel?: string;
  extraArgs?: string[];
}

/** What the daemon said, digested: read from its log file by scan(). */
export class LogScan {
  lines = 0;
  private offset = 0;
  private readonly buf = Buffer.alloc(1 << 20);

  constructor(private readonly path: string) {}

  private fd = -1;
  /** 'closing connection: ...' lines (a protocol violation, or an internal error). */
  protocolCloses = 0;
  /** 'virtqueue failed' lines. */
  queueFailures = 0;
  /** Lines that mean a bug: internal errors, uncaught exceptions, stack traces, unexpected fatal logs. */
  readonly problems: string[] = [];
  private readonly tail: string[] = [];
  private partial = '';

  /** Read what the daemon wrote since the last scan (one read(2) when there is nothing new). */
  scan(): void {
    if (this.fd < 0) {
      try {
        this.fd = openSync(this.path, 'r');
      } catch {
        return;
      }
    }
    for (;;) {
      const n = readSync(this.fd, this.buf, 0, this.buf.length, this.offset);
      if (n <= 0) break;
      this.offset += n;
      this.feed(this.buf.toString('utf8', 0, n));
    }
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }

  private feed(chunk: string): void {
    const text = this.partial + chunk;
    const parts = text.split('\n');
    this.partial = parts.pop()!;
    for (const line of parts) this.line(line);
  }

  private line(line: string): void {
    if (!line) return;
    this.lines++;
    this.tail.push(line.length > 2000 ? `${line.slice(0, 2000)}...` : line);
    if (this.tail.length > 60) this.tail.shift();
    if (line.startsWith('{')) {
      let o: { level?: number; msg?: string; reason?: string; err?: unknown };
      try {
        o = JSON.parse(line) as typeof o;
      } catch {
        this.problem(`unparsable log line: ${line}`);
        return;
      }
      const msg = o.msg ?? '';
      if (msg.startsWith('closing connection')) this.protocolCloses++;
      if (msg.startsWith('virtqueue failed')) this.queueFailures++;
      if (msg.includes('internal error') || msg === 'error while stopping rings') this.problem(line);
      else if ((o.level ?? 0) >= 60) this.problem(line);
      return;
    }
    // The CLI prints how to attach QEMU ("# attach with:" and one command line); anything else that is not JSON is a crash.
    if (line.startsWith('# ') || line.startsWith('qemu-system')) return;
    this.problem(line);
  }

  private problem(line: string): void {
    if (this.problems.length < 50) this.problems.push(line.length > 4000 ? `${line.slice(0, 4000)}...` : line);
  }

  recent(n = 25): string {
    this.scan();
    return this.tail.slice(-n).join('\n');
  }
}

/** One line for a daemon log line: its message, the error and where it was thrown. */
export function summarizeLogLine(line: string): string {
  try {
    const o = JSON.parse(line) as { msg?: string; reason?: string; err?: { message?: string; stack?: string } | string };
    const err = typeof o.err === 'string' ? o.err : o.err?.message;
    const at = typeof o.err === 'object' ? o.err?.stack?.split('\n')[1]?.trim() : undefined;
    return [o.msg, o.reason, err, at && `(${at})`].filter(Boolean).join(': ');
  } catch {
    return line;
  }
}

export interface FdSnapshot {
  count: number;
  /** fd link targets, counted. */
  targets: Map<string, number>;
}

export class FuzzDaemon {
  exitInfo: string | undefined;
  private readonly exitedPromise: Promise<void>;

  private constructor(
    readonly proc: ChildProcess,
    readonly dir: string,
    readonly socket: string,
    readonly image: string,
    readonly imageBytes: number,
    private readonly record: string,
    /** The daemon's output; call log.scan() to read what it wrote since. */
    readonly log: LogScan,
  ) {
    this.exitedPromise = new Promise<void>((r) => {
      proc.once('exit', (code, signal) => {
        this.exitInfo = signal ? `killed by ${signal}` : `exited with status ${code}`;
        r();
      });
      proc.once('error', (e) => {
        this.exitInfo = `spawn error: ${e.message}`;
        r();
      });
    });
  }

  get pid(): number {
    return this.proc.pid!;
  }

  exited(): boolean {
    return this.exitInfo !== undefined;
  }

  static async start(opts: DaemonOptions = {}): Promise<FuzzDaemon> {
    checkBuilt();
    reapOrphans();
    const dir = mkdtempSync(join(tmpdir(), 'vhostd-fuzz-'));
    const socket = join(dir, 'blk.sock');
    const image = join(dir, 'disk.img');
    const imageBytes = opts.imageBytes ?? 4 * 1024 * 1024;
    const fd = openSync(image, 'w');
    try {
      if (opts.initImage) opts.initImage(fd, imageBytes);
      else writeSync(fd, new Uint8Array(1), 0, 1, imageBytes - 1);
    } finally {
      closeSync(fd);
    }
    // VHOSTD_FUZZ_NODE_ARGS: extra node flags for the daemon (e.g. --cpu-prof), for diagnosis.
    const nodeArgs = (process.env.VHOSTD_FUZZ_NODE_ARGS ?? '').split(' ').filter(Boolean);
    const args = [
      ...nodeArgs,
      VHOSTD_BIN, 'blk', '--socket', socket, '--file', image, '--num-queues', String(opts.numQueues ?? 2),
      '--serial', 'vhostd-fuzz', '--log-level', opts.logLevel ?? 'warn', ...(opts.extraArgs ?? []),
    ];
    // Output goes to a file, not a pipe: a pipe the test process drains only when its event loop
    // is free would block the daemon's synchronous log writes. LogScan reads the file as it grows.
    const logPath = join(dir, 'vhostd.log');
    const logFd = openSync(logPath, 'a');
    let proc: ChildProcess;
    try {
      proc = spawn(process.execPath, args, { stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    const record = remember(proc, dir);
    const d = new FuzzDaemon(proc, dir, socket, image, imageBytes, record, new LogScan(logPath));
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        if (lstatSync(socket).isSocket()) break;
      } catch {
        /* not yet */
      }
      if (d.exited() || Date.now() > deadline) {
        await d.stop();
        throw new Error(`vhostd did not start (${d.exitInfo ?? 'no socket after 15 s'}):\n${d.log.recent()}`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    return d;
  }

  /** Open fds of the daemon, by link target ("socket:[123]" becomes "socket"). */
  fds(): FdSnapshot {
    const targets = new Map<string, number>();
    let count = 0;
    const dir = `/proc/${this.pid}/fd`;
    for (const n of readdirSync(dir)) {
      let t: string;
      try {
        t = readlinkSync(`${dir}/${n}`);
      } catch {
        continue; // closed while we looked
      }
      t = t.replace(/:\[\d+\]$/, '').replace(/^anon_inode:\[?([a-z_]+)\]?$/, 'anon_inode:$1');
      count++;
      targets.set(t, (targets.get(t) ?? 0) + 1);
    }
    return { count, targets };
  }

  /** Mappings of memfds (guest memory) in the daemon. */
  memfdMaps(): string[] {
    return readFileSync(`/proc/${this.pid}/maps`, 'utf8')
      .split('\n')
      .filter((l) => l.includes('memfd:'));
  }

  /** Peak resident set size (VmHWM) in bytes, undefined once the process is gone. */
  peakRss(): number | undefined {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${this.pid}/status`, 'utf8'));
      return m ? Number(m[1]) * 1024 : undefined;
    } catch {
      return undefined;
    }
  }

  /** CPU seconds (user + system) the daemon has used so far. */
  cpuSeconds(): number | undefined {
    try {
      const f = readFileSync(`/proc/${this.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      return (Number(f[11]) + Number(f[12])) / 100;
    } catch {
      return undefined;
    }
  }

  /** CPU time the daemon used over `ms` wall time, as a fraction of one core (1 = a busy loop). */
  async cpuBusy(ms = 300): Promise<number | undefined> {
    const ticks = (): number | undefined => {
      try {
        const f = readFileSync(`/proc/${this.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
        return Number(f[11]) + Number(f[12]);
      } catch {
        return undefined;
      }
    };
    const a = ticks();
    await new Promise((r) => setTimeout(r, ms));
    const b = ticks();
    if (a === undefined || b === undefined) return undefined;
    return (b - a) / 100 / (ms / 1000);
  }

  async waitExit(ms: number): Promise<boolean> {
    if (this.exited()) return true;
    let t: NodeJS.Timeout | undefined;
    await Promise.race([this.exitedPromise, new Promise<void>((r) => (t = setTimeout(r, ms)))]);
    clearTimeout(t);
    return this.exited();
  }

  /** SIGTERM (the daemon drains and exits), or SIGKILL at once for a hung one. */
  async stop(kill = false): Promise<void> {
    if (!this.exited()) {
      this.proc.kill(kill ? 'SIGKILL' : 'SIGTERM');
      if (!(await this.waitExit(5_000))) {
        this.proc.kill('SIGKILL');
        await this.exitedPromise;
      }
    }
    this.log.scan();
    this.log.close();
    rmSync(this.dir, { recursive: true, force: true });
    forget(this.record);
  }
}

/** Compare fd snapshots; returns a description of what grew, or undefined. */
export function fdGrowth(base: FdSnapshot, now: FdSnapshot, ignore: (target: string) => boolean): string | undefined {
  const grew: string[] = [];
  for (const [t, n] of now.targets) {
    if (ignore(t)) continue;
    const b = base.targets.get(t) ?? 0;
    if (n > b) grew.push(`${t}: ${b} -> ${n}`);
  }
  return grew.length ? grew.join(', ') : undefined;
}
