// A throw-away single-node Ceph cluster (test/ceph/cluster.sh) for the RBD
// tests: provisioned from Debian packages, started in a temporary directory on
// 127.0.0.1, stopped and removed afterwards. Start and stop times are logged.
import { execFile, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from './children.js';

const run = promisify(execFile);
const PROVISION = join(ROOT, 'test', 'ceph', 'provision.sh');
const CLUSTER = join(ROOT, 'test', 'ceph', 'cluster.sh');

export interface Cluster {
  dir: string;
  conf: string;
  keyring: string;
  pool: string;
  /** `rbd` against this cluster. */
  rbd(...args: string[]): Promise<string>;
  /** A new image of `bytes`, named uniquely after `tag`; returns POOL/IMAGE. */
  createImage(tag: string, bytes: number): Promise<string>;
  stop(): Promise<void>;
}

let images = 0;

const PREFIX = 'vhostd-ceph-';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Stop clusters whose owner is gone. The daemons detach, so a test run or a
 * benchmark killed by a timeout leaves three of them eating both cores, and
 * every later measurement on this machine would be skewed.
 */
function reapOrphans(): void {
  for (const name of readdirSync(tmpdir())) {
    if (!name.startsWith(PREFIX)) continue;
    const parent = join(tmpdir(), name);
    let owner: number;
    try {
      owner = Number(readFileSync(join(parent, 'owner'), 'utf8'));
    } catch {
      continue; // being created, or not ours
    }
    if (!Number.isInteger(owner) || owner <= 0 || alive(owner)) continue;
    spawnSync('bash', [CLUSTER, 'stop', join(parent, 'cluster')], { stdio: 'ignore', timeout: 60_000 });
    rmSync(parent, { recursive: true, force: true });
    console.log(`ceph: stopped a cluster left behind by process ${owner} (${parent})`);
  }
}

export async function startCluster(): Promise<Cluster> {
  await run('bash', [PROVISION], { timeout: 20 * 60_000, maxBuffer: 16 << 20 });
  reapOrphans();
  const parent = mkdtempSync(join(tmpdir(), PREFIX));
  writeFileSync(join(parent, 'owner'), String(process.pid));
  const dir = join(parent, 'cluster');
  // An exit without stop() (an uncaught error, process.exit) still stops it; a SIGKILL leaves it to reapOrphans().
  const onExit = (): void => {
    spawnSync('bash', [CLUSTER, 'stop', dir], { stdio: 'ignore', timeout: 60_000 });
    rmSync(parent, { recursive: true, force: true });
  };
  process.once('exit', onExit);
  const started = Date.now();
  let out: string;
  try {
    ({ stdout: out } = await run('bash', [CLUSTER, 'start', dir], { timeout: 120_000, maxBuffer: 16 << 20 }));
  } catch (e) {
    process.off('exit', onExit);
    onExit();
    throw new Error(`the test Ceph cluster did not start: ${(e as { stderr?: string }).stderr ?? (e as Error).message}`);
  }
  console.log(`ceph: single-node cluster healthy in ${Date.now() - started} ms`);
  const kv = Object.fromEntries(out.trim().split('\n').map((l) => l.split('=', 2) as [string, string]));
  const conf = kv.CONF!;
  const rbd = async (...args: string[]): Promise<string> => (await run('rbd', ['-c', conf, ...args], { timeout: 60_000 })).stdout;
  return {
    dir,
    conf,
    keyring: kv.KEYRING!,
    pool: kv.POOL!,
    rbd,
    async createImage(tag: string, bytes: number): Promise<string> {
      const spec = `${kv.POOL}/${tag}-${process.pid}-${++images}`;
      await rbd('create', spec, '--size', `${Math.ceil(bytes / 1048576)}M`);
      return spec;
    },
    async stop(): Promise<void> {
      process.off('exit', onExit);
      const t = Date.now();
      await run('bash', [CLUSTER, 'stop', dir], { timeout: 60_000 }).catch(() => undefined);
      rmSync(parent, { recursive: true, force: true });
      console.log(`ceph: cluster stopped and removed in ${Date.now() - t} ms`);
    },
  };
}
