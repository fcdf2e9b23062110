// Backend-bound virtio-blk benchmark: no guest. A C vhost-user-blk front-end
// (bench/blk-backend/loadgen.c) drives each back-end directly from the host:
// vhostd, qemu-storage-daemon with aio=threads and aio=io_uring, and qsd's
// null-co device as the generator's ceiling. Back-ends alternate within each
// round; medians over rounds. A host fio run on the same image is the cost of
// the I/O itself. Writes a table, a JSON file and a PNG under bench/results/.
//
// Usage: npm run bench:blk-backend [-- --rounds N --seconds S --quick
//          --backends vhostd,qsd-io_uring --workloads 4k-randread-qd32-q1,... --verify]
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, openSync, closeSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { launch, startVhostd, type Backend } from '../test/e2e/daemons.js';
import { buildLoadgen, runLoadgen, type LoadgenResult, type Rw } from './blk-backend/loadgen.js';
import { median } from './stats.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const RESULTS = join(ROOT, 'bench', 'results');

const { values } = parseArgs({
  options: {
    rounds: { type: 'string' },
    seconds: { type: 'string' },
    warmup: { type: 'string' },
    quick: { type: 'boolean', default: false },
    backends: { type: 'string' },
    workloads: { type: 'string' },
    verify: { type: 'boolean', default: false },
    'image-size': { type: 'string', default: String(1 << 30) },
    // tmpfs has no RWF_NOWAIT, so io_uring hands every read to a kernel worker there; a disk
    // file system (ext4, xfs) in the page cache serves a cached read inline, as on a VM host.
    'image-dir': { type: 'string', default: '/dev/shm' },
    'no-fio': { type: 'boolean', default: false },
    'no-chart': { type: 'boolean', default: false },
  },
});

const quick = values.quick!;
const rounds = Number(values.rounds ?? (quick ? 1 : 3));
const seconds = Number(values.seconds ?? (quick ? 2 : 5));
const warmup = Number(values.warmup ?? (quick ? 0.5 : 1));
const IMAGE_BYTES = Number(values['image-size']);

interface Workload {
  name: string;
  rw: Rw;
  bs: number;
  qd: number;
  queues: number;
}

const wl = (rw: Rw, bs: number, qd: number, queues: number): Workload => ({
  name: `${bs / 1024}k-${rw}-qd${qd}-q${queues}`,
  rw,
  bs,
  qd,
  queues,
});

const FULL: Workload[] = [];
for (const rw of ['randread', 'randwrite'] as const)
  for (const queues of [1, 2]) for (const qd of [1, 32, 128]) FULL.push(wl(rw, 4096, qd, queues));
FULL.push(wl('read', 65536, 8, 1), wl('write', 65536, 8, 1));
const QUICK: Workload[] = [wl('randread', 4096, 1, 1), wl('randread', 4096, 32, 1), wl('randwrite', 4096, 32, 2), wl('read', 65536, 8, 1)];

const BACKENDS = ['vhostd', 'vhostd-threads', 'vhostd-poll', 'vhostd-mt', 'qsd-threads', 'qsd-io_uring', 'qsd-null'] as const;
type BackendName = (typeof BACKENDS)[number];
const REAL: BackendName[] = ['vhostd', 'vhostd-threads', 'vhostd-poll', 'vhostd-mt', 'qsd-threads', 'qsd-io_uring'];
/** Run only when --backends names them: vhostd-poll (latency) and vhostd-mt (a queue thread per queue) answer narrower questions. */
const OPTIONAL: BackendName[] = ['vhostd-poll', 'vhostd-mt'];
const MAX_QUEUES = 2;
/** vhostd-poll's --poll-us: long enough to cover a QD1 round trip through the load generator. */
const POLL_US = 100;

const pick = <T extends string>(list: string | undefined, all: readonly T[], what: string): T[] => {
  if (!list) return [...all];
  const names = list.split(',').map((s) => s.trim()).filter(Boolean);
  for (const n of names) if (!all.includes(n as T)) throw new Error(`unknown ${what} ${n}; choose from ${all.join(', ')}`);
  return names as T[];
};

