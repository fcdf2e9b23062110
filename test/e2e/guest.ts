// Boots a throw-away Linux guest under QEMU TCG for end-to-end tests.
//
// The guest kit (kernel + busybox initramfs) comes from test/guest/provision.sh.
// Each run appends a small cpio holding /test.sh; the guest's /init runs it,
// prints `@@EXIT=<status>` and powers off. Lines `@@KEY=VALUE` printed by the
// script are collected as markers. Set VHOSTD_GUEST_DEBUG=1 to mirror the
// serial console to stderr.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { access, appendFile, copyFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { Qmp } from './qmp.js';

export const QEMU_BINARY = 'qemu-system-x86_64';
export const DEFAULT_TIMEOUT_MS = 240_000;
const PROVISION_SCRIPT = fileURLToPath(new URL('../guest/provision.sh', import.meta.url));
const PROVISION_TIMEOUT_MS = 20 * 60_000;
const KILL_GRACE_MS = 3_000;
const MAX_OUTPUT_CHARS = 32 * 1024 * 1024;
const MARKER_RE = /@@([A-Za-z0-9_.-]+)=(.*)$/;

export type GuestFile = string | Uint8Array | { data: string | Uint8Array; mode?: number };

export interface GuestOptions {
  /** Guest RAM, QEMU syntax ('512M', '5G'). Also the size of the shared memfd backend. Default 512M. */
  memory?: string;
  /** vCPUs. Default 1. */
  smp?: number;
  /** Extra QEMU arguments, e.g. from vhostUserBlkArgs(). */
  devices?: string[];
  /** Contents of /test.sh, run by busybox sh. Its exit status becomes `exitCode`. */
  script: string;
  /** More files for the guest, by absolute path (e.g. '/etc/job.fio'). Mode defaults to 0644. */
  files?: Record<string, GuestFile>;
  /** Kill QEMU after this long. Default 240 s. */
  timeoutMs?: number;
  /** Run QEMU in this network namespace (for QEMU's own tap back-end, as the baseline to compare with). */
  netns?: string;
  /** Appended to the default kernel command line. */
  kernelArgs?: string;
  /** QEMU -cpu model; default is QEMU's own (qemu64). */
  cpu?: string;
  /** Called with every complete console line (without '\n'). */
  onLine?: (line: string) => void;
  /** Called as soon as the guest prints a marker, e.g. to act on the host mid-test. */
  onMarker?: (key: string, value: string) => void;
  /** Aborting kills QEMU. */
  signal?: AbortSignal;
  /**
   * By default runGuest rejects with GuestError when the guest never reports
   * @@EXIT (timeout, QEMU failure, kernel panic, abort). With this set it
   * resolves instead, with exitCode null.
   */
  allowFailure?: boolean;
}

export interface GuestResult {
  /** Serial console output, '\r' removed. */
  output: string;
  /** Exit status of /test.sh, or null if the guest never reported one. */
  exitCode: number | null;
  /** Last value of each `@@KEY=VALUE` line. EXIT, BOOTED and WATCHDOG are set by /init. */
  markers: Record<string, string>;
  timedOut: boolean;
  aborted: boolean;
  qemuExitCode: number | null;
  qemuSignal: NodeJS.Signals | null;
  /** QEMU's own stderr (its error messages). */
  stderr: string;
  /** Wall time from spawning QEMU until it exited. */
  durationMs: number;
  /** Wall time from spawning QEMU until /test.sh started, or null. */
  bootMs: number | null;
  command: string[];
}

export interface GuestKit {
  /** Kernel passed to -kernel (a PVH vmlinux when available: it skips ~3 s of TCG decompression). */
  kernel: string;
  /** Base initramfs (uncompressed when available: gunzip costs ~2 s under TCG). */
  initramfs: string;
  kernelRelease: string;
  /** The Debian bzImage and gzip initramfs, always present. */
  vmlinuz: string;
  initramfsGz: string;
}

export class GuestError extends Error {
  constructor(
    message: string,
    readonly result: GuestResult,
  ) {
    super(`${message}\n${describeResult(result)}`);
    this.name = 'GuestError';
  }
}

/** True if a command runs (e.g. `hasCommand('qemu-storage-daemon')`). */
export function hasCommand(command: string, args: string[] = ['--version']): boolean {
  const r = spawnSync(command, args, { stdio: 'ignore', timeout: 10_000 });
  return r.status === 0;
}

