// Does vhostd net throughput scale with queue pairs? Guest with 2 vCPUs, 4
// parallel iperf3 streams each way; vhostd with 1 pair, 2 pairs on a thread
// each, and 2 pairs on its main thread, rotating in one run. Reports Mbit/s
// and vhostd's CPU seconds per GB moved. Usage: npm run bench:net-scaling [-- --rounds N]
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVhostdNet } from '../test/e2e/daemons.js';
import { provisionGuestKit, runGuest, vhostUserNetArgs } from '../test/e2e/guest.js';
import { Netns } from '../test/e2e/netns.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '2' }, seconds: { type: 'string', default: '8' } } });
const HOST_IP = '10.213.2.1';
const GUEST_IP = '10.213.2.2';
const script = `
ip link set eth0 up && ip addr add ${GUEST_IP}/24 dev eth0
for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1 && break; done
echo "@@TX=$(iperf3 -c ${HOST_IP} -P 4 -t ${values.seconds} -f m | grep 'SUM.*receiver' | awk '{print $6}')"
echo "@@RX=$(iperf3 -c ${HOST_IP} -P 4 -t ${values.seconds} -f m -R | grep 'SUM.*receiver' | awk '{print $6}')"
`;

/** User + system CPU seconds of a process, all its threads. */
function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** What is compared, in one run: one pair, two pairs on a thread each (the default), two pairs sharing the main thread. */
const LAYOUTS = [
  { name: '1 pair', pairs: 1, args: [] as string[] },
  { name: '2 pairs, 2 threads', pairs: 2, args: [] as string[] },
  { name: '2 pairs, main thread', pairs: 2, args: ['--threads', '0'] },
];

async function main(): Promise<void> {
  await provisionGuestKit();
  const ns = new Netns('scale');
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-scale-'));
  const res = LAYOUTS.map(() => ({ tx: [] as number[], rx: [] as number[], cpuPerGB: [] as number[] }));
  try {
    for (let i = 0; i < Number(values.rounds); i++) {
      // Rotate the order each round, so no layout always runs first or last.
      for (let k = 0; k < LAYOUTS.length; k++) {
        const li = (k + i) % LAYOUTS.length;
        const { name, pairs, args } = LAYOUTS[li]!;
        const tap = `vsc${li}`;
        const d = await startVhostdNet(ns.name, ['--tap', tap, '--num-queues', String(pairs), ...args, '--log-level', 'warn'], join(dir, 'net.sock'));
        try {
          ns.ip(`addr add ${HOST_IP}/24 dev ${tap}`);
          const server = ns.spawn('iperf3', ['-s', '-B', HOST_IP]);
          await ns.waitListening(5201);
          const cpu0 = cpuSeconds(d.pid);
          const r = await runGuest({ smp: 2, devices: vhostUserNetArgs(d.socket, { queuePairs: pairs, extra: 'vectors=0' }), script, timeoutMs: 300_000 });
          const cpu = cpuSeconds(d.pid) - cpu0;
          server.kill('SIGKILL');
          const tx = Number(r.markers.TX);
          const rx = Number(r.markers.RX);
          if (!(tx > 0 && rx > 0)) throw new Error(`iperf3 failed\n${r.output.slice(-3000)}`);
          // CPU per byte is steadier than throughput here: vhostd's threads compete with the guest's vCPUs.
          const gbytes = ((tx + rx) * Number(values.seconds)) / 8 / 1000;
          res[li]!.tx.push(tx);
          res[li]!.rx.push(rx);
          res[li]!.cpuPerGB.push(cpu / gbytes);
          console.log(`round ${i + 1}: ${name.padEnd(20)} guest->host ${tx} Mbit/s, host->guest ${rx} Mbit/s; vhostd CPU ${cpu.toFixed(1)} s, ${(cpu / gbytes).toFixed(2)} s/GB`);
        } finally {
          await d.stop();
        }
      }
    }
  } finally {
    ns.destroy();
    await rm(dir, { recursive: true, force: true });
  }
  const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
  console.log(`\n4 iperf3 streams each way, 2 vCPUs, TCG guest, ${values.rounds} rounds (medians; scaling against 1 pair)`);
  const one = res[0]!;
  LAYOUTS.forEach((l, i) => {
    const r = res[i]!;
    console.log(
      `${l.name.padEnd(20)} guest->host ${med(r.tx)} Mbit/s (${(med(r.tx) / med(one.tx)).toFixed(2)}), ` +
        `host->guest ${med(r.rx)} Mbit/s (${(med(r.rx) / med(one.rx)).toFixed(2)}), vhostd CPU ${med(r.cpuPerGB).toFixed(2)} s/GB`,
    );
  });
}

await main();
