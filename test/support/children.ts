// Daemons spawned by tests: the binary they run, the check that it is built
// from the current sources, and how they are made to die with the test.
//
// A test process that exits kills its live children. One that dies hard
// (SIGSEGV, OOM kill) never runs its exit hooks, so each child also gets a
// record file naming its pid, its owner and its temp dir; the next test run
// kills and removes what a dead owner left behind. Daemons that detach (the
// test Ceph cluster) are recorded with the command that stops them instead.
import { spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** The built daemon; VHOSTD_BIN overrides it. */
export const VHOSTD_BIN = process.env.VHOSTD_BIN ?? join(ROOT, 'dist', 'daemon.js');

const REGISTRY = join(tmpdir(), 'vhostd-proto-registry');

interface ChildRecord {
  /** A child process; absent for detached daemons, which have `stop`. */
  pid?: number;
  owner: number;
  dir: string;
  stop?: string[];
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const live = new Set<ChildProcess>();
/** Detached daemons by record path: what stops them, and the dir to remove. */
const detached = new Map<string, ChildRecord>();
let hooked = false;
let detachedCount = 0;

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  // Last resort when a test run ends without reaching its cleanup.
  process.on('exit', () => {
    for (const p of live) {
      try {
        p.kill('SIGKILL');
      } catch {
        /* gone */
      }
    }
    for (const [record, r] of detached) stopDetached(record, r);
  });
}

function stopDetached(record: string, r: ChildRecord): void {
  spawnSync(r.stop![0]!, r.stop!.slice(1), { stdio: 'ignore', timeout: 60_000 });
  rmSync(r.dir, { recursive: true, force: true });
  rmSync(record, { force: true });
}

/** Kill a child when this process exits, and record it with its temp dir; returns the record's path, for forget(). */
export function remember(proc: ChildProcess, dir: string): string {
  hookExit();
  live.add(proc);
  proc.once('exit', () => live.delete(proc));
  const pid = proc.pid;
  mkdirSync(REGISTRY, { recursive: true });
  const record = join(REGISTRY, `${pid ?? 'failed'}-${process.pid}.json`);
  if (pid !== undefined) writeFileSync(record, JSON.stringify({ pid, owner: process.pid, dir } satisfies ChildRecord));
  return record;
}

/**
 * Daemons that detach, so no exit of theirs reaches this process: `stop` runs
 * (synchronously) and `dir` is removed when this process exits, or by the next
 * reapOrphans() if it dies hard. Returns the record's path, for forget().
 */
export function rememberDetached(dir: string, stop: string[]): string {
  hookExit();
  mkdirSync(REGISTRY, { recursive: true });
  const record = join(REGISTRY, `detached-${process.pid}-${++detachedCount}.json`);
  const r: ChildRecord = { owner: process.pid, dir, stop };
  writeFileSync(record, JSON.stringify(r));
  detached.set(record, r);
  return record;
}

export function forget(record: string): void {
  detached.delete(record);
  rmSync(record, { force: true });
}

/** Kill the children of test processes that are gone, and remove their temp dirs. */
export function reapOrphans(): void {
  let names: string[];
  try {
    names = readdirSync(REGISTRY);
  } catch {
    return;
  }
  for (const n of names) {
    const file = join(REGISTRY, n);
    let r: ChildRecord;
    try {
      r = JSON.parse(readFileSync(file, 'utf8')) as ChildRecord;
    } catch {
      continue;
    }
    if (alive(r.owner)) continue;
    if (r.stop) {
      stopDetached(file, r);
      console.log(`stopped what process ${r.owner} left running: ${r.stop.join(' ')}`);
      continue;
    }
    try {
      // Only if the pid still runs our command line (pids get reused).
      if (r.pid !== undefined && readFileSync(`/proc/${r.pid}/cmdline`, 'utf8').includes(r.dir)) process.kill(r.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    rmSync(r.dir, { recursive: true, force: true });
    rmSync(file, { force: true });
  }
}

/** Newest mtime of the TypeScript sources under a directory, in ms (tsc builds only those). */
function newest(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newest(p));
    else if (e.name.endsWith('.ts')) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

/** Tests judge dist/, so dist/ must exist and be built from the current src/. VHOSTD_ALLOW_STALE=1 skips the age check. */
export function checkBuilt(): void {
  if (!existsSync(VHOSTD_BIN)) throw new Error(`${VHOSTD_BIN} is missing: run \`npm run build\``);
  if (process.env.VHOSTD_BIN || process.env.VHOSTD_ALLOW_STALE === '1') return;
  if (newest(join(ROOT, 'src')) > statSync(VHOSTD_BIN).mtimeMs) {
    throw new Error(`${VHOSTD_BIN} is older than src/: run \`npm run build\` (or set VHOSTD_ALLOW_STALE=1)`);
  }
}
