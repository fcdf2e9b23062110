// Real guests on a Ceph RBD disk served by vhostd, against a throw-away
// single-node cluster: fio crc32c write and verify plus an ext4 make, mount
// and fsck; SIGKILLs of vhostd with QEMU reconnecting (the inflight record
// resubmits to RBD, and the restarted daemon takes the dead one's exclusive
// lock); and a live migration with both sides on the one image, where RBD's
// exclusive lock moves from the source's vhostd to the destination's.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/ceph.js';
import { startVhostd, type Backend } from './daemons.js';
import { expectCleanFio, fioVerifyScript } from './fio.js';
import { provisionGuestKit, qemuAvailable, runGuest, runMigratingGuest, vhostUserBlkArgs } from './guest.js';
import { expectCleanMigrationFio, expectMigrated, migrationFioScript, summary } from './migrate.js';

const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;
const GUEST_TIMEOUT = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 300_000);
const KILLS = Number(process.env.VHOSTD_RBD_KILLS ?? 3);
const MiB = 1 << 20;

run('real guests on an RBD disk', { timeout: GUEST_TIMEOUT + 180_000 }, () => {
  let cluster: Cluster;
  let dir: string;
  const daemons: Backend[] = [];
  const rbdArgs = (spec: string, ...more: string[]): string[] => ['--rbd', spec, '--ceph-conf', cluster.conf, '--log-level', 'info', ...more];

  beforeAll(async () => {
    await provisionGuestKit();
    cluster = await startCluster();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-rbd-'));
  }, 25 * 60_000);

  afterAll(async () => {
    for (const d of daemons) await d.stop();
    await cluster?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  }, 60_000);

  it('fio write and verify, and an ext4 made, mounted, filled and checked', async () => {
    const spec = await cluster.createImage('guest', 256 * MiB);
    const d = await startVhostd(rbdArgs(spec, '--num-queues', '2'), join(dir, 'guest.sock'));
    daemons.push(d);
    const res = await runGuest({
      smp: 2,
      devices: vhostUserBlkArgs(d.socket, { numQueues: 2 }),
      timeoutMs: GUEST_TIMEOUT,
      script: `
fio --name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio --iodepth=16 --direct=1 \\
    --verify=crc32c --do_verify=0 --randrepeat=1 --output-format=terse --terse-version=3 > /tmp/w.txt 2>&1 || { cat /tmp/w.txt; exit 11; }
fio --name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio --iodepth=16 --direct=1 \\
    --verify=crc32c --verify_only --randrepeat=1 --output-format=terse --terse-version=3 > /tmp/v.txt 2>&1 || { cat /tmp/v.txt; exit 12; }
echo "@@FIO=$(cut -d';' -f5 /tmp/w.txt),$(cut -d';' -f5 /tmp/v.txt)"
mkfs.ext4 -q -F /dev/vda > /tmp/mkfs.txt 2>&1 || { cat /tmp/mkfs.txt; exit 13; }
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt || exit 14
dd if=/dev/urandom of=/mnt/blob bs=1M count=16 2>/dev/null
sum=$(md5sum /mnt/blob | cut -d' ' -f1)
umount /mnt && mount -t ext4 /dev/vda /mnt || exit 15
echo "@@SAME=$([ "$(md5sum /mnt/blob | cut -d' ' -f1)" = "$sum" ] && echo yes || echo no)"
umount /mnt || exit 16
fsck.ext4 -n -f /dev/vda > /tmp/fsck.txt 2>&1; echo "@@FSCK=$?"
echo "@@IOERRORS=$(dmesg | grep -ci 'I/O error')"
`,
    });
    expect(res.exitCode, res.output.slice(-3000)).toBe(0);
    expect(res.markers.FIO).toBe('0,0');
    expect(res.markers.SAME).toBe('yes');
    expect(res.markers.FSCK).toBe('0');
    expect(res.markers.IOERRORS).toBe('0');
    expect(d.output()).toMatch(/"aio":"rbd"/);
  });

  it(`fio verify stays clean across ${KILLS} SIGKILLs of vhostd, QEMU reconnecting`, async () => {
    const spec = await cluster.createImage('kill', 256 * MiB);
    const sock = join(dir, 'kill.sock');
    const args = rbdArgs(spec, '--num-queues', '1');
    let d = await startVhostd(args, sock);
    let kills = 0;
    let killer: Promise<void> | undefined;
    const killLoop = async (): Promise<void> => {
      while (kills < KILLS) {
        await new Promise((r) => setTimeout(r, 3000 + Math.random() * 2000));
        process.kill(d.pid, 'SIGKILL');
        await d.exited;
        kills++;
        d = await startVhostd(args, sock);
      }
    };
    try {
      const res = await runGuest({
        smp: 2,
        timeoutMs: GUEST_TIMEOUT,
        devices: vhostUserBlkArgs(sock, { numQueues: 1, chardev: 'reconnect=1' }),
        onMarker: (key) => {
          if (key === 'FIO_STARTED') killer ??= killLoop();
        },
        script: fioVerifyScript({ rounds: 6, sizeMiB: 32, iodepth: 16 }),
      });
      await killer;
      expectCleanFio(res, 6);
      expect(kills).toBe(KILLS);
    } finally {
      await d.stop();
    }
  });

  it('migrates between two QEMUs whose vhostd serve one RBD image: the exclusive lock follows the writer', async () => {
    const spec = await cluster.createImage('migrate', 64 * MiB);
    const source = await startVhostd(rbdArgs(spec, '--id', 'source'), join(dir, 'source.sock'));
    const dest = await startVhostd(rbdArgs(spec, '--id', 'dest'), join(dir, 'dest.sock'));
    daemons.push(source, dest);
    const res = await runMigratingGuest({
      smp: 2,
      devices: vhostUserBlkArgs(source.socket, { id: 'disk0', numQueues: 1 }),
      destDevices: vhostUserBlkArgs(dest.socket, { id: 'disk0', numQueues: 1 }),
      timeoutMs: GUEST_TIMEOUT,
      // 4 MiB regions: a round on the test cluster's one OSD takes seconds, not tens of them.
      script: migrationFioScript(40, 4),
    });
    summary('rbd blk', res);
    expectMigrated(res);
    // RBD reads are slower than the pre-copy here: the page cache may fill after the switch-over.
    expectCleanMigrationFio(res, { cachedBeforeSwitch: false });
    expect(dest.output()).toMatch(/"aio":"rbd"/);
  });
});
