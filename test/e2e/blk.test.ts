// vhostd blk under a real Linux guest (QEMU TCG): geometry, data integrity
// checked inside the guest and on the host image, ext4, multi-queue, a legacy
// driver, a guest above 4 GiB, and several guests in turn on one daemon.
import { createHash } from 'node:crypto';
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startVhostd, type Backend } from './daemons.js';
import { provisionGuestKit, qemuAvailable, runGuest, vhostUserBlkArgs, type GuestResult } from './guest.js';

const MiB = 1024 * 1024;
const IMAGE_MIB = 256;
const PATTERN_OFFSET_MIB = 200; // past anything mkfs touches in the first part of the disk
const GUEST_TIMEOUT = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 420_000);

// In CI a missing QEMU is a failure, never a skip.
const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;

async function hostMd5(path: string, offset: number, length: number): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, offset);
    return createHash('md5').update(buf).digest('hex');
  } finally {
    await fh.close();
  }
}

function expectClean(r: GuestResult): void {
  if (r.exitCode !== 0) throw new Error(`guest script failed (exit ${r.exitCode}):\n${r.output.slice(-6000)}`);
}

/** fio: random writes with crc32c headers, then a separate verify-only pass. */
const FIO_VERIFY = `
fio --name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --offset=64M --ioengine=libaio --iodepth=8 --direct=1 \\
    --verify=crc32c --do_verify=0 --randrepeat=1 --output-format=terse --terse-version=3 > /tmp/fio-w.txt || exit 11
fio --name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --offset=64M --ioengine=libaio --iodepth=8 --direct=1 \\
    --verify=crc32c --verify_only --randrepeat=1 --output-format=terse --terse-version=3 > /tmp/fio-v.txt || exit 12
echo "@@FIO_WRITE_ERR=$(cut -d';' -f5 /tmp/fio-w.txt)"
echo "@@FIO_VERIFY_ERR=$(cut -d';' -f5 /tmp/fio-v.txt)"
`;

