// Memory over a long mixed load, with no guest: one vhostd blk driven by the
// C load generator (reads, writes, 4k and 64k, one and two queues, a new
// connection every phase) and one vhostd net driven by testpmd (transmit, then
// receive from packets injected into the tap, a new connection every phase).
// Reports each daemon's idle RSS and how its RSS and open fds move under load.
// Usage: npm run bench:soak [-- --minutes M]
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildLoadgen, runLoadgen, type Rw } from './blk-backend/loadgen.js';
import { startVhostd, startVhostdNet, type Backend } from '../test/e2e/daemons.js';
import { provisionGuestKit } from '../test/e2e/guest.js';
import { Netns } from '../test/e2e/netns.js';
import { ROOT } from '../test/support/children.js';
import { startTestpmd, testpmdAvailable } from '../test/support/testpmd.js';

const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '10' },
    'sample-seconds': { type: 'string', default: '5' },
  },
});
const minutes = Number(values.minutes);
if (!(minutes >= 3)) throw new Error('--minutes must be at least 3: a minute of ramp-up, a reference minute and a last one');
const sampleMs = Number(values['sample-seconds']) * 1000;
const IMAGE_BYTES = 512 * 1024 * 1024;
const TAP = 'vbsoak0';
const BLK_PHASE_S = 15;
const NET_PHASE_S = 30;
/**
 * The first minute is ramp-up (V8's heap grows to its working size, pools and
 * slots fill); the second is the reference the last minute is compared with.
 */
const MINUTE_MS = 60_000;

const BLK_PHASES: { rw: Rw; bs: number; qd: number; queues: number }[] = [
  { rw: 'randread', bs: 4096, qd: 32, queues: 2 },
  { rw: 'randwrite', bs: 4096, qd: 32, queues: 1 },
  { rw: 'read', bs: 65536, qd: 8, queues: 1 },
  { rw: 'write', bs: 65536, qd: 8, queues: 2 },
  { rw: 'randread', bs: 4096, qd: 1, queues: 1 },
];

/** A "Key:   N kB" field of a /proc file; throws when it is missing. */
function kib(text: string, key: string, pid: number): number {
  const m = text.match(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm'));
  if (!m) throw new Error(`no ${key} for ${pid}`);
  return Number(m[1]);
}
const rssKiB = (pid: number): number => kib(readFileSync(`/proc/${pid}/status`, 'utf8'), 'VmRSS', pid);
/** Idle memory three ways: RSS counts the node binary's pages every node process shares; anon and PSS do not. */
function memory(pid: number): { rssMiB: number; anonMiB: number; pssMiB: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  return { rssMiB: kib(status, 'VmRSS', pid) / 1024, anonMiB: kib(status, 'RssAnon', pid) / 1024, pssMiB: kib(rollup, 'Pss', pid) / 1024 };
}
const fds = (pid: number): number => readdirSync(`/proc/${pid}/fd`).length;

interface Sample {
  t: number;
  blkRss: number;
  netRss: number;
  blkFds: number;
  netFds: number;
}

async function blkLoad(d: Backend, until: number, counts: { phases: number; ios: number }): Promise<void> {
  for (let i = 0; Date.now() + BLK_PHASE_S * 1000 < until; i++) {
    const p = BLK_PHASES[i % BLK_PHASES.length]!;
    const r = await runLoadgen({ socket: d.socket, ...p, seconds: BLK_PHASE_S, warmup: 0, backendPid: d.pid });
    counts.phases++;
    counts.ios += r.ios;
  }
}

/** Frames into the tap from the host side, paced, for `seconds`; testpmd (rxonly) takes them from vhostd. */
function inject(ns: Netns, seconds: number): Promise<void> {
  const script = `
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("${TAP}", 0))
frame = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + bytes(range(46))
end = time.time() + ${seconds}
i = 0
while time.time() < end:
    s.send(frame[:14] + struct.pack("!I", i & 0xffffffff) + frame[18:])
    i += 1
    if i % 64 == 0: time.sleep(0.001)
`;
  const child = ns.spawn('python3', ['-c', script]);
  return new Promise((resolve, reject) => child.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`injector exit ${code}`)))));
}

