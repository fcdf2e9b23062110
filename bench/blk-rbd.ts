// Backend-bound benchmark on Ceph RBD: the C load generator drives vhostd
// --rbd and qemu-storage-daemon's rbd driver, both on one image of a
// throw-away single-node cluster (test/ceph/cluster.sh), alternating in every
// round; medians over rounds. `rbd bench` on the same image is the ceiling.
// Prints a table with the vhostd / qsd ratios and writes JSON to bench/results/.
//
// Usage: npm run bench:blk-rbd [-- --rounds N --seconds S]
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { startCluster } from '../test/support/ceph.js';
import { launch, startVhostd, type Backend } from '../test/e2e/daemons.js';
import { buildLoadgen, runLoadgen, type LoadgenResult, type Rw } from './blk-backend/loadgen.js';
import { median } from './stats.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' }, seconds: { type: 'string', default: '5' } } });
const rounds = Number(values.rounds);
const seconds = Number(values.seconds);
const IMAGE = 256 << 20;
const WORKLOADS: { name: string; rw: Rw; qd: number }[] = [
  { name: '4k-randread-qd1', rw: 'randread', qd: 1 },
  { name: '4k-randread-qd32', rw: 'randread', qd: 32 },
  { name: '4k-randwrite-qd1', rw: 'randwrite', qd: 1 },
  { name: '4k-randwrite-qd32', rw: 'randwrite', qd: 32 },
];

async function main(): Promise<void> {
  buildLoadgen();
  const cluster = await startCluster();
  const dir = mkdtempSync(join(tmpdir(), 'vhostd-bench-rbd-'));
  try {
    const spec = await cluster.createImage('bench', IMAGE);
    // Written all over, so reads fetch real objects.
    await cluster.rbd('bench', '--io-type', 'write', '--io-size', '4M', '--io-threads', '4', '--io-total', String(IMAGE), '--io-pattern', 'seq', spec);
    const ceiling: Record<string, string> = {};
    for (const [type, threads] of [['read', '1'], ['read', '32'], ['write', '1'], ['write', '32']] as const) {
      const out = await cluster.rbd('bench', '--io-type', type, '--io-size', '4K', '--io-threads', threads, '--io-total', '64M', '--io-pattern', 'rand', spec);
      ceiling[`4k-rand${type}-qd${threads}`] = /ops\/sec: ([\d.]+)/.exec(out)?.[1] ?? '?';
    }
    const [pool, name] = spec.split('/') as [string, string];
    const backends: [string, () => Promise<Backend>][] = [
      ['vhostd', () => startVhostd(['--rbd', spec, '--ceph-conf', cluster.conf, '--log-level', 'warn'], join(dir, 'vhostd.sock'))],
      ['qsd', () => launch('qemu-storage-daemon', [
        '--blockdev', `driver=rbd,node-name=f0,pool=${pool},image=${name},conf=${cluster.conf},user=admin`,
        '--export', `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${join(dir, 'qsd.sock')},writable=on,num-queues=1`,
      ], join(dir, 'qsd.sock'))],
    ];
    const samples: { round: number; workload: string; backend: string; r: LoadgenResult }[] = [];
    for (let round = 0; round < rounds; round++) {
      for (const [wi, w] of WORKLOADS.entries()) {
        const order = (round + wi) % 2 ? [...backends].reverse() : backends;
        for (const [bname, start] of order) {
          // One daemon at a time: two writers on one image would pass the exclusive lock back and forth.
          const b = await start();
          try {
            const r = await runLoadgen({ socket: b.socket, rw: w.rw, bs: 4096, qd: w.qd, queues: 1, seconds, warmup: 1, size: IMAGE, backendPid: b.pid });
            samples.push({ round, workload: w.name, backend: bname, r });
            console.error(`round ${round + 1}/${rounds} ${w.name.padEnd(18)} ${bname.padEnd(6)} ${r.iops.toFixed(0).padStart(7)} IOPS  p99 ${r.lat_us.p99.toFixed(0)} µs  backend ${r.backend_cpu_us_per_io.toFixed(1)} µs/IO`);
          } finally {
            await b.stop();
          }
        }
      }
    }
    const rows = WORKLOADS.map((w) => {
      const m = (b: string, f: (r: LoadgenResult) => number): number => median(samples.filter((s) => s.workload === w.name && s.backend === b).map((s) => f(s.r)));
      const v = { iops: m('vhostd', (r) => r.iops), cpu: m('vhostd', (r) => r.backend_cpu_us_per_io), p99: m('vhostd', (r) => r.lat_us.p99) };
      const q = { iops: m('qsd', (r) => r.iops), cpu: m('qsd', (r) => r.backend_cpu_us_per_io), p99: m('qsd', (r) => r.lat_us.p99) };
      return { workload: w.name, vhostd: v, qsd: q, ceiling: ceiling[w.name] };
    });
    const md = [
      `| workload | vhostd IOPS | qsd IOPS | vhostd / qsd IOPS | back-end CPU µs/IO (vhostd / qsd) | p99 µs (vhostd / qsd) | rbd bench IOPS |`,
      '|---|---|---|---|---|---|---|',
      ...rows.map((r) =>
        `| ${r.workload} | ${r.vhostd.iops.toFixed(0)} | ${r.qsd.iops.toFixed(0)} | ${(r.vhostd.iops / r.qsd.iops).toFixed(2)}x | ` +
          `${r.vhostd.cpu.toFixed(1)} / ${r.qsd.cpu.toFixed(1)} (${(r.vhostd.cpu / r.qsd.cpu).toFixed(2)}x) | ${r.vhostd.p99.toFixed(0)} / ${r.qsd.p99.toFixed(0)} | ${r.ceiling} |`,
      ),
    ];
    console.log(md.join('\n'));
    const out = join(ROOT, 'bench', 'results');
    mkdirSync(out, { recursive: true });
    const file = join(out, `blk-rbd-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
    writeFileSync(file, JSON.stringify({ rounds, seconds, rows, samples, ceiling, ceph: execFileSync('ceph', ['--version']).toString().trim() }, null, 2));
    console.error(`wrote ${file}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    await cluster.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