export function qemuAvailable(): boolean {
  return hasCommand(QEMU_BINARY);
}

let kitPromise: Promise<GuestKit> | undefined;

/** Runs provision.sh once per process (a warm run takes ~0.1 s). */
export function provisionGuestKit(): Promise<GuestKit> {
  kitPromise ??= runProvision().catch((err: unknown) => {
    kitPromise = undefined;
    throw err;
  });
  return kitPromise;
}

async function runProvision(): Promise<GuestKit> {
  const child = spawn('bash', [PROVISION_SCRIPT], { stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    if (process.env.VHOSTD_GUEST_DEBUG) process.stderr.write(d);
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), PROVISION_TIMEOUT_MS);
  const [code, sig] = await exitOf(child).finally(() => clearTimeout(timer));
  if (code !== 0) {
    throw new Error(`${PROVISION_SCRIPT} failed (${sig ?? `exit ${code}`}):\n${stderr.trim()}`);
  }
  const kv: Record<string, string> = {};
  for (const line of stdout.split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line.trim());
    if (m) kv[m[1]!] = m[2]!;
  }
  const { KERNEL, INITRAMFS, KVER } = kv;
  if (!KERNEL || !INITRAMFS || !KVER) throw new Error(`unexpected output from ${PROVISION_SCRIPT}:\n${stdout}`);
  return {
    kernel: kv.KERNEL_FAST || KERNEL,
    initramfs: kv.INITRAMFS_FAST || INITRAMFS,
    kernelRelease: KVER,
    vmlinuz: KERNEL,
    initramfsGz: INITRAMFS,
  };
}

/**
 * QEMU arguments for a vhost-user-blk disk on `socket`. `chardev` adds socket
 * options: `reconnect=1` to survive a killed back-end, `server=on,wait=off` for client mode.
 */
export function vhostUserBlkArgs(socket: string, opts: { id?: string; numQueues?: number; extra?: string; chardev?: string } = {}): string[] {
  const id = opts.id ?? `blk${nextId++}`;
  const dev = [`vhost-user-blk-pci`, `chardev=${id}c`, `id=${id}`];
  if (opts.numQueues !== undefined) dev.push(`num-queues=${opts.numQueues}`);
  if (opts.extra) dev.push(opts.extra);
  return ['-chardev', `socket,id=${id}c,path=${socket}${opts.chardev ? `,${opts.chardev}` : ''}`, '-device', dev.join(',')];
}

/** QEMU arguments for a virtio-net NIC backed by a vhost-user back-end on `socket`. */
export function vhostUserNetArgs(
  socket: string,
  opts: { id?: string; queuePairs?: number; mac?: string; extra?: string } = {},
): string[] {
  const id = opts.id ?? `net${nextId++}`;
  const qp = opts.queuePairs ?? 1;
  const dev = ['virtio-net-pci', `netdev=${id}`, `id=${id}d`];
  if (opts.mac) dev.push(`mac=${opts.mac}`);
  if (qp > 1) dev.push('mq=on', `vectors=${2 * qp + 2}`);
  if (opts.extra) dev.push(opts.extra);
  return [
    '-chardev', `socket,id=${id}c,path=${socket}`,
    '-netdev', `vhost-user,id=${id},chardev=${id}c,queues=${qp}`,
    '-device', dev.join(','),
  ];
}
let nextId = 0;