// ---- provisioning ----

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function provision(needFio: boolean, needChart: boolean): void {
  const want: string[] = [];
  if (!have('qemu-storage-daemon')) want.push('qemu-system-common');
  if (needFio && !have('fio')) want.push('fio');
  if (needChart && !have('gnuplot')) want.push('gnuplot-nox');
  if (!have('cc')) want.push('gcc', 'libc6-dev');
  if (!want.length) return;
  console.error(`installing ${want.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  let r = spawnSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...want], { stdio: 'inherit', env });
  if (r.status !== 0) {
    spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
    r = spawnSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...want], { stdio: 'inherit', env });
  }
  if (r.status !== 0) throw new Error(`apt-get install ${want.join(' ')} failed`);
}

/** A fully written image, so reads hit real page-cache pages and not holes. */
function makeImage(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(4 << 20);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
  for (let off = 0; off < bytes; off += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - off), off);
  closeSync(fd);
}

/** Read a file once, so every back-end starts with it in the page cache. */
function warm(path: string): void {
  const fd = openSync(path, 'r');
  const chunk = Buffer.alloc(4 << 20);
  while (readSync(fd, chunk, 0, chunk.length, null) > 0);
  closeSync(fd);
}

// ---- back-ends ----

function startQsd(blockdev: string, socket: string, numQueues: number): Promise<Backend> {
  return launch('qemu-storage-daemon', [
    '--blockdev', blockdev,
    '--export',
    `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${numQueues}`,
  ], socket);
}

function startBackend(name: BackendName, dir: string, image: string): Promise<Backend> {
  const socket = join(dir, `${name}.sock`);
  rmSync(socket, { force: true });
  switch (name) {
    case 'vhostd':
      return startVhostd(['--file', image, '--num-queues', String(MAX_QUEUES), '--log-level', 'warn', '--aio', 'io_uring'], socket);
    case 'vhostd-poll':
      return startVhostd(['--file', image, '--num-queues', String(MAX_QUEUES), '--log-level', 'warn', '--aio', 'io_uring', '--poll-us', String(POLL_US)], socket);
    case 'vhostd-mt':
      return startVhostd(['--file', image, '--num-queues', String(MAX_QUEUES), '--log-level', 'warn', '--aio', 'io_uring', '--threads', String(MAX_QUEUES)], socket);
    case 'vhostd-threads':
      return startVhostd(['--file', image, '--num-queues', String(MAX_QUEUES), '--log-level', 'warn', '--aio', 'threads'], socket);
    case 'qsd-threads':
      return startQsd(`driver=file,node-name=f0,filename=${image},aio=threads,cache.direct=off`, socket, MAX_QUEUES);
    case 'qsd-io_uring':
      return startQsd(`driver=file,node-name=f0,filename=${image},aio=io_uring,cache.direct=off`, socket, MAX_QUEUES);
    case 'qsd-null':
      return startQsd(`driver=null-co,node-name=f0,size=${IMAGE_BYTES}`, socket, MAX_QUEUES);
  }
}

// ---- host fio ----

interface FioResult {
  qd: number;
  iops: number;
  lat_us: { p50: number; p99: number; p999: number };
  cpu_us_per_io: number;
}

function runFio(image: string, qd: number): FioResult {
  const out = execFileSync(
    'fio',
    [
      '--name=host', `--filename=${image}`, '--ioengine=io_uring', '--direct=0', '--rw=randread', '--bs=4k',
      `--iodepth=${qd}`, `--runtime=${seconds}`, `--ramp_time=${warmup}`, '--time_based', `--size=${IMAGE_BYTES}`,
      '--norandommap', '--randrepeat=0', '--output-format=json',
    ],
    { encoding: 'utf8', maxBuffer: 16 << 20 },
  );
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const r = job.read;
  const pct = r.clat_ns.percentile as Record<string, number>;
  const runtimeS = (job.job_runtime ?? r.runtime) / 1000;
  // usr_cpu/sys_cpu are percentages of the job's runtime.
  const cpuUs = ((job.usr_cpu + job.sys_cpu) / 100) * runtimeS * 1e6;
  return {
    qd,
    iops: r.iops,
    lat_us: { p50: pct['50.000000']! / 1000, p99: pct['99.000000']! / 1000, p999: pct['99.900000']! / 1000 },
    cpu_us_per_io: cpuUs / r.total_ios,
  };
}

// ---- statistics and output ----

interface Sample {
  round: number;
  workload: string;
  backend: BackendName;
  result: LoadgenResult;
}

interface Summary {
  iops: number;
  p50: number;
  p99: number;
  p999: number;
  backend_cpu: number;
  gen_cpu: number;
  kicks: number;
  irqs: number;
  n: number;
}

function summarize(samples: Sample[]): Summary {
  const m = (f: (r: LoadgenResult) => number): number => median(samples.map((s) => f(s.result)));
  return {
    iops: m((r) => r.iops),
    p50: m((r) => r.lat_us.p50),
    p99: m((r) => r.lat_us.p99),
    p999: m((r) => r.lat_us.p999),
    backend_cpu: m((r) => r.backend_cpu_us_per_io),
    gen_cpu: m((r) => r.cpu_us_per_io),
    kicks: m((r) => r.kicks_per_io),
    irqs: m((r) => r.interrupts_per_io),
    n: samples.length,
  };
}

const f0 = (x: number): string => (Number.isFinite(x) ? x.toFixed(0) : '-');
const f1 = (x: number): string => (Number.isFinite(x) ? (x >= 100 ? x.toFixed(0) : x.toFixed(1)) : '-');
const f2 = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '-');

function chart(path: string, workloads: Workload[], backends: BackendName[], sum: Map<string, Summary>): void {
  const dat = `${path}.dat`;
  const lines = [`workload ${backends.map((b) => `${b}_iops`).join(' ')} ${backends.map((b) => `${b}_p99`).join(' ')}`];
  for (const w of workloads) {
    const cells = [w.name];
    for (const b of backends) cells.push(String(sum.get(`${w.name}|${b}`)?.iops ?? NaN));
    for (const b of backends) cells.push(String(sum.get(`${w.name}|${b}`)?.p99 ?? NaN));
    lines.push(cells.join(' '));
  }
  writeFileSync(dat, lines.join('\n') + '\n');
  const n = backends.length;
  const script = `
set terminal pngcairo size 1400,900 font "sans,10" noenhanced
set output '${path}'
set datafile missing 'NaN'
names = "${backends.join(' ')}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key top left horizontal
set xtics rotate by -30 scale 0 nomirror
set grid ytics
set logscale y
set multiplot layout 2,1 title "vhost-user-blk back-ends driven directly by loadgen (no guest), medians of ${rounds} round(s)"
set ylabel "IOPS (log)"
plot for [i=2:${n + 1}] '${dat}' using i:xtic(1) title word(names, i - 1)
set ylabel "p99 latency, µs (log)"
plot for [i=${n + 2}:${2 * n + 1}] '${dat}' using i:xtic(1) title word(names, i - ${n + 1})
unset multiplot
`;
  const r = spawnSync('gnuplot', [], { input: script, encoding: 'utf8' });
  if (r.status !== 0) console.error(`gnuplot failed: ${r.stderr}`);
  rmSync(dat, { force: true });
}

// ---- verify mode ----

async function verify(dir: string): Promise<void> {
  const image = join(dir, 'shared.img');
  makeImage(image, IMAGE_BYTES);
  const size = Math.min(IMAGE_BYTES, 256 << 20);
  const steps: [BackendName, 'write' | 'read', number][] = [
    ['vhostd', 'write', 1001],
    ['qsd-io_uring', 'read', 1001],
    ['qsd-io_uring', 'write', 2002],
    ['vhostd', 'read', 2002],
    ['vhostd-threads', 'write', 3003],
    ['vhostd', 'read', 3003],
    ['qsd-threads', 'read', 3003],
  ];
  for (const [name, op, seed] of steps) {
    const b = await startBackend(name, dir, image);
    try {
      const r = await runLoadgen({
        socket: b.socket, qd: 32, queues: 2, size, backendPid: b.pid,
        ...(op === 'write' ? { verifyWrite: seed } : { verifyRead: seed }),
      });
      console.log(`verify: ${name.padEnd(12)} ${op.padEnd(5)} seed ${seed}: ${r.verified} blocks of 4 KiB ok (${f0(r.iops)} IOPS)`);
    } finally {
      await b.stop();
    }
  }
  console.log('verify: data written through each back-end read back intact through the other');
}

// ---- main ----

async function main(): Promise<void> {
  const backends = values.backends ? pick(values.backends, BACKENDS, 'back-end') : BACKENDS.filter((b) => !OPTIONAL.includes(b));
  const all = quick ? QUICK : FULL;
  const workloads = values.workloads ? pick(values.workloads, [...FULL, ...QUICK].map((w) => w.name), 'workload').map((n) => [...FULL, ...QUICK].find((w) => w.name === n)!) : all;
  const doFio = !values['no-fio'] && !values.verify;
  const doChart = !values['no-chart'] && !values.verify;
  provision(doFio, doChart);
  buildLoadgen();
  const dir = mkdtempSync(join(values['image-dir']!, 'vhostd-blk-backend-'));
  const started = new Date();
  const load0 = loadavg();
  try {
    if (values.verify) return await verify(dir);

    console.error(`images: ${IMAGE_BYTES >> 20} MiB x ${backends.filter((b) => b !== 'qsd-null').length} in ${dir}`);
    const base = join(dir, 'base.img');
    makeImage(base, IMAGE_BYTES);
    const images = new Map<BackendName, string>();
    for (const b of backends) {
      if (b === 'qsd-null') continue;
      const img = join(dir, `${b}.img`);
      copyFileSync(base, img);
      warm(img); // a copy may share blocks without passing through the page cache
      images.set(b, img);
    }
    rmSync(base);

    const samples: Sample[] = [];
    const fio: FioResult[] = [];
    const backendLogs: { round: number; backend: string; exit: number | null; lines: string[] }[] = [];
    for (let round = 0; round < rounds; round++) {
      const live = new Map<BackendName, Backend>();
      try {
        for (const b of backends) live.set(b, await startBackend(b, dir, images.get(b) ?? ''));
        for (const [wi, w] of workloads.entries()) {
          // Rotate the order every workload and round, so no back-end always runs first.
          const k = (round + wi) % backends.length;
          const order = [...backends.slice(k), ...backends.slice(0, k)];
          for (const name of order) {
            const b = live.get(name)!;
            const result = await runLoadgen({
              socket: b.socket, rw: w.rw, bs: w.bs, qd: w.qd, queues: w.queues, seconds, warmup,
              size: IMAGE_BYTES, backendPid: b.pid,
            });
            samples.push({ round, workload: w.name, backend: name, result });
            console.error(
              `round ${round + 1}/${rounds} ${w.name.padEnd(20)} ${name.padEnd(12)} ${f0(result.iops).padStart(7)} IOPS` +
                `  p99 ${f1(result.lat_us.p99).padStart(6)} µs  backend ${f2(result.backend_cpu_us_per_io)} µs/IO` +
                `  loadgen ${f2(result.cpu_us_per_io)} µs/IO  kicks ${f2(result.kicks_per_io)}/IO  irqs ${f2(result.interrupts_per_io)}/IO`,
            );
          }
        }
      } finally {
        for (const [name, b] of live) {
          const code = await b.stop();
          // Anything a back-end said at warn level or above (vhostd logs at warn here; qsd prints only trouble).
          const said = b.output().split('\n').filter((l) => l.trim() && !/^# attach with:|^qemu-system-x86_64 /.test(l));
          if (said.length || (code !== 0 && code !== null)) {
            backendLogs.push({ round, backend: name, exit: code, lines: said.slice(-20) });
            console.error(`round ${round + 1}: ${name} exited ${code}${said.length ? `, said:\n  ${said.slice(-5).join('\n  ')}` : ''}`);
          }
        }
      }
      if (doFio) {
        const img = images.values().next().value;
        if (img) {
          for (const qd of [1, 32]) {
            const r = runFio(img, qd);
            fio.push(r);
            console.error(`round ${round + 1}/${rounds} host fio io_uring randread 4k qd${qd}: ${f0(r.iops)} IOPS, ${f2(r.cpu_us_per_io)} µs CPU/IO`);
          }
        }
      }
    }

    // ---- report ----
    const sum = new Map<string, Summary>();
    for (const w of workloads)
      for (const b of backends) sum.set(`${w.name}|${b}`, summarize(samples.filter((s) => s.workload === w.name && s.backend === b)));

    const real = backends.filter((b) => REAL.includes(b));
    const warnings: string[] = [];
    const rows: string[] = [];
    const md: string[] = [];
    md.push(`| workload | ${backends.map((b) => `${b} IOPS`).join(' | ')} | vhostd / qsd-io_uring IOPS | p99 µs (vhostd / qsd-io_uring) | back-end CPU µs/IO (vhostd / qsd-io_uring) | null-co ceiling | loadgen CPU µs/IO |`);
    md.push(`|${'---|'.repeat(backends.length + 6)}`);
    for (const w of workloads) {
      rows.push(`\n${w.name}`);
      rows.push(`  ${'back-end'.padEnd(13)} ${'IOPS'.padStart(8)} ${'p50 µs'.padStart(8)} ${'p99 µs'.padStart(8)} ${'p99.9 µs'.padStart(9)} ${'be CPU/IO'.padStart(10)} ${'gen CPU/IO'.padStart(10)} ${'kicks/IO'.padStart(9)} ${'irqs/IO'.padStart(8)}`);
      for (const b of backends) {
        const s = sum.get(`${w.name}|${b}`)!;
        rows.push(`  ${b.padEnd(13)} ${f0(s.iops).padStart(8)} ${f1(s.p50).padStart(8)} ${f1(s.p99).padStart(8)} ${f1(s.p999).padStart(9)} ${f2(s.backend_cpu).padStart(10)} ${f2(s.gen_cpu).padStart(10)} ${f2(s.kicks).padStart(9)} ${f2(s.irqs).padStart(8)}`);
      }
      const v = sum.get(`${w.name}|vhostd`);
      const u = sum.get(`${w.name}|qsd-io_uring`);
      const nul = sum.get(`${w.name}|qsd-null`);
      const fastest = Math.max(...real.map((b) => sum.get(`${w.name}|${b}`)!.iops));
      const ceiling = nul && real.length ? nul.iops / fastest : NaN;
      if (v && u) rows.push(`  ratio vhostd/qsd-io_uring: IOPS ${f2(v.iops / u.iops)}, p99 ${f2(v.p99 / u.p99)}, back-end CPU/IO ${f2(v.backend_cpu / u.backend_cpu)}`);
      if (Number.isFinite(ceiling)) {
        rows.push(`  null-co ceiling / fastest real back-end: ${f2(ceiling)}`);
        if (ceiling < 3)
          warnings.push(
            `${w.name}: the null-co ceiling is only ${f2(ceiling)}x the fastest real back-end, so the generator (or the shared machine) ` +
              `may limit this workload` + (w.qd === 1 ? ' (at QD 1 the ceiling is two eventfd wake-ups per request, kick and call, more than the generator\'s CPU)' : ''),
          );
      }
      const gen = median(backends.map((b) => sum.get(`${w.name}|${b}`)!.gen_cpu));
      md.push(
        `| ${w.name} | ${backends.map((b) => f0(sum.get(`${w.name}|${b}`)!.iops)).join(' | ')} | ` +
          `${v && u ? f2(v.iops / u.iops) : '-'} | ${v && u ? `${f1(v.p99)} / ${f1(u.p99)}` : '-'} | ` +
          `${v && u ? `${f2(v.backend_cpu)} / ${f2(u.backend_cpu)}` : '-'} | ${Number.isFinite(ceiling) ? `${f1(ceiling)}x` : '-'} | ${f2(gen)} |`,
      );
    }
    const fioSum = [1, 32].map((qd) => {
      const rs = fio.filter((r) => r.qd === qd);
      return { qd, iops: median(rs.map((r) => r.iops)), p99: median(rs.map((r) => r.lat_us.p99)), cpu: median(rs.map((r) => r.cpu_us_per_io)) };
    }).filter((x) => Number.isFinite(x.iops));
    if (fioSum.length) {
      rows.push('\nhost fio, io_uring, buffered 4k randread on the same image (the cost of the I/O itself):');
      for (const x of fioSum) rows.push(`  qd${x.qd}: ${f0(x.iops)} IOPS, p99 ${f1(x.p99)} µs, ${f2(x.cpu)} µs CPU/IO (usr+sys)`);
    }

    console.log(`\nbackend-bound virtio-blk benchmark, ${started.toISOString()}, ${rounds} round(s) x ${seconds}s (+${warmup}s warm-up), medians`);
    console.log(`machine: ${cpus().length} x ${cpus()[0]?.model ?? '?'}, load average at start ${load0.map((x) => x.toFixed(2)).join(' ')}`);
    console.log(rows.join('\n'));
    console.log('\nmarkdown:\n' + md.join('\n'));
    for (const w of warnings) console.log(`\nWARNING: ${w}`);

    mkdirSync(RESULTS, { recursive: true });
    const stamp = started.toISOString().replace(/[:.]/g, '-');
    const jsonPath = join(RESULTS, `blk-backend-${stamp}.json`);
    writeFileSync(
      jsonPath,
      JSON.stringify(
        {
          date: started.toISOString(),
          machine: { cpus: cpus().length, model: cpus()[0]?.model, loadavg_start: load0, loadavg_end: loadavg() },
          config: { rounds, seconds, warmup, image_bytes: IMAGE_BYTES, image_dir: values['image-dir'], quick, backends, workloads },
          summary: Object.fromEntries(sum),
          fio: { samples: fio, medians: fioSum },
          warnings,
          backend_logs: backendLogs,
          samples,
        },
        null,
        1,
      ) + '\n',
    );
    console.log(`\nresults: ${jsonPath}`);
    if (doChart) {
      const png = join(RESULTS, `blk-backend-${stamp}.png`);
      chart(png, workloads, backends, sum);
      console.log(`chart: ${png}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
