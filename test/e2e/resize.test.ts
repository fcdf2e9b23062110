// Online resize with a real guest: the image grows under a running VM,
// `vhostd resize` tells QEMU (CONFIG_CHANGE_MSG), and the guest sees the new
// sector count in /sys/block/vda/size without a reboot, then writes and reads
// back data in the new tail, which the host finds in the image.
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DAEMON, startVhostd, type Backend } from './daemons.js';
import { provisionGuestKit, qemuAvailable, runGuest, vhostUserBlkArgs } from './guest.js';

const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;
const execFileP = promisify(execFile);
const MiB = 1 << 20;
const BEFORE = 64 * MiB;
const AFTER = 96 * MiB;
const GUEST_TIMEOUT = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 300_000);
const PATTERN = 'written-in-the-new-tail';

run('online resize under a real guest', { timeout: GUEST_TIMEOUT + 60_000 }, () => {
  let dir: string;
  let image: string;
  let daemon: Backend | undefined;

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-resize-'));
    image = join(dir, 'disk.img');
    await (await open(image, 'w')).close();
    await truncate(image, BEFORE);
    daemon = await startVhostd(['--file', image, '--log-level', 'info'], join(dir, 'blk.sock'));
  });

  afterAll(async () => {
    await daemon?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('the guest sees the grown disk and uses its new tail', async () => {
    let resized: Promise<{ stdout: string }> | undefined;
    const tailSector = AFTER / 512 - 8;
    const r = await runGuest({
      smp: 2,
      devices: vhostUserBlkArgs(daemon!.socket, { numQueues: 1 }),
      timeoutMs: GUEST_TIMEOUT,
      script: `
echo "@@SECTORS_BEFORE=$(cat /sys/block/vda/size)"
echo "@@GROW=now"
i=0
while [ "$(cat /sys/block/vda/size)" = "${BEFORE / 512}" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "@@SECTORS_AFTER=$(cat /sys/block/vda/size)"
printf '${PATTERN}' | dd of=/dev/vda bs=512 seek=${tailSector} conv=fsync 2>/dev/null || exit 3
echo 3 > /proc/sys/vm/drop_caches
echo "@@TAIL=$(dd if=/dev/vda bs=512 skip=${tailSector} count=1 2>/dev/null | head -c ${PATTERN.length})"
exit 0
`,
      onMarker: (key) => {
        if (key !== 'GROW') return;
        resized = truncate(image, AFTER).then(() => execFileP(process.execPath, [DAEMON, 'resize', '--socket', daemon!.socket]));
      },
    });
    expect(r.exitCode, r.output.slice(-3000)).toBe(0);
    expect(Number(r.markers.SECTORS_BEFORE)).toBe(BEFORE / 512);
    expect(Number(r.markers.SECTORS_AFTER)).toBe(AFTER / 512);
    expect(r.markers.TAIL).toBe(PATTERN);
    expect((await resized!).stdout).toMatch(/the front-end was told/);
    const fh = await open(image, 'r');
    const buf = Buffer.alloc(PATTERN.length);
    await fh.read(buf, 0, buf.length, tailSector * 512);
    await fh.close();
    expect(buf.toString()).toBe(PATTERN);
    expect(daemon!.output()).toMatch(/image grew: capacity updated/);
  });
});