run('vhostd blk with a real guest', () => {
  let dir: string;
  let image: string;
  let daemon: Backend | undefined;

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-'));
    image = join(dir, 'disk.img');
    await truncate(image, IMAGE_MIB * MiB).catch(async () => (await open(image, 'w')).close());
    await truncate(image, IMAGE_MIB * MiB);
    daemon = await startVhostd(['--file', image, '--num-queues', '2', '--serial', 'vhostd-e2e-1', '--log-level', process.env.VHOSTD_E2E_LOG_LEVEL ?? 'info'], join(dir, 'blk.sock'));
  });

  afterAll(async () => {
    if (process.env.VHOSTD_E2E_LOG) await import("node:fs").then((fs) => fs.writeFileSync(process.env.VHOSTD_E2E_LOG!, daemon?.output() ?? ""));
    const code = await daemon?.stop();
    expect(code).toBe(0); // SIGTERM drains and exits 0
    await rm(dir, { recursive: true, force: true });
  });

  it(
    'exposes the configured disk, survives fio verify and an ext4 cycle (2 queues, 2 vCPUs)',
    async () => {
      const r = await runGuest({
        smp: 2,
        devices: vhostUserBlkArgs(daemon!.socket, { numQueues: 2 }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
set -x
echo "@@SIZE=$(cat /sys/block/vda/size)"
echo "@@RO=$(cat /sys/block/vda/ro)"
echo "@@LBS=$(cat /sys/block/vda/queue/logical_block_size)"
echo "@@QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "@@SERIAL=$(cat /sys/block/vda/serial)"
echo "@@WCACHE=$(cat /sys/block/vda/queue/write_cache)"
# Write-through (SET_CONFIG of the writeback byte): fio runs with durable writes.
echo "write through" > /sys/block/vda/cache_type || exit 9
echo "@@CACHE_WT=$(cat /sys/block/vda/cache_type)"
${FIO_VERIFY}
echo "write back" > /sys/block/vda/cache_type || exit 10
echo "@@CACHE_WB=$(cat /sys/block/vda/cache_type)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=1M seek=${PATTERN_OFFSET_MIB} conv=fsync 2>/dev/null || exit 13
echo 3 > /proc/sys/vm/drop_caches
echo "@@PATTERN_MD5=$(md5sum /tmp/pattern | cut -d' ' -f1)"
echo "@@READBACK_MD5=$(dd if=/dev/vda bs=1M skip=${PATTERN_OFFSET_MIB} count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
mkfs.ext4 -q -F -b 4096 /dev/vda 48M || exit 14
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt || exit 15
dd if=/dev/urandom of=/mnt/file bs=1M count=6 2>/dev/null
md5sum /mnt/file | cut -d' ' -f1 > /tmp/file.md5
echo "@@FILE_MD5=$(cat /tmp/file.md5)"
umount /mnt || exit 16
e2fsck -f -n /dev/vda > /tmp/fsck.txt 2>&1; echo "@@FSCK=$?"
mount -t ext4 /dev/vda /mnt || exit 17
echo "@@FILE_MD5_AFTER=$(md5sum /mnt/file | cut -d' ' -f1)"
umount /mnt
`,
      });
      expectClean(r);
      const m = r.markers;
      expect(m.SIZE).toBe(String((IMAGE_MIB * MiB) / 512));
      expect(m.RO).toBe('0');
      expect(m.LBS).toBe('512');
      expect(m.QUEUES).toBe('2');
      expect(m.SERIAL).toBe('vhostd-e2e-1');
      expect(m.WCACHE).toBe('write back');
      expect(m.CACHE_WT).toBe('write through');
      expect(m.CACHE_WB).toBe('write back');
      expect(daemon!.output()).toMatch(/"writeback":false,"msg":"cache mode changed by the driver"/);
      expect(m.FIO_WRITE_ERR).toBe('0');
      expect(m.FIO_VERIFY_ERR).toBe('0');
      expect(m.READBACK_MD5).toBe(m.PATTERN_MD5);
      expect(await hostMd5(image, PATTERN_OFFSET_MIB * MiB, 8 * MiB)).toBe(m.PATTERN_MD5);
      expect(m.FSCK).toBe('0');
      expect(m.FILE_MD5_AFTER).toBe(m.FILE_MD5);
    },
    GUEST_TIMEOUT + 60_000,
  );

  it(
    'serves a second guest on the same daemon, with a legacy (virtio 0.9) driver',
    async () => {
      const r = await runGuest({
        devices: vhostUserBlkArgs(daemon!.socket, { numQueues: 1, extra: 'disable-modern=on,disable-legacy=off' }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@LEGACY=$(cat /sys/bus/virtio/devices/virtio*/features | head -c 33 | tail -c 1)"
echo "@@QUEUES=$(ls /sys/block/vda/mq | wc -l)"
e2fsck -f -n /dev/vda > /tmp/fsck.txt 2>&1; echo "@@FSCK=$?"
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt || exit 20
echo "@@FILE_MD5=$(md5sum /mnt/file | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/second bs=1M count=2 2>/dev/null
umount /mnt
${FIO_VERIFY.replace(/--offset=64M/g, '--offset=128M')}
`,
      });
      expectClean(r);
      // Bit 32 (VERSION_1) of the negotiated features is 0 for a legacy driver.
      expect(r.markers.LEGACY).toBe('0');
      expect(r.markers.QUEUES).toBe('1');
      expect(r.markers.FSCK).toBe('0');
      expect(r.markers.FILE_MD5).toMatch(/^[0-9a-f]{32}$/);
      expect(r.markers.FIO_WRITE_ERR).toBe('0');
      expect(r.markers.FIO_VERIFY_ERR).toBe('0');
    },
    GUEST_TIMEOUT + 60_000,
  );

  it(
    'works for a 5 GiB guest, whose memory has a region above 4 GiB',
    async () => {
      const r = await runGuest({
        memory: '5G',
        devices: vhostUserBlkArgs(daemon!.socket, { numQueues: 1 }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@MEMTOTAL_KB=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
# x86-64 Linux allocates from ZONE_NORMAL (above 4 GiB here) first, so these buffers live high.
${FIO_VERIFY.replace(/--offset=64M/g, '--offset=160M')}
dd if=/dev/urandom of=/tmp/big bs=1M count=32 2>/dev/null
dd if=/tmp/big of=/dev/vda bs=4M seek=${PATTERN_OFFSET_MIB / 4} oflag=direct 2>/dev/null || exit 30
echo "@@BIG_MD5=$(md5sum /tmp/big | cut -d' ' -f1)"
echo "@@BIG_BACK=$(dd if=/dev/vda bs=4M skip=${PATTERN_OFFSET_MIB / 4} count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
`,
      });
      expectClean(r);
      expect(Number(r.markers.MEMTOTAL_KB)).toBeGreaterThan(4 * 1024 * 1024);
      expect(r.markers.FIO_WRITE_ERR).toBe('0');
      expect(r.markers.FIO_VERIFY_ERR).toBe('0');
      expect(r.markers.BIG_BACK).toBe(r.markers.BIG_MD5);
      expect(await hostMd5(image, PATTERN_OFFSET_MIB * MiB, 32 * MiB)).toBe(r.markers.BIG_MD5);
      // The daemon saw a region mapped above 4 GiB.
      expect(daemon!.output()).toMatch(/"gpa":"0x1[0-9a-f]{8}"/);
    },
    GUEST_TIMEOUT + 60_000,
  );
});

run('vhostd blk read-only with 4 KiB logical blocks', () => {
  let dir: string;
  let daemon: Backend | undefined;

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-ro-'));
    const image = join(dir, 'ro.img');
    await (await open(image, 'w')).close();
    await truncate(image, 64 * MiB);
    daemon = await startVhostd(['--file', image, '--readonly', '--logical-block-size', '4096', '--serial', 'ro-disk'], join(dir, 'ro.sock'));
  });

  afterAll(async () => {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it(
    'shows ro=1 and 4096-byte blocks, and refuses writes',
    async () => {
      const r = await runGuest({
        devices: vhostUserBlkArgs(daemon!.socket, { numQueues: 1 }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@SIZE=$(cat /sys/block/vda/size)"
echo "@@RO=$(cat /sys/block/vda/ro)"
echo "@@LBS=$(cat /sys/block/vda/queue/logical_block_size)"
echo "@@SERIAL=$(cat /sys/block/vda/serial)"
dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null; echo "@@READ=$?"
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; echo "@@WRITE=$?"
`,
      });
      expectClean(r);
      expect(r.markers.SIZE).toBe(String((64 * MiB) / 512));
      expect(r.markers.RO).toBe('1');
      expect(r.markers.LBS).toBe('4096');
      expect(r.markers.SERIAL).toBe('ro-disk');
      expect(r.markers.READ).toBe('0');
      expect(r.markers.WRITE).not.toBe('0');
    },
    GUEST_TIMEOUT + 60_000,
  );
});
