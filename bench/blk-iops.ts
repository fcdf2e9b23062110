// Guest fio 4k random-read IOPS through vhostd and through qemu-storage-daemon,
// measured in one run, alternating back-ends, and reported as a ratio.
// Usage: npm run bench:blk [-- --rounds N --seconds S --iodepth D --jobs J]
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startStorageDaemon, startVhostd, type Backend } from '../test/e2e/daemons.js';
import { provisionGuestKit, runGuest, vhostUserBlkArgs } from '../test/e2e/guest.js';
import { median } from './stats.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    seconds: { type: 'string', default: '10' },
    iodepth: { type: 'string', default: '16' },
    rw: { type: 'string', default: 'randread' },
    bs: { type: 'string', default: '4k' },
  },
});
const rounds = Number(values.rounds);
const IMAGE_BYTES = 512 * 1024 * 1024;

interface Sample {
  backend: string;
  iops: number;
}

async function measure(name: string, backend: Backend): Promise<number> {
  const r = await runGuest({
    devices: vhostUserBlkArgs(backend.socket, { numQueues: 1 }),
    timeoutMs: 300_000,
    script: `
fio --name=bench --filename=/dev/vda --rw=${values.rw} --bs=${values.bs} --direct=1 --ioengine=libaio \\
    --iodepth=${values.iodepth} --runtime=${values.seconds} --time_based --size=256M \\
    --output-format=terse --terse-version=3 > /tmp/fio.txt || exit 1
# terse v3: field 8 is read IOPS, field 49 write IOPS
echo "@@IOPS=$(awk -F';' '{ print $8 + $49 }' /tmp/fio.txt)"
`,
  });
  if (r.exitCode !== 0 || !r.markers.IOPS) throw new Error(`${name}: fio failed\n${r.output.slice(-3000)}`);
  return Number(r.markers.IOPS);
}

async function main(): Promise<void> {
  await provisionGuestKit();
  const dir = await mkdtemp(join(tmpdir(), 'vhostd-bench-'));
  const samples: Sample[] = [];
  try {
    // Fully allocated images with the same contents, so neither side reads holes.
    for (const f of ['vhostd.img', 'qsd.img']) {
      const fh = await open(join(dir, f), 'w');
      const chunk = Buffer.alloc(4 * 1024 * 1024, 0x5a);
      for (let off = 0; off < IMAGE_BYTES; off += chunk.length) await fh.write(chunk, 0, chunk.length, off);
      await fh.close();
      await truncate(join(dir, f), IMAGE_BYTES);
    }
    for (let i = 0; i < rounds; i++) {
      const order = i % 2 ? ['qsd', 'vhostd'] : ['vhostd', 'qsd'];
      for (const name of order) {
        const sock = join(dir, `${name}.sock`);
        const b =
          name === 'vhostd'
            ? await startVhostd(['--file', join(dir, 'vhostd.img'), '--log-level', 'warn'], sock)
            : await startStorageDaemon(join(dir, 'qsd.img'), sock);
        try {
          const iops = await measure(name, b);
          samples.push({ backend: name, iops });
          console.log(`round ${i + 1}: ${name.padEnd(7)} ${iops.toFixed(0)} IOPS`);
        } finally {
          await b.stop();
        }
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const v = median(samples.filter((s) => s.backend === 'vhostd').map((s) => s.iops));
  const q = median(samples.filter((s) => s.backend === 'qsd').map((s) => s.iops));
  console.log(`\nfio ${values.rw} bs=${values.bs} iodepth=${values.iodepth}, ${values.seconds}s x ${rounds} rounds, guest under TCG`);
  console.log(`median vhostd: ${v.toFixed(0)} IOPS`);
  console.log(`median qemu-storage-daemon: ${q.toFixed(0)} IOPS`);
  console.log(`ratio vhostd/qsd: ${(v / q).toFixed(2)}`);
}

await main();