async function netLoad(ns: Netns, d: Backend, until: number, counts: { phases: number; packets: number }): Promise<void> {
  const onTap = (dir: 'rx' | 'tx'): number => Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/${dir}_packets`));
  for (let i = 0; Date.now() + NET_PHASE_S * 1000 < until; i++) {
    const mode = i % 2 ? 'rxonly' : 'txonly';
    const before = onTap('rx') + onTap('tx');
    const pmd = await startTestpmd(d.socket, mode);
    try {
      if (mode === 'rxonly') await inject(ns, NET_PHASE_S);
      else await new Promise((r) => setTimeout(r, NET_PHASE_S * 1000));
      await pmd.stopForwarding();
    } finally {
      await pmd.quit().catch(() => pmd.kill());
    }
    counts.phases++;
    counts.packets += onTap('rx') + onTap('tx') - before;
  }
}

const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;

async function main(): Promise<void> {
  await provisionGuestKit(); // dpdk-dev comes with the test kit
  if (!testpmdAvailable()) throw new Error('dpdk-testpmd is not installed');
  buildLoadgen();
  const dir = await mkdtemp(join('/dev/shm', 'vhostd-soak-'));
  const sockDir = await mkdtemp(join(tmpdir(), 'vhostd-soak-'));
  const ns = new Netns('soak');
  ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
  let blk: Backend | undefined;
  let net: Backend | undefined;
  try {
    const image = join(dir, 'soak.img');
    const fh = await open(image, 'w');
    const chunk = Buffer.alloc(4 << 20, 0x5a);
    for (let off = 0; off < IMAGE_BYTES; off += chunk.length) await fh.write(chunk, 0, chunk.length, off);
    await fh.close();
    blk = await startVhostd(['--file', image, '--num-queues', '2', '--log-level', 'warn'], join(sockDir, 'blk.sock'));
    net = await startVhostdNet(ns.name, ['--tap', TAP, '--log-level', 'warn'], join(sockDir, 'net.sock'));
    ns.ip(`link set ${TAP} txqueuelen 10000`);
    await new Promise((r) => setTimeout(r, 2000));
    const idle = { blk: rssKiB(blk.pid), net: rssKiB(net.pid), blkFds: fds(blk.pid), netFds: fds(net.pid) };
    const idleMemory = { blk: memory(blk.pid), net: memory(net.pid) };
    for (const name of ['blk', 'net'] as const) {
      const m = idleMemory[name];
      console.log(`idle ${name}: ${m.rssMiB.toFixed(1)} MiB RSS (${m.anonMiB.toFixed(1)} MiB anonymous, PSS ${m.pssMiB.toFixed(1)} MiB), ${name === 'blk' ? idle.blkFds : idle.netFds} fds`);
    }

    const t0 = Date.now();
    const until = t0 + minutes * 60_000;
    const samples: Sample[] = [];
    const sample = (): void => {
      const s = { t: (Date.now() - t0) / 1000, blkRss: rssKiB(blk!.pid), netRss: rssKiB(net!.pid), blkFds: fds(blk!.pid), netFds: fds(net!.pid) };
      samples.push(s);
      if (samples.length % 12 === 1) {
        console.log(`${s.t.toFixed(0).padStart(4)} s: blk ${(s.blkRss / 1024).toFixed(1)} MiB, ${s.blkFds} fds; net ${(s.netRss / 1024).toFixed(1)} MiB, ${s.netFds} fds`);
      }
    };
    const timer = setInterval(sample, sampleMs);
    const blkCounts = { phases: 0, ios: 0 };
    const netCounts = { phases: 0, packets: 0 };
    try {
      await Promise.all([blkLoad(blk, until, blkCounts), netLoad(ns, net, until, netCounts)]);
    } finally {
      clearInterval(timer);
    }
    sample();
    for (const [name, d] of [['blk', blk], ['net', net]] as const) {
      if (d.output().includes('"level":50') || d.output().includes('"level":60')) {
        throw new Error(`vhostd ${name} logged errors during the soak:\n${d.output().slice(-3000)}`);
      }
    }

    const settled = samples.filter((s) => s.t * 1000 >= MINUTE_MS && s.t * 1000 < 2 * MINUTE_MS);
    const last = samples.filter((s) => s.t * 1000 >= minutes * MINUTE_MS - MINUTE_MS);
    const row = (name: 'blk' | 'net'): Record<string, number> => {
      const rss = (s: Sample): number => (name === 'blk' ? s.blkRss : s.netRss);
      const fd = (s: Sample): number => (name === 'blk' ? s.blkFds : s.netFds);
      const first = mean(settled.map(rss));
      const end = mean(last.map(rss));
      return {
        idleMiB: idle[name] / 1024,
        secondMinuteMiB: first / 1024,
        lastMinuteMiB: end / 1024,
        maxMiB: Math.max(...samples.map(rss)) / 1024,
        growthPct: ((end - first) / first) * 100,
        fdsIdle: name === 'blk' ? idle.blkFds : idle.netFds,
        fdsMax: Math.max(...samples.map(fd)),
        fdsEnd: fd(samples[samples.length - 1]!),
      };
    };
    const rows = { blk: row('blk'), net: row('net') };
    console.log(`\n${minutes} min mixed load: blk ${blkCounts.phases} connections, ${blkCounts.ios} I/Os; net ${netCounts.phases} connections, ${netCounts.packets} packets`);
    console.log('| daemon | idle RSS | second minute | last minute | max | growth | fds idle / max / end |');
    console.log('|---|---|---|---|---|---|---|');
    for (const [name, r] of Object.entries(rows)) {
      console.log(
        `| ${name} | ${r.idleMiB!.toFixed(1)} MiB | ${r.secondMinuteMiB!.toFixed(1)} MiB | ${r.lastMinuteMiB!.toFixed(1)} MiB | ${r.maxMiB!.toFixed(1)} MiB | ${r.growthPct! >= 0 ? '+' : ''}${r.growthPct!.toFixed(1)}% | ${r.fdsIdle} / ${r.fdsMax} / ${r.fdsEnd} |`,
      );
    }
    mkdirSync(join(ROOT, 'bench', 'results'), { recursive: true });
    const file = join(ROOT, 'bench', 'results', `soak-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
    writeFileSync(file, JSON.stringify({ minutes, blkCounts, netCounts, idle, idleMemory, rows, samples }, null, 2));
    console.log(`results: ${file}`);
  } finally {
    await blk?.stop();
    await net?.stop();
    ns.destroy();
    await rm(dir, { recursive: true, force: true });
    await rm(sockDir, { recursive: true, force: true });
  }
}

await main();
