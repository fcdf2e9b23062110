// vhostd net driven by DPDK testpmd (txonly, 64-byte frames, one queue pair)
// with no guest: packets a second reaching the tap and vhostd's CPU per packet.
// With --baseline REV the same run also drives a build of that revision,
// alternating the two, so a change to the net path is measured against it.
// Usage: npm run bench:net-pmd [-- --rounds N --seconds S --baseline REV]
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { launch } from '../test/e2e/daemons.js';
import { provisionGuestKit } from '../test/e2e/guest.js';
import { Netns } from '../test/e2e/netns.js';
import { ROOT, VHOSTD_BIN } from '../test/support/children.js';
import { startTestpmd, testpmdAvailable } from '../test/support/testpmd.js';
import { median } from './stats.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    seconds: { type: 'string', default: '5' },
    baseline: { type: 'string' },
  },
});
const rounds = Number(values.rounds);
const seconds = Number(values.seconds);
const TAP = 'vbpmd0';
const TICK_US = 1e6 / Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** utime + stime of a process, in µs. */
function cpuUs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) * TICK_US;
}

/** A build of `rev` in a worktree of its own (sharing this checkout's node_modules); returns its daemon. */
function buildRevision(rev: string): string {
  const sha = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', rev], { encoding: 'utf8' }).trim();
  const dir = join(tmpdir(), `vhostd-baseline-${sha}`);
  const bin = join(dir, 'dist', 'daemon.js');
  if (existsSync(join(dir, '.built'))) return bin;
  execFileSync('rm', ['-rf', dir]);
  execFileSync('git', ['-C', ROOT, 'worktree', 'prune']);
  execFileSync('git', ['-C', ROOT, 'worktree', 'add', '--detach', dir, sha], { stdio: 'inherit' });
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  execFileSync('npm', ['run', '--silent', 'install'], { cwd: dir, stdio: 'inherit' }); // node-gyp, as npm ci runs it
  execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: dir, stdio: 'inherit' });
  writeFileSync(join(dir, '.built'), sha);
  return bin;
}

interface Sample {
  build: string;
  pps: number;
  cpuUsPerPacket: number;
  /** vhostd's share of one core over the window. */
  cores: number;
}

async function measure(ns: Netns, build: string, bin: string, dir: string): Promise<Sample> {
  const d = await launch(
    'ip',
    ['netns', 'exec', ns.name, process.execPath, bin, 'net', '--socket', join(dir, 'net.sock'), '--tap', TAP, '--log-level', 'warn'],
    join(dir, 'net.sock'),
    /# attach with:/,
  );
  const pmd = await startTestpmd(d.socket, 'txonly');
  try {
    const onTap = (): number =>
      Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/rx_packets /sys/class/net/${TAP}/statistics/rx_dropped`).split('\n').reduce((a, b) => a + Number(b || 0), 0));
    await new Promise((r) => setTimeout(r, 1000)); // warm-up
    const p0 = onTap();
    const c0 = cpuUs(d.pid);
    const t0 = process.hrtime.bigint();
    await new Promise((r) => setTimeout(r, seconds * 1000));
    const p1 = onTap();
    const c1 = cpuUs(d.pid);
    const wall = Number(process.hrtime.bigint() - t0) / 1e3;
    const packets = p1 - p0;
    if (packets <= 0) throw new Error(`${build}: no packets reached the tap in ${seconds} s\n${d.output()}`);
    return { build, pps: packets / (wall / 1e6), cpuUsPerPacket: (c1 - c0) / packets, cores: (c1 - c0) / wall };
  } finally {
    await pmd.stopForwarding().catch(() => undefined);
    await pmd.quit().catch(() => pmd.kill());
    await d.stop();
  }
}

async function main(): Promise<void> {
  await provisionGuestKit(); // installs dpdk-dev with the rest of the test kit
  if (!testpmdAvailable()) throw new Error('dpdk-testpmd is not installed');
  const builds: [string, string][] = [['current', VHOSTD_BIN]];
  if (values.baseline) builds.push([`baseline ${values.baseline}`, buildRevision(values.baseline)]);
  const ns = new Netns('bpmd');
  ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-bench-pmd-'));
  const samples: Sample[] = [];
  try {
    for (let i = 0; i < rounds; i++) {
      const order = i % 2 ? [...builds].reverse() : builds;
      for (const [build, bin] of order) {
        const s = await measure(ns, build, bin, dir);
        samples.push(s);
        console.log(`round ${i + 1}: ${build.padEnd(20)} ${(s.pps / 1e3).toFixed(0)} kpps, ${s.cpuUsPerPacket.toFixed(3)} µs CPU per packet, ${s.cores.toFixed(2)} cores`);
      }
    }
  } finally {
    ns.destroy();
    await rm(dir, { recursive: true, force: true });
  }
  console.log(`\ntestpmd txonly (64-byte frames, 1 queue pair) through vhostd to a tap, ${seconds} s x ${rounds} rounds, medians:`);
  console.log('| build | kpps | vhostd CPU per packet (µs) | cores |');
  console.log('|---|---|---|---|');
  const rows = builds.map(([build]) => {
    const mine = samples.filter((s) => s.build === build);
    return { build, pps: median(mine.map((s) => s.pps)), cpu: median(mine.map((s) => s.cpuUsPerPacket)), cores: median(mine.map((s) => s.cores)) };
  });
  for (const r of rows) console.log(`| ${r.build} | ${(r.pps / 1e3).toFixed(0)} | ${r.cpu.toFixed(3)} | ${r.cores.toFixed(2)} |`);
  if (rows.length === 2) {
    console.log(`current / baseline: ${(rows[0]!.pps / rows[1]!.pps).toFixed(2)}x pps, ${(rows[0]!.cpu / rows[1]!.cpu).toFixed(2)}x CPU per packet`);
  }
  mkdirSync(join(ROOT, 'bench', 'results'), { recursive: true });
  const file = join(ROOT, 'bench', 'results', `net-pmd-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, JSON.stringify({ seconds, rounds, samples, medians: rows }, null, 2));
  console.log(`results: ${file}`);
}

await main();
