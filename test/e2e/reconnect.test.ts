// vhostd is killed with SIGKILL again and again while a guest runs a fio
// write-and-verify workload; its supervisor (this test) restarts it and QEMU
// reconnects. Requests in flight are resubmitted from the inflight record, so
// the guest sees neither an I/O error nor a lost or torn write.
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startVhostd, type Backend } from './daemons.js';
import { expectCleanFio, fioVerifyScript } from './fio.js';
import { provisionGuestKit, qemuAvailable, runGuest, vhostUserBlkArgs } from './guest.js';

const KILLS = Number(process.env.VHOSTD_KILLS ?? 10);
const ROUNDS = 12;
const GUEST_TIMEOUT = 600_000;
const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;

run('vhostd blk survives SIGKILL with QEMU reconnecting', () => {
  let dir: string;
  let image: string;
  let sock: string;
  let daemon: Backend | undefined;
  const logs: string[] = [];

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-kill-'));
    image = join(dir, 'disk.img');
    sock = join(dir, 'blk.sock');
    await (await open(image, 'w')).close();
    await truncate(image, 256 << 20);
    daemon = await startVhostd(['--file', image, '--num-queues', '1', '--direct', '--log-level', process.env.VHOSTD_E2E_LOG_LEVEL ?? 'info'], sock);
  });

  afterAll(async () => {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it(
    `finishes fio verify with no errors across ${KILLS} SIGKILLs`,
    async () => {
      let kills = 0;
      let killer: Promise<void> | undefined;
      const killLoop = async (): Promise<void> => {
        while (kills < KILLS) {
          await new Promise((r) => setTimeout(r, 1500 + Math.random() * 1500));
          const d = daemon!;
          process.kill(d.pid, 'SIGKILL');
          await d.exited;
          logs.push(d.output());
          kills++;
          daemon = await startVhostd(['--file', image, '--num-queues', '1', '--direct', '--log-level', process.env.VHOSTD_E2E_LOG_LEVEL ?? 'info'], sock);
        }
      };
      const res = await runGuest({
        smp: 2,
        timeoutMs: GUEST_TIMEOUT,
        devices: vhostUserBlkArgs(sock, { numQueues: 1, chardev: 'reconnect=1' }),
        onMarker: (key) => {
          if (key === 'FIO_STARTED') killer ??= killLoop();
        },
        script: fioVerifyScript({ rounds: ROUNDS, sizeMiB: 48, iodepth: 16 }),
      });
      await killer;
      expectCleanFio(res, ROUNDS);
      expect(kills).toBe(KILLS);
      const all = logs.join('\n') + daemon!.output();
      // Whether a kill caught requests inside vhostd is chance (the guest is the slow side);
      // test/protocol/inflight.test.ts checks resubmission deterministically.
      const resumed = [...all.matchAll(/"resubmit":(\d+)[^\n]*resuming requests left in flight/g)].map((m) => Number(m[1]));
      console.log(`SIGKILL test: ${kills} kills, ${resumed.length} restarts found requests in flight (${resumed.join(', ') || 'none'})`);
      if (process.env.VHOSTD_E2E_LOG) (await import('node:fs')).writeFileSync(process.env.VHOSTD_E2E_LOG, all);
    },
    GUEST_TIMEOUT + 120_000,
  );
});

run('vhostd blk --client reconnects to a QEMU server socket', () => {
  let dir: string;
  let image: string;
  let sock: string;
  let daemon: Backend | undefined;
  const args = (): string[] => ['--file', image, '--client', '--direct'];

  beforeAll(async () => {
    await provisionGuestKit();
    dir = await mkdtemp(join(tmpdir(), 'vhostd-client-'));
    image = join(dir, 'disk.img');
    sock = join(dir, 'qemu.sock');
    await (await open(image, 'w')).close();
    await truncate(image, 128 << 20);
    // Started before QEMU listens: it must keep trying until QEMU is up.
    daemon = await startVhostd(args(), sock);
  });

  afterAll(async () => {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it(
    'connects once QEMU listens, and again after each of 3 SIGKILLs',
    async () => {
      let kills = 0;
      let killer: Promise<void> | undefined;
      const killLoop = async (): Promise<void> => {
        while (kills < 3) {
          await new Promise((r) => setTimeout(r, 2000));
          const d = daemon!;
          process.kill(d.pid, 'SIGKILL');
          await d.exited;
          kills++;
          daemon = await startVhostd(args(), sock);
        }
      };
      const res = await runGuest({
        timeoutMs: GUEST_TIMEOUT,
        devices: vhostUserBlkArgs(sock, { numQueues: 1, chardev: 'server=on,wait=off' }),
        onMarker: (key) => {
          if (key === 'FIO_STARTED') killer ??= killLoop();
        },
        script: fioVerifyScript({ rounds: 6, sizeMiB: 32, iodepth: 8 }),
      });
      await killer;
      expectCleanFio(res, 6);
      expect(kills).toBe(3);
    },
    GUEST_TIMEOUT + 120_000,
  );
});
