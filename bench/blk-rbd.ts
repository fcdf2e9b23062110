// Backend-bound benchmark on Ceph RBD: the C load generator drives vhostd
// --rbd and qemu-storage-daemon's rbd driver, both on one image of a
// throw-away single-node cluster (test/ceph/cluster.sh), alternating in every
// round. Each round's back-to-back pair gives one ratio; the table shows their
// median and range, since the OSD drifts more between rounds than the
// back-ends differ. `rbd bench` on the same image is the ceiling.
// Prints a table with the vhostd / qsd ratios and writes JSON to bench/results/.
//
// Usage: npm run bench:blk-rbd [-- --rounds N --seconds S --pin]
// --pin puts the cluster's daemons on the last CPU and this process (so the
// back-ends, the load generator and `rbd bench`) on the others: on a small
// machine the OSD otherwise competes with the back-end it is measuring.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { startCluster } from '../test/support/ceph.js';
import { launch, startVhostd, type Backend } from '../test/e2e/daemons.js';
import { buildLoadgen, runLoadgen, type LoadgenResult, type Rw } from './blk-backend/loadgen.js';
import { median } from './stats.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const { values } = parseArgs({
  options: { rounds: { type: 'string', default: '3' }, seconds: { type: 'string', default: '5' }, pin: { type: 'boolean', default: false } },
});
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
    if (values.pin) pin(cluster.dir);
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
      const of = (b: string): LoadgenResult[] => samples.filter((s) => s.workload === w.name && s.backend === b).map((s) => s.r);
      const [vs, qs] = [of('vhostd'), of('qsd')];
      const summary = (xs: LoadgenResult[]): { iops: number; cpu: number; p99: number } => ({
        iops: median(xs.map((r) => r.iops)),
        cpu: median(xs.map((r) => r.backend_cpu_us_per_io)),
        p99: median(xs.map((r) => r.lat_us.p99)),
      });
      // The OSD's speed drifts from round to round by more than the back-ends differ, so each
      // round's pair (run back to back) gives one ratio, and the table shows their median and range.
      const ratios = (f: (r: LoadgenResult) => number): number[] => vs.map((r, i) => f(r) / f(qs[i]!));
      const iopsRatios = ratios((r) => r.iops);
      const cpuRatios = ratios((r) => r.backend_cpu_us_per_io);
      const paired = {
        iops: median(iopsRatios), iopsMin: Math.min(...iopsRatios), iopsMax: Math.max(...iopsRatios),
        cpu: median(cpuRatios), cpuMin: Math.min(...cpuRatios), cpuMax: Math.max(...cpuRatios),
        vhostdAhead: iopsRatios.filter((x) => x >= 1).length,
      };
      return { workload: w.name, vhostd: summary(vs), qsd: summary(qs), paired, ceiling: ceiling[w.name] };
    });
    const x = (n: number): string => `${n.toFixed(2)}x`;
    const md = [
      `| workload | vhostd IOPS | qsd IOPS | IOPS vhostd / qsd, per round: median (range) | rounds vhostd ahead | back-end CPU µs/IO (vhostd / qsd) | CPU per round: median (range) | p99 µs (vhostd / qsd) | rbd bench IOPS |`,
      '|---|---|---|---|---|---|---|---|---|',
      ...rows.map((r) =>
        `| ${r.workload} | ${r.vhostd.iops.toFixed(0)} | ${r.qsd.iops.toFixed(0)} | ${x(r.paired.iops)} (${x(r.paired.iopsMin)}-${x(r.paired.iopsMax)}) | ${r.paired.vhostdAhead} of ${rounds} | ` +
          `${r.vhostd.cpu.toFixed(1)} / ${r.qsd.cpu.toFixed(1)} | ${x(r.paired.cpu)} (${x(r.paired.cpuMin)}-${x(r.paired.cpuMax)}) | ${r.vhostd.p99.toFixed(0)} / ${r.qsd.p99.toFixed(0)} | ${r.ceiling} |`,
      ),
    ];
    console.log(md.join('\n'));
    const out = join(ROOT, 'bench', 'results');
    mkdirSync(out, { recursive: true });
    const file = join(out, `blk-rbd-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
    writeFileSync(file, JSON.stringify({ rounds, seconds, pinned: values.pin, rows, samples, ceiling, ceph: execFileSync('ceph', ['--version']).toString().trim() }, null, 2));
    console.error(`wrote ${file}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    await cluster.stop();
  }
}

function pin(clusterDir: string): void {
  const last = cpus().length - 1;
  if (last < 1) throw new Error('--pin needs two CPUs');
  const run = join(clusterDir, 'run');
  for (const f of readdirSync(run).filter((n) => n.endsWith('.pid'))) {
    const pid = readFileSync(join(run, f), 'utf8').trim();
    execFileSync('taskset', ['-a', '-p', '-c', String(last), pid], { stdio: 'ignore' });
  }
  execFileSync('taskset', ['-a', '-p', '-c', `0-${last - 1}`, String(process.pid)], { stdio: 'ignore' });
  console.error(`pinned: Ceph daemons on CPU ${last}, back-ends and load generator on 0-${last - 1}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
