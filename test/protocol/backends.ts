// Spawns the back-ends under test on a temp socket and a temp sparse image,
// and makes sure they die: at stop(), and when the test process exits.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  ftruncateSync,
  lstatSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkBuilt, forget, reapOrphans, remember, VHOSTD_BIN } from '../support/children.js';

export type BackendKind = 'vhostd' | 'qsd';

export interface BackendOptions {
  numQueues?: number;
  readonly?: boolean;
  serial?: string;
  imageBytes?: number;
  /** Extra vhostd CLI arguments. */
  extraArgs?: string[];
  /** Serve an RBD image (POOL/IMAGE on the cluster `conf` names) instead of a file. */
  rbd?: { spec: string; conf: string };
}

export interface Backend {
  kind: BackendKind;
  socket: string;
  image: string;
  imageBytes: number;
  serial: string;
  proc: ChildProcess;
  /** Everything the process printed so far. */
  output(): string;
  exited(): boolean;
  /** Bytes of the image file, read by the host. */
  readImage(offset: number, len: number): Uint8Array;
  stop(): Promise<void>;
}

export { VHOSTD_BIN };
export const QSD_BIN = process.env.QSD_BIN ?? 'qemu-storage-daemon';

let qsdChecked: boolean | undefined;
/** Back-ends present on this machine; qsd is optional but its absence is said out loud. */
export function availableKinds(): BackendKind[] {
  if (qsdChecked === undefined) {
    qsdChecked = spawnSync(QSD_BIN, ['--version'], { stdio: 'ignore' }).status === 0;
    if (!qsdChecked) {
      // In CI the reference run is part of the proof: its absence fails, never skips.
      if (process.env.CI === 'true') throw new Error(`${QSD_BIN} not found; test/guest/provision.sh installs it`);
      console.warn(`${QSD_BIN} not found: the reference runs against qemu-storage-daemon are skipped (apt-get install qemu-system-common)`);
    }
  }
  return qsdChecked ? ['vhostd', 'qsd'] : ['vhostd'];
}

async function waitForSocket(path: string, proc: ChildProcess, output: () => string, spawnError: () => Error | undefined, timeoutMs = 15_000): Promise<void> {
  // Only stat: a probe connection would occupy vhostd's single front-end slot.
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (lstatSync(path).isSocket()) return;
    } catch {
      /* not yet */
    }
    const err = spawnError();
    if (err) throw new Error(`cannot start back-end: ${err.message}`);
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`back-end exited (${proc.exitCode ?? proc.signalCode}) before creating ${path}:\n${output()}`);
    }
    if (Date.now() > deadline) throw new Error(`back-end did not create ${path} within ${timeoutMs} ms:\n${output()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function startBackend(kind: BackendKind, opts: BackendOptions = {}): Promise<Backend> {
  reapOrphans();
  const dir = mkdtempSync(join(tmpdir(), `vhostd-proto-${kind}-`));
  const socket = join(dir, 'blk.sock');
  const image = join(dir, 'disk.img');
  const imageBytes = opts.imageBytes ?? 64 * 1024 * 1024;
  const numQueues = opts.numQueues ?? 2;
  const serial = opts.serial ?? 'vhostd-proto-serial';
  const fd = openSync(image, 'w');
  ftruncateSync(fd, imageBytes);
  closeSync(fd);

  let cmd: string;
  let args: string[];
  if (kind === 'vhostd') {
    checkBuilt();
    cmd = process.execPath;
    args = [
      VHOSTD_BIN, 'blk', '--socket', socket, ...(opts.rbd ? ['--rbd', opts.rbd.spec, '--ceph-conf', opts.rbd.conf] : ['--file', image]), '--num-queues', String(numQueues),
      '--serial', serial, '--log-level', 'debug',
      ...(opts.readonly ? ['--readonly'] : []),
      ...(opts.extraArgs ?? []),
    ];
  } else {
    cmd = QSD_BIN;
    const ro = opts.readonly ? ',read-only=on' : '';
    args = [
      '--blockdev',
      opts.rbd
        ? `driver=rbd,node-name=f0,pool=${opts.rbd.spec.split('/')[0]},image=${opts.rbd.spec.split('/')[1]},conf=${opts.rbd.conf},user=admin,discard=unmap${ro}`
        : `driver=file,node-name=f0,filename=${image},discard=unmap${ro}`,
      '--export',
      `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socket},writable=${opts.readonly ? 'off' : 'on'},num-queues=${numQueues}`,
    ];
  }
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const record = remember(proc, dir);
  let out = '';
  const append = (b: Buffer): void => {
    if (out.length < 8 * 1024 * 1024) out += b.toString();
  };
  let spawnError: Error | undefined;
  proc.on('error', (e) => (spawnError = e));
  proc.stdout!.on('data', append);
  proc.stderr!.on('data', append);
  const exited = new Promise<void>((r) => {
    proc.once('exit', () => r());
    proc.once('error', () => r());
  });

  const stop = async (): Promise<void> => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(t);
    }
    rmSync(dir, { recursive: true, force: true });
    forget(record);
  };

  try {
    await waitForSocket(socket, proc, () => out, () => spawnError);
  } catch (e) {
    proc.kill('SIGKILL');
    await exited;
    rmSync(dir, { recursive: true, force: true });
    forget(record);
    throw e;
  }

  return {
    kind,
    socket,
    image,
    imageBytes,
    serial,
    proc,
    output: () => out,
    exited: () => proc.exitCode !== null || proc.signalCode !== null,
    readImage(offset: number, len: number): Uint8Array {
      const b = new Uint8Array(len);
      const f = openSync(image, 'r');
      try {
        readSync(f, b, 0, len, offset);
      } finally {
        closeSync(f);
      }
      return b;
    },
    stop,
  };
}
