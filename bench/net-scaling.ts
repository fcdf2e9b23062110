// Does vhostd net throughput scale with queue pairs? Guest with 2 vCPUs, 4
// parallel iperf3 streams each way, vhostd with 1 and then 2 queue pairs,
// alternating in one run. Usage: npm run bench:net-scaling [-- --rounds N]
import { parseArgs } from 'node:util';
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

async function main(): Promise<void> {
  await provisionGuestKit();
  const ns = new Netns('scale');
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-scale-'));
  const res: Record<number, { tx: number[]; rx: number[] }> = { 1: { tx: [], rx: [] }, 2: { tx: [], rx: [] } };
  try {
    for (let i = 0; i < Number(values.rounds); i++) {
      for (const pairs of i % 2 ? [2, 1] : [1, 2]) {
        const tap = `vsc${pairs}`;
        const d = await startVhostdNet(ns.name, ['--tap', tap, '--num-queues', String(pairs), '--log-level', 'warn'], join(dir, 'net.sock'));
        try {
          ns.ip(`addr add ${HOST_IP}/24 dev ${tap}`);
          const server = ns.spawn('iperf3', ['-s', '-B', HOST_IP]);
          await ns.waitListening(5201);
          const r = await runGuest({ smp: 2, devices: vhostUserNetArgs(d.socket, { queuePairs: pairs, extra: 'vectors=0' }), script, timeoutMs: 300_000 });
          server.kill('SIGKILL');
          const tx = Number(r.markers.TX);
          const rx = Number(r.markers.RX);
          if (!(tx > 0 && rx > 0)) throw new Error(`iperf3 failed\n${r.output.slice(-3000)}`);
          res[pairs]!.tx.push(tx);
          res[pairs]!.rx.push(rx);
          console.log(`round ${i + 1}: ${pairs} pair(s): guest->host ${tx} Mbit/s, host->guest ${rx} Mbit/s`);
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
  console.log(`\n4 iperf3 streams each way, 2 vCPUs, TCG guest (medians, Mbit/s)`);
  console.log(`guest->host: 1 pair ${med(res[1]!.tx)}, 2 pairs ${med(res[2]!.tx)}, scaling ${(med(res[2]!.tx) / med(res[1]!.tx)).toFixed(2)}`);
  console.log(`host->guest: 1 pair ${med(res[1]!.rx)}, 2 pairs ${med(res[2]!.rx)}, scaling ${(med(res[2]!.rx) / med(res[1]!.rx)).toFixed(2)}`);
}

await main();