/** Resolves once `path` exists (e.g. a back-end's socket), so QEMU can connect. */
export async function waitForPath(path: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await access(path);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`${path} did not appear within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** The guest kit booted with the test's script: the QEMU arguments every run shares (devices not included). */
async function prepareGuest(opts: GuestOptions, dir: string): Promise<string[]> {
  const memory = opts.memory ?? '512M';
  if (!/^\d+[KMGT]?$/i.test(memory)) throw new Error(`bad memory size ${memory}`);
  const smp = opts.smp ?? 1;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const kit = await provisionGuestKit();
  // VHOSTD_GUEST_COMPAT_BOOT=1 boots the plain Debian bzImage + gzip initramfs instead.
  const compat = process.env.VHOSTD_GUEST_COMPAT_BOOT === '1';
  const initrd = join(dir, 'initrd');
  await copyFile(compat ? kit.initramfsGz : kit.initramfs, initrd);
  await appendFile(initrd, buildOverlay(opts.script, opts.files ?? {}));

  // Guest-side watchdog: powers off even if this process dies and leaves QEMU behind.
  const watchdogS = Math.ceil(timeoutMs / 1000) + 30;
  const append = ['console=ttyS0', 'panic=-1', 'quiet', `vhostd.watchdog=${watchdogS}`, opts.kernelArgs ?? '']
    .filter(Boolean)
    .join(' ');
  return [
    // QEMU 7.2's TCG drops the guest's memory barriers unless the machine may have more than one
    // vCPU (fixed upstream in 8.1). A vhost-user back-end runs beside the vCPU, so the guest's
    // virtio barriers must be real, or it sometimes misses a kick and the queue stalls: maxcpus=2.
    '-accel', 'tcg,thread=multi',
    '-nographic', '-nodefaults', '-no-user-config', '-no-reboot',
    '-m', memory, '-smp', `${smp},maxcpus=${Math.max(2, smp)}`,
    // vhost-user back-ends map guest RAM, so it must be a shareable fd.
    '-object', `memory-backend-memfd,id=mem,size=${memory},share=on`,
    '-numa', 'node,memdev=mem',
    ...(opts.cpu ? ['-cpu', opts.cpu] : []),
    '-kernel', compat ? kit.vmlinuz : kit.kernel, '-initrd', initrd, '-append', append,
    '-serial', 'stdio', '-monitor', 'none', '-display', 'none',
  ];
}

export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  opts.signal?.throwIfAborted();
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-guest-'));
  try {
    const args = [...(await prepareGuest(opts, dir)), ...(opts.devices ?? [])];
    return await runQemu(args, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, opts);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Guest RAM for a migration, when the test names none: 8 KiB short of 512 MiB,
 * so not a whole number of 64-page dirty-bitmap words. QEMU 7.2 syncs such a
 * RAM block's dirty bits page by page, resetting TCG's TLB entries as it goes.
 * A block of whole words takes a fast path that leaves them, so a vCPU's later
 * stores through those entries are never marked dirty, and the destination
 * runs on stale pages that no back-end wrote (a guest oops, a corrupt heap).
 * QEMU 9.0 fixed it (03bfc2188f, "physmem: Fix migration dirty bitmap
 * coherency with TCG memory access"); KVM guests never had it.
 */
export const MIGRATION_MEMORY = '524280K';

export interface MigrationOptions extends GuestOptions {
  /** The destination's devices: the same devices as `devices`, on the destination's back-ends. */
  destDevices: string[];
  /** The marker on which the source starts migrating (default MIGRATE). */
  migrateOn?: string;
  /** Called once the migration completed (the destination runs the guest now). */
  onMigrated?: () => void;
  /**
   * Migration bandwidth, bytes a second. Default 32 MiB/s, so the pre-copy
   * lasts seconds while the guest works: pages a back-end writes after QEMU
   * sent them reach the destination only through the dirty log.
   */
  bandwidth?: number;
  /** Longest pause QEMU may take for the last pass, ms (default 500). */
  downtimeMs?: number;
}

export interface MigrationResult {
  /** The source's run: the console until the guest left it. */
  source: GuestResult;
  /** The destination's run: the console from the switch over, with @@EXIT. */
  dest: GuestResult;
  /** Both runs' markers (the destination's win). */
  markers: Record<string, string>;
  exitCode: number | null;
  /** query-migrate on the source once it completed. */
  migration: Record<string, unknown>;
}

/**
 * Boots the guest in a source QEMU and live-migrates it, when it prints the
 * `migrateOn` marker, to a destination QEMU started with -incoming on a Unix
 * socket (the same machine and devices, on other back-ends), through QMP. The
 * script runs on in the destination until it reports @@EXIT there.
 */
export async function runMigratingGuest(opts: MigrationOptions): Promise<MigrationResult> {
  opts.signal?.throwIfAborted();
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-migrate-'));
  const abort = new AbortController();
  opts.signal?.addEventListener('abort', () => abort.abort(), { once: true });
  try {
    const common = await prepareGuest({ ...opts, memory: opts.memory ?? MIGRATION_MEMORY }, dir);
    const qmp = (side: string): string => join(dir, `${side}.qmp`);
    const incoming = `unix:${join(dir, 'migrate.sock')}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const dest = runQemu(
      [...common, ...opts.destDevices, '-qmp', `unix:${qmp('dest')},server=on,wait=off`, '-incoming', incoming],
      timeoutMs,
      { ...opts, signal: abort.signal },
    );
    let migration: Promise<Record<string, unknown>> | undefined;
    const migrate = async (): Promise<Record<string, unknown>> => {
      await waitForPath(qmp('dest'));
      const src = await Qmp.connect(qmp('source'));
      try {
        await src.execute('migrate-set-parameters', { 'max-bandwidth': opts.bandwidth ?? 32 * 2 ** 20, 'downtime-limit': opts.downtimeMs ?? 500 });
        await src.execute('migrate', { uri: incoming });
        for (;;) {
          const info = (await src.execute('query-migrate')) as Record<string, unknown>;
          if (info.status === 'completed') {
            opts.onMigrated?.();
            await src.execute('quit').catch(() => undefined); // QEMU closes the socket as it quits
            return info;
          }
          if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${String(info.status)}: ${JSON.stringify(info)}`);
          await new Promise((r) => setTimeout(r, 100));
        }
      } finally {
        src.close();
      }
    };
    const migrateOn = opts.migrateOn ?? 'MIGRATE';
    const source = runQemu([...common, ...(opts.devices ?? []), '-qmp', `unix:${qmp('source')},server=on,wait=off`], timeoutMs, {
      ...opts,
      signal: abort.signal,
      allowFailure: true, // the guest leaves it without @@EXIT
      onMarker: (key, value) => {
        opts.onMarker?.(key, value);
        if (key === migrateOn && !migration) {
          migration = migrate();
          migration.catch(() => abort.abort());
        }
      },
    });
    const [s, d] = await Promise.allSettled([source, dest]);
    if (!migration) throw new GuestError(`the guest never printed @@${migrateOn}`, s.status === 'fulfilled' ? s.value : ({ output: '' } as GuestResult));
    const info = await migration;
    if (s.status === 'rejected') throw s.reason;
    if (d.status === 'rejected') throw d.reason;
    return { source: s.value, dest: d.value, markers: { ...s.value.markers, ...d.value.markers }, exitCode: d.value.exitCode, migration: info };
  } finally {
    abort.abort();
    await rm(dir, { recursive: true, force: true });
  }
}

async function runQemu(args: string[], timeoutMs: number, opts: GuestOptions): Promise<GuestResult> {
  const started = Date.now();
  const argv = opts.netns ? ['ip', 'netns', 'exec', opts.netns, QEMU_BINARY, ...args] : [QEMU_BINARY, ...args];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  trackChild(child);
  const debug = !!process.env.VHOSTD_GUEST_DEBUG;
  const result: GuestResult = {
    output: '',
    exitCode: null,
    markers: {},
    timedOut: false,
    aborted: false,
    qemuExitCode: null,
    qemuSignal: null,
    stderr: '',
    durationMs: 0,
    bootMs: null,
    command: argv,
  };

  let killTimer: NodeJS.Timeout | undefined;
  const stop = (): void => {
    if (child.exitCode !== null || child.signalCode !== null || killTimer) return;
    child.kill('SIGTERM');
    // SIGTERM makes QEMU talk to its vhost-user back-ends; a hung back-end must not hang us.
    killTimer = setTimeout(() => child.kill('SIGKILL'), KILL_GRACE_MS);
  };

  let partial = '';
  let callbackError: unknown;
  const onLine = (raw: string): void => {
    const line = raw.replace(/\r/g, '');
    if (result.output.length < MAX_OUTPUT_CHARS) result.output += line + '\n';
    const m = MARKER_RE.exec(line);
    try {
      opts.onLine?.(line);
      if (m) {
        const key = m[1]!;
        const v = m[2]!.trimEnd();
        result.markers[key] = v;
        if (key === 'BOOTED' && result.bootMs === null) result.bootMs = Date.now() - started;
        opts.onMarker?.(key, v);
      }
    } catch (err) {
      // A throwing callback fails the run rather than crashing the process.
      callbackError ??= err;
      stop();
    }
  };
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
    if (debug) process.stderr.write(chunk);
    const lines = (partial + chunk).split('\n');
    partial = lines.pop() ?? '';
    for (const l of lines) onLine(l);
  });
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
    if (debug) process.stderr.write(chunk);
    if (result.stderr.length < 1024 * 1024) result.stderr += chunk;
  });
  // QEMU must not see EOF on the serial console's stdin; keep it open.
  child.stdin.on('error', () => {});

  const timer = setTimeout(() => {
    result.timedOut = true;
    stop();
  }, timeoutMs);
  const onAbort = (): void => {
    result.aborted = true;
    stop();
  };
  opts.signal?.addEventListener('abort', onAbort, { once: true });

  let spawnError: unknown;
  try {
    [result.qemuExitCode, result.qemuSignal] = await exitOf(child);
  } catch (err) {
    spawnError = err;
  } finally {
    clearTimeout(timer);
    clearTimeout(killTimer);
    opts.signal?.removeEventListener('abort', onAbort);
    child.kill('SIGKILL'); // no-op when it already exited
    child.stdin.destroy();
  }
  if (partial) onLine(partial);
  result.durationMs = Date.now() - started;
  const exit = result.markers.EXIT;
  result.exitCode = exit !== undefined && /^\d+$/.test(exit) ? Number(exit) : null;

  if (spawnError) throw new GuestError(`could not run ${QEMU_BINARY}: ${String(spawnError)}`, result);
  if (callbackError) throw callbackError;
  if (result.exitCode === null && !opts.allowFailure) {
    const why = result.timedOut
      ? `guest timed out after ${timeoutMs} ms and was killed`
      : result.aborted
        ? 'guest run was aborted'
        : result.markers.WATCHDOG
          ? 'guest watchdog expired'
          : 'guest stopped without reporting @@EXIT (QEMU error or kernel panic?)';
    throw new GuestError(why, result);
  }
  return result;
}

function exitOf(child: ChildProcess): Promise<[number | null, NodeJS.Signals | null]> {
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code, sig) => resolve([code, sig]));
  });
}

// Last resort: never leave QEMU (or provisioning) running after the test process exits.
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;
function trackChild(child: ChildProcess): void {
  liveChildren.add(child);
  child.once('close', () => liveChildren.delete(child));
  child.once('error', () => liveChildren.delete(child));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of liveChildren) c.kill('SIGKILL');
    });
  }
}

function describeResult(r: GuestResult): string {
  const tail = r.output.split('\n').slice(-40).join('\n');
  const parts = [
    `qemu: ${r.qemuSignal ?? `exit ${r.qemuExitCode}`} after ${r.durationMs} ms`,
    r.stderr.trim() ? `qemu stderr:\n${r.stderr.trim()}` : '',
    `console (last 40 lines):\n${tail}`,
  ];
  return parts.filter(Boolean).join('\n');
}

/**
 * A gzip'd newc cpio with /test.sh and `files`. The kernel unpacks it after the
 * base archive, so these files win over the base ones.
 */
export function buildOverlay(script: string, files: Record<string, GuestFile>): Buffer {
  const entries = new Map<string, { data: Buffer; mode: number }>();
  const addDirs = (path: string): void => {
    const parts = path.split('/').slice(0, -1);
    for (let i = 1; i <= parts.length; i++) {
      const dir = parts.slice(0, i).join('/');
      if (dir && !entries.has(dir)) entries.set(dir, { data: Buffer.alloc(0), mode: 0o040755 });
    }
  };
  const add = (path: string, f: GuestFile, defaultMode: number): void => {
    if (!path.startsWith('/') || path.split('/').includes('..')) throw new Error(`bad guest path ${path}`);
    const rel = path.replace(/^\/+/, '');
    const spec = typeof f === 'string' || f instanceof Uint8Array ? { data: f } : f;
    addDirs(rel);
    entries.set(rel, { data: Buffer.from(spec.data), mode: 0o100000 | ((spec.mode ?? defaultMode) & 0o7777) });
  };
  for (const [path, f] of Object.entries(files)) add(path, f, 0o644);
  add('/test.sh', script, 0o755);

  const chunks: Buffer[] = [];
  let ino = 1;
  const pad4 = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);
  const push = (name: string, mode: number, data: Buffer): void => {
    const nameBuf = Buffer.from(name + '\0');
    const fields = [ino++, mode, 0, 0, (mode & 0o170000) === 0o040000 ? 2 : 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0];
    const header = Buffer.from('070701' + fields.map((v) => v.toString(16).padStart(8, '0')).join(''), 'ascii');
    chunks.push(header, nameBuf, pad4(header.length + nameBuf.length), data, pad4(data.length));
  };
  // Directories sort before their contents.
  for (const name of [...entries.keys()].sort()) {
    const e = entries.get(name)!;
    push(name, e.mode, e.data);
  }
  push('TRAILER!!!', 0, Buffer.alloc(0));
  return gzipSync(Buffer.concat(chunks));
}
