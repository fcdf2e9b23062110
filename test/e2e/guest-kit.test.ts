// Proves the guest kit against a known-good vhost-user-blk back-end
// (qemu-storage-daemon), so vhostd's own e2e failures can't be blamed on the kit.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  GuestError,
  hasCommand,
  provisionGuestKit,
  qemuAvailable,
  runGuest,
  vhostUserBlkArgs,
  waitForPath,
} from './guest.js';

const MiB = 1024 * 1024;
const enabled = qemuAvailable() && hasCommand('qemu-storage-daemon');

interface StorageDaemon {
  socket: string;
  stop(): Promise<void>;
}

async function startStorageDaemon(image: string, socket: string): Promise<StorageDaemon> {
  const child: ChildProcess = spawn(
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=f0,filename=${image}`,
      '--export', `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socket},writable=on,num-queues=1`,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const stop = async (): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(t);
  };
  try {
    await Promise.race([
      waitForPath(socket, 15_000),
      exited.then(() => {
        throw new Error(`qemu-storage-daemon exited early: ${stderr}`);
      }),
    ]);
  } catch (err) {
    await stop();
    throw err;
  }
  return { socket, stop };
}

async function readRange(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, offset);
    return buf;
  } finally {
    await fh.close();
  }
}

const md5 = (b: Buffer): string => createHash('md5').update(b).digest('hex');

describe.skipIf(!enabled)('guest kit (QEMU TCG + qemu-storage-daemon)', () => {
  let dir: string;
  const daemons: StorageDaemon[] = [];

  beforeAll(async () => {
    const t0 = Date.now();
    const kit = await provisionGuestKit();
    console.log(`guest kit ready in ${Date.now() - t0} ms: kernel ${kit.kernelRelease} (${kit.kernel})`);
    dir = await mkdtemp(join(tmpdir(), 'vhostd-kit-test-'));
  }, 20 * 60_000);

  afterAll(async () => {
    await Promise.all(daemons.map((d) => d.stop()));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  async function disk(name: string, size: number): Promise<{ image: string; daemon: StorageDaemon }> {
    const image = join(dir, `${name}.img`);
    await writeFile(image, '');
    await truncate(image, size);
    const daemon = await startStorageDaemon(image, join(dir, `${name}.sock`));
    daemons.push(daemon);
    return { image, daemon };
  }

  it('boots, reports markers and the script exit status', async () => {
    const r = await runGuest({
      script: 'echo "@@HELLO=world"\necho "@@KVER=$(uname -r)"\ncat /etc/motd\nexit 7\n',
      files: { '/etc/motd': 'extra file works\n' },
      devices: [],
    });
    console.log(`plain boot: ${r.bootMs} ms to /test.sh, ${r.durationMs} ms total`);
    expect(r.exitCode).toBe(7);
    expect(r.markers.HELLO).toBe('world');
    expect(r.markers.KVER).toMatch(/-amd64$/);
    expect(r.output).toContain('extra file works');
  }, 300_000);

  it('kills the guest on timeout and says so', async () => {
    const err = await runGuest({ script: 'echo "@@STARTED=1"\nsleep 600\n', timeoutMs: 15_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestError);
    const ge = err as GuestError;
    expect(ge.message).toMatch(/timed out after 15000 ms/);
    expect(ge.result.timedOut).toBe(true);
    expect(ge.result.exitCode).toBeNull();
    expect(ge.result.markers.STARTED).toBe('1');
  }, 120_000);

  it('does block I/O, fio verify and ext4 on a vhost-user-blk disk', async () => {
    const { image, daemon } = await disk('data', 64 * MiB);
    const script = String.raw`
set -u
fail() { echo "@@FAIL=$*"; exit 1; }
echo "@@SECTORS=$(cat /sys/block/vda/size)"

# Raw pattern at 40 MiB, outside the 32 MiB file system made below; the host checks it too.
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null || fail pattern
dd if=/tmp/pat of=/dev/vda bs=1M seek=40 oflag=direct conv=fsync 2>/dev/null || fail dd-write
echo "@@PAT_MD5=$(md5sum </tmp/pat | cut -d' ' -f1)"
echo "@@READ_MD5=$(dd if=/dev/vda bs=1M skip=40 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"

fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=16M --verify=crc32c --do_verify=0 --ioengine=psync >/tmp/fio-w.log 2>&1
echo "@@FIO_WRITE=$?"
sync; echo 3 >/proc/sys/vm/drop_caches
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_only --direct=1 --ioengine=psync >/tmp/fio-v.log 2>&1
echo "@@FIO_VERIFY=$?"
# A verify pass that cannot fail proves nothing: break one block and expect it to.
dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=100 oflag=direct conv=fsync 2>/dev/null
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_only --direct=1 --ioengine=psync >/tmp/fio-c.log 2>&1
echo "@@FIO_VERIFY_CORRUPTED=$?"

mkfs.ext4 -F -q -E nodiscard /dev/vda 32M || fail mkfs
mount -t ext4 /dev/vda /mnt || fail mount
echo "hello from the vhostd guest kit" >/mnt/hello.txt
dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
echo "@@BIG_MD5=$(md5sum </mnt/big | cut -d' ' -f1)"
umount /mnt || fail umount
e2fsck -f -n /dev/vda >/tmp/fsck.log 2>&1
echo "@@FSCK=$?"
mount -t ext4 -o ro /dev/vda /mnt || fail remount
echo "@@BIG_MD5_AFTER=$(md5sum </mnt/big | cut -d' ' -f1)"
umount /mnt
for f in /tmp/fio-w.log /tmp/fio-v.log /tmp/fsck.log; do echo "== $f"; tail -n 5 "$f"; done
`;
    const r = await runGuest({ script, devices: vhostUserBlkArgs(daemon.socket, { numQueues: 1 }) });
    console.log(`blk test: boot ${r.bootMs} ms, total ${r.durationMs} ms`);
    await daemon.stop();

    expect(r.markers.FAIL).toBeUndefined();
    expect(r.exitCode).toBe(0);
    expect(r.markers.SECTORS).toBe(String((64 * MiB) / 512));
    expect(r.markers.READ_MD5).toBe(r.markers.PAT_MD5);
    expect(md5(await readRange(image, 40 * MiB, 4 * MiB))).toBe(r.markers.PAT_MD5);
    expect(r.markers.FIO_WRITE).toBe('0');
    expect(r.markers.FIO_VERIFY).toBe('0');
    expect(r.markers.FIO_VERIFY_CORRUPTED).not.toBe('0');
    expect(r.markers.FSCK).toBe('0');
    expect(r.markers.BIG_MD5_AFTER).toBe(r.markers.BIG_MD5);

    // The file system must also be sound as seen from the host, through the image file.
    expect(spawnSync('e2fsck', ['-f', '-n', image]).status).toBe(0);
    const cat = spawnSync('debugfs', ['-R', 'cat /hello.txt', image], { encoding: 'utf8' });
    expect(cat.stdout).toBe('hello from the vhostd guest kit\n');
  }, 600_000);

  it('measures 4k random-read IOPS with libaio', async () => {
    const { daemon } = await disk('iops', 256 * MiB);
    const script = String.raw`
fio --name=r --filename=/dev/vda --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=16 \
    --runtime=10 --time_based --output-format=terse --terse-version=3 >/tmp/fio.terse 2>/tmp/fio.err
rc=$?
cat /tmp/fio.err
echo "@@FIO_RC=$rc"
# terse v3: field 5 is the error code, field 8 the read IOPS.
echo "@@FIO_ERROR=$(cut -d';' -f5 /tmp/fio.terse)"
echo "@@IOPS=$(cut -d';' -f8 /tmp/fio.terse)"
exit $rc
`;
    const r = await runGuest({ script, devices: vhostUserBlkArgs(daemon.socket, { numQueues: 1 }) });
    await daemon.stop();
    console.log(`qemu-storage-daemon 4k randread iodepth=16 under TCG: ${r.markers.IOPS} IOPS`);
    expect(r.exitCode).toBe(0);
    expect(r.markers.FIO_ERROR).toBe('0');
    expect(Number(r.markers.IOPS)).toBeGreaterThan(0);
  }, 300_000);
});
