// A guest boots against a socket-activated vhostd blk and runs fio
// write-and-verify while vhostd is killed with SIGKILL again and again. The
// test plays systemd: it owns the listening socket (as a .socket unit does),
// passes it as fd 3 with LISTEN_FDS=1 and LISTEN_PID (as systemd does for
// every start), catches sd_notify on NOTIFY_SOCKET, and restarts the daemon
// after each kill with the same socket (Restart=on-failure). QEMU reconnects
// (reconnect=1) to a socket that never went away, and the inflight record
// makes every kill invisible to the guest.
import { spawn } from 'node:child_process';
import { lstatSync } from 'node:fs';
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../src/native/index.js';
import { listeningSocket, NotifySocket, runWithListenFd, waitForOutput, type Activated } from '../support/systemd.js';
import { DAEMON } from './daemons.js';
import { expectCleanFio, fioVerifyScript } from './fio.js';
import { provisionGuestKit, qemuAvailable, runGuest, vhostUserBlkArgs } from './guest.js';

const KILLS = Number(process.env.VHOSTD_ACTIVATION_KILLS ?? 5);
const ROUNDS = 8;
const GUEST_TIMEOUT = 600_000;
const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;

run('socket-activated vhostd blk under Restart=on-failure', () => {
  let dir: string;
  let image: string;
  let sock: string;
  let lfd = -1;
  let notify: NotifySocket;
  let daemon: Activated | undefined;
  const logs: string[] = [];

  const start = async (): Promise<Activated> => {
    const d = runWithListenFd(lfd, [process.execPath, DAEMON, 'blk', '--blk-file', image, '--direct', '--socket-path', sock, '--num-queues', '1'], {
      NOTIFY_SOCKET: notify.address,
    });
    await Promise.race([
      waitForOutput(d.output, /vhost-user-blk ready/),
      d.exited.then((c) => Promise.reject(new Error(`vhostd exited ${c}:\n${d.output()}`))),
    ]);
    return d;
  };

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-activ-'));
    image = join(dir, 'disk.img');
    sock = join(dir, 'blk.sock');
    await (await open(image, 'w')).close();
    await truncate(image, 128 << 20);
    lfd = listeningSocket(sock);
    notify = await NotifySocket.open(join(dir, 'notify'));
    daemon = await start();
  });

  afterAll(async () => {
    await daemon?.stop();
    if (lfd >= 0) native.close(lfd);
    notify?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it(
    `a guest finishes fio verify with no errors across ${KILLS} SIGKILLs of the activated daemon`,
    async () => {
      const ino = lstatSync(sock).ino;
      let kills = 0;
      let killer: Promise<void> | undefined;
      const killLoop = async (): Promise<void> => {
        while (kills < KILLS) {
          await new Promise((r) => setTimeout(r, 2000 + Math.random() * 2000));
          const d = daemon!;
          d.child.kill('SIGKILL');
          await d.exited;
          logs.push(d.output());
          kills++;
          // RestartSec=1 in the unit; sooner here to keep the test short.
          await new Promise((r) => setTimeout(r, 200));
          daemon = await start();
        }
      };
      const res = await runGuest({
        smp: 2,
        timeoutMs: GUEST_TIMEOUT,
        devices: vhostUserBlkArgs(sock, { numQueues: 1, chardev: 'reconnect=1' }),
        onMarker: (key) => {
          if (key === 'FIO_STARTED') killer ??= killLoop();
        },
        script: `
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 3; }
${fioVerifyScript({ rounds: ROUNDS, sizeMiB: 32, iodepth: 16 })}`,
      });
      await killer;
      expectCleanFio(res, ROUNDS);
      expect(kills).toBe(KILLS);
      // The socket QEMU reconnects to is the one the test made: never unlinked or replaced.
      expect(lstatSync(sock).ino).toBe(ino);
      const all = logs.join('\n') + daemon!.output();
      expect(all.match(/"msg":"serving on an inherited listening socket"/g)).toHaveLength(KILLS + 1);
      // One READY=1 per start, and the front-end showed up in STATUS= after restarts too.
      expect(notify.lines().filter((l) => l === 'READY=1')).toHaveLength(KILLS + 1);
      expect(notify.lines().filter((l) => /^STATUS=blk: front-end connected/.test(l)).length).toBeGreaterThanOrEqual(KILLS + 1);
      const resumed = [...all.matchAll(/"resubmit":(\d+)[^\n]*resuming requests left in flight/g)].map((m) => Number(m[1]));
      console.log(`socket activation: ${kills} kills, ${resumed.length} restarts found requests in flight (${resumed.join(', ') || 'none'})`);
    },
    GUEST_TIMEOUT + 120_000,
  );
});

run('a guest boots against vhostd started by systemd-socket-activate', () => {
  let dir: string;
  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-ssa-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('QEMU\'s connection starts vhostd; the guest sees the disk, writes and reads it back; STATUS shows its queue running', async () => {
    const image = join(dir, 'disk.img');
    const sock = join(dir, 'blk.sock');
    await (await open(image, 'w')).close();
    await truncate(image, 64 << 20);
    const notify = await NotifySocket.open(`@vhostd-e2e-${process.pid}-ssa`);
    const child = spawn(
      'systemd-socket-activate',
      ['-l', sock, '-E', `NOTIFY_SOCKET=${notify.address}`, process.execPath, DAEMON, 'blk', '--blk-file', image, '--serial', 'activated', '--socket-path', sock],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = new Promise<number | null>((r) => child.once('close', r));
    try {
      await waitForOutput(() => out, /Listening on/);
      expect(out).not.toMatch(/vhost-user-blk ready/); // nothing runs until QEMU connects
      let running: string | undefined;
      const res = await runGuest({
        smp: 2,
        timeoutMs: 240_000,
        devices: vhostUserBlkArgs(sock, { numQueues: 1 }),
        onMarker: (key) => {
          if (key === 'WRITTEN') running = [...notify.lines()].reverse().find((l) => l.startsWith('STATUS='));
        },
        script: `
echo "@@SIZE=$(cat /sys/block/vda/size)"
echo "@@SERIAL=$(cat /sys/block/vda/serial)"
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=100 conv=fsync oflag=direct 2>/dev/null
sleep 3
echo "@@WRITTEN=1"
dd if=/dev/vda of=/tmp/back bs=4096 skip=100 count=256 iflag=direct 2>/dev/null
cmp /tmp/pattern /tmp/back && echo "@@SAME=1"
`,
      });
      if (res.exitCode !== 0) throw new Error(`guest failed (exit ${res.exitCode}):\n${res.output.slice(-4000)}`);
      expect(res.markers.SIZE).toBe(String((64 << 20) / 512));
      expect(res.markers.SERIAL).toBe('activated');
      expect(res.markers.SAME).toBe('1');
      expect(out).toMatch(/"msg":"serving on an inherited listening socket"/);
      expect(notify.lines()).toContain('READY=1');
      // Refreshed within 2 s of the ring starting; the guest waited 3 s before reporting.
      expect(running).toMatch(/^STATUS=blk: front-end connected \(connection 1\); queues: 1 running$/);
      child.kill('SIGTERM');
      expect(await code).toBe(0);
      expect(notify.lines()).toContain('STOPPING=1');
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      notify.close();
    }
  }, 300_000);
});
