// `npm run bench`: every benchmark in turn, each provisioning what it needs
// (QEMU, the guest kit, qemu-storage-daemon, fio, iperf3) and printing its own
// table; this prints where each one's results went and which failed.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const SUITE: { name: string; script: string; what: string }[] = [
  { name: 'bench:blk-backend', script: 'blk-backend.ts', what: 'blk back-end alone (C load generator) vs qemu-storage-daemon' },
  { name: 'bench:blk', script: 'blk-iops.ts', what: 'blk through a TCG guest (fio) vs qemu-storage-daemon' },
  { name: 'bench:net', script: 'net-throughput.ts', what: 'net through a TCG guest (iperf3) vs QEMU tap' },
  { name: 'bench:net-scaling', script: 'net-scaling.ts', what: 'net with one and two queue pairs, threads or not' },
  { name: 'bench:net-pmd', script: 'net-pmd.ts', what: 'net alone (DPDK testpmd txonly) to a tap: packets a second and CPU per packet' },
  { name: 'bench:blk-rbd', script: 'blk-rbd.ts', what: 'blk on Ceph RBD (C load generator) vs qemu-storage-daemon, and rbd bench' },
  { name: 'bench:soak', script: 'soak.ts', what: 'memory and fds over 10 minutes of mixed blk + net load' },
];

const only = process.argv.slice(2);
const failed: string[] = [];
for (const b of SUITE) {
  if (only.length && !only.includes(b.name)) continue;
  console.log(`\n==== ${b.name}: ${b.what} ====`);
  const r = spawnSync('npx', ['vite-node', fileURLToPath(new URL(b.script, import.meta.url))], { stdio: 'inherit' });
  if (r.status !== 0) failed.push(`${b.name} (exit ${r.status ?? r.signal})`);
}
console.log(failed.length ? `\nbenchmarks that failed: ${failed.join(', ')}` : '\nevery benchmark ran; results are under bench/results/');
process.exit(failed.length ? 1 : 0);
