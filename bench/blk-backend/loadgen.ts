// Builds and runs loadgen.c, the C vhost-user-blk front-end of the
// backend-bound benchmark (bench/blk-backend.ts) and its test.
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = fileURLToPath(new URL('.', import.meta.url));
export const LOADGEN_SRC = join(HERE, 'loadgen.c');
export const LOADGEN_BIN = join(HERE, 'build', 'loadgen');

/** Compiles the generator when the binary is missing or older than its source; returns its path. */
export function buildLoadgen(): string {
  const fresh = existsSync(LOADGEN_BIN) && statSync(LOADGEN_BIN).mtimeMs >= statSync(LOADGEN_SRC).mtimeMs;
  if (!fresh) {
    mkdirSync(join(HERE, 'build'), { recursive: true });
    const tmp = `${LOADGEN_BIN}.${process.pid}`;
    execFileSync('cc', ['-O2', '-pthread', '-Wall', '-o', tmp, LOADGEN_SRC], { stdio: ['ignore', 'inherit', 'inherit'] });
    // rename() so a concurrent run never executes a half-written binary.
    execFileSync('mv', ['-f', tmp, LOADGEN_BIN]);
  }
  return LOADGEN_BIN;
}

export type Rw = 'randread' | 'randwrite' | 'read' | 'write';

export interface LoadgenOptions {
  socket: string;
  rw?: Rw;
  bs?: number;
  qd?: number;
  queues?: number;
  seconds?: number;
  warmup?: number;
  /** Bytes of the device to use (default: all of it). */
  size?: number;
  verifyWrite?: number;
  verifyRead?: number;
  /** Process whose utime+stime the generator samples at the edges of its measured window. */
  backendPid?: number;
  timeoutMs?: number;
}

export interface LoadgenResult {
  rw: string;
  bs: number;
  qd: number;
  queues: number;
  queue_size: number;
  seconds: number;
  ios: number;
  iops: number;
  mbps: number;
  lat_us: { p50: number; p99: number; p999: number; mean: number; max: number };
  /** The generator's own CPU (all threads) per I/O, µs. */
  cpu_us_per_io: number;
  /** The back-end process's utime+stime per I/O over the same window, µs (-1 without backendPid). */
  backend_cpu_us_per_io: number;
  kicks_per_io: number;
  interrupts_per_io: number;
  wakeups_per_io: number;
  kicks: number;
  interrupts: number;
  features: string;
  protocol_features: string;
  device_bytes: number;
  verified: number;
  errors: number;
  error?: string;
}

export class LoadgenError extends Error {
  constructor(
    message: string,
    readonly result: LoadgenResult | undefined,
    readonly stderr: string,
  ) {
    super(message);
  }
}

export function loadgenArgs(o: LoadgenOptions): string[] {
  const a = ['--socket', o.socket];
  if (o.rw) a.push('--rw', o.rw);
  if (o.bs) a.push('--bs', String(o.bs));
  if (o.qd) a.push('--qd', String(o.qd));
  if (o.queues) a.push('--queues', String(o.queues));
  if (o.seconds !== undefined) a.push('--seconds', String(o.seconds));
  if (o.warmup !== undefined) a.push('--warmup', String(o.warmup));
  if (o.size) a.push('--size', String(o.size));
  if (o.verifyWrite !== undefined) a.push('--verify-write', String(o.verifyWrite));
  if (o.verifyRead !== undefined) a.push('--verify-read', String(o.verifyRead));
  if (o.backendPid) a.push('--backend-pid', String(o.backendPid));
  return a;
}

/** Runs the generator once; rejects (loudly, with its stderr) on any error it reports. */
export function runLoadgen(o: LoadgenOptions): Promise<LoadgenResult> {
  const bin = buildLoadgen();
  const args = loadgenArgs(o);
  const timeout = o.timeoutMs ?? ((o.seconds ?? 5) + (o.warmup ?? 1)) * 1000 + 60_000;
  return new Promise((resolve, reject) => {
    execFile(bin, args, { timeout, maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      const line = stdout.trim().split('\n').pop() ?? '';
      let result: LoadgenResult | undefined;
      try {
        result = line ? (JSON.parse(line) as LoadgenResult) : undefined;
      } catch {
        result = undefined;
      }
      if (err || !result || result.errors) {
        const why = err ? (err.killed ? `killed after ${timeout} ms` : `exit ${err.code}`) : `${result?.errors} errors`;
        reject(new LoadgenError(`loadgen ${args.join(' ')}: ${why}\n${stderr}${line}`, result, stderr));
        return;
      }
      resolve(result);
    });
  });
}
