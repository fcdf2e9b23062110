// A throw-away single-node Ceph cluster (test/ceph/cluster.sh) for the RBD
// tests: provisioned from Debian packages, started in a temporary directory on
// 127.0.0.1, stopped and removed afterwards. Start and stop times are logged.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { forget, reapOrphans, rememberDetached, ROOT } from './children.js';

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

export async function startCluster(): Promise<Cluster> {
  await run('bash', [PROVISION], { timeout: 20 * 60_000, maxBuffer: 16 << 20 });
  // Ceph's daemons detach: a run killed by a timeout would leave them eating both cores.
  reapOrphans();
  const parent = mkdtempSync(join(tmpdir(), 'vhostd-ceph-'));
  const dir = join(parent, 'cluster');
  const stop = ['bash', CLUSTER, 'stop', dir] as const;
  const record = rememberDetached(parent, [...stop]);
  const teardown = async (): Promise<void> => {
    forget(record);
    await run(stop[0], stop.slice(1), { timeout: 60_000 }).catch(() => undefined);
    rmSync(parent, { recursive: true, force: true });
  };
  const started = Date.now();
  let out: string;
  try {
    ({ stdout: out } = await run('bash', [CLUSTER, 'start', dir], { timeout: 120_000, maxBuffer: 16 << 20 }));
  } catch (e) {
    await teardown();
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
      const t = Date.now();
      await teardown();
      console.log(`ceph: cluster stopped and removed in ${Date.now() - t} ms`);
    },
  };
}
