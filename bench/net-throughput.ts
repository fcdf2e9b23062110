// Guest TCP throughput (iperf3, both directions) through vhostd and through
// QEMU's own userspace tap back-end (-netdev tap,vhost=off), in one run,
// alternating back-ends, reported as ratios. Usage: npm run bench:net [-- --rounds N --seconds S]
import { parseArgs } from 'node:util';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVhostdNet } from '../test/e2e/daemons.js';
import { provisionGuestKit, runGuest, vhostUserNetArgs } from '../test/e2e/guest.js';
import { Netns } from '../test/e2e/netns.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' }, seconds: { type: 'string', default: '8' } } });
const HOST_IP = '10.213.1.1';
const GUEST_IP = '10.213.1.2';

const script = `
ip link set eth0 up && ip addr add ${GUEST_IP}/24 dev eth0
for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1 && break; done
echo "@@TX=$(iperf3 -c ${HOST_IP} -t ${values.seconds} -f m | grep receiver | awk '{print $7}')"
echo "@@RX=$(iperf3 -c ${HOST_IP} -t ${values.seconds} -f m -R | grep receiver | awk '{print $7}')"
`;

async function measure(ns: Netns, backend: 'vhostd' | 'qemu-tap', dir: string): Promise<{ tx: number; rx: number }> {
  const tap = backend === 'vhostd' ? 'vbv0' : 'vbq0';
  let stop = async (): Promise<unknown> => undefined;
  let devices: string[];
  if (backend === 'vhostd') {
    const d = await startVhostdNet(ns.name, ['--tap', tap, '--log-level', 'warn'], join(dir, 'net.sock'));
    stop = d.stop;
    devices = vhostUserNetArgs(d.socket, { extra: 'vectors=0' });
  } else {
    ns.ip(`tuntap add ${tap} mode tap vnet_hdr`);
    ns.ip(`link set ${tap} up`);
    stop = async () => ns.ip(`link del ${tap}`);
    devices = ['-netdev', `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=off`, '-device', 'virtio-net-pci,netdev=n0'];
  }
  try {
    ns.ip(`addr add ${HOST_IP}/24 dev ${tap}`);
    const server = ns.spawn('iperf3', ['-s', '-B', HOST_IP]);
    await ns.waitListening(5201);
    const r = await runGuest({ devices, script, timeoutMs: 300_000, netns: backend === 'qemu-tap' ? ns.name : undefined });
    server.kill('SIGKILL');
    const tx = Number(r.markers.TX);
    const rx = Number(r.markers.RX);
    if (!(tx > 0 && rx > 0)) throw new Error(`${backend}: iperf3 failed\n${r.output.slice(-3000)}`);
    return { tx, rx };
  } finally {
    await stop();
  }
}

async function main(): Promise<void> {
  await provisionGuestKit();
  const ns = new Netns('bench');
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-netbench-'));
  const res: Record<string, { tx: number[]; rx: number[] }> = { vhostd: { tx: [], rx: [] }, 'qemu-tap': { tx: [], rx: [] } };
  try {
    for (let i = 0; i < Number(values.rounds); i++) {
      for (const b of (i % 2 ? ['qemu-tap', 'vhostd'] : ['vhostd', 'qemu-tap']) as ('vhostd' | 'qemu-tap')[]) {
        const m = await measure(ns, b, dir);
        res[b]!.tx.push(m.tx);
        res[b]!.rx.push(m.rx);
        console.log(`round ${i + 1}: ${b.padEnd(8)} guest->host ${m.tx} Mbit/s, host->guest ${m.rx} Mbit/s`);
      }
    }
  } finally {
    ns.destroy();
    await rm(dir, { recursive: true, force: true });
  }
  const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const v = res.vhostd!;
  const q = res['qemu-tap']!;
  console.log(`\niperf3 TCP, ${values.seconds}s x ${values.rounds} rounds, 1 queue pair, guest under TCG (medians, Mbit/s)`);
  console.log(`guest->host: vhostd ${med(v.tx)}  qemu-tap ${med(q.tx)}  ratio ${(med(v.tx) / med(q.tx)).toFixed(2)}`);
  console.log(`host->guest: vhostd ${med(v.rx)}  qemu-tap ${med(q.rx)}  ratio ${(med(v.rx) / med(q.rx)).toFixed(2)}`);
}

await main();
