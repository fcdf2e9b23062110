// The backend-bound benchmark's C load generator (bench/blk-backend/loadgen.c)
// builds and works against vhostd: a short timed run reports sane numbers, and
// data it writes with a seed reads back and checks, across two connections
// (and through qemu-storage-daemon too, where it is installed).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildLoadgen, runLoadgen, LoadgenError } from '../../bench/blk-backend/loadgen.js';
import { startVhostd, startStorageDaemon, type Backend } from '../e2e/daemons.js';

const IMAGE_BYTES = 32 << 20;
const hasQsd = spawnSync('sh', ['-c', 'command -v qemu-storage-daemon'], { stdio: 'ignore' }).status === 0;

describe('loadgen against vhostd', () => {
  let dir: string;
  let image: string;
  let vhostd: Backend;

  beforeAll(async () => {
    buildLoadgen();
    dir = mkdtempSync(join(tmpdir(), 'vhostd-loadgen-'));
    image = join(dir, 'disk.img');
    writeFileSync(image, Buffer.alloc(IMAGE_BYTES, 0x3c));
    vhostd = await startVhostd(['--file', image, '--num-queues', '2', '--log-level', 'warn'], join(dir, 'v.sock'));
  });

  afterAll(async () => {
    await vhostd?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('runs 1 s of 4k random reads at QD 4 and reports IOPS, latency and CPU', async () => {
    const r = await runLoadgen({ socket: vhostd.socket, rw: 'randread', qd: 4, seconds: 1, warmup: 0.2, backendPid: vhostd.pid });
    expect(r.errors).toBe(0);
    expect(r.ios).toBeGreaterThan(0);
    expect(r.iops).toBeGreaterThan(0);
    expect(r.device_bytes).toBe(IMAGE_BYTES);
    expect(r.lat_us.p50).toBeGreaterThan(0);
    expect(r.lat_us.p99).toBeGreaterThanOrEqual(r.lat_us.p50);
    expect(r.lat_us.p999).toBeGreaterThanOrEqual(r.lat_us.p99);
    expect(r.backend_cpu_us_per_io).toBeGreaterThan(0);
    expect(r.cpu_us_per_io).toBeGreaterThan(0);
    // Event index both ways: at most one kick and one interrupt per request.
    expect(r.kicks_per_io).toBeGreaterThan(0);
    expect(r.kicks_per_io).toBeLessThanOrEqual(1.01);
    expect(r.interrupts_per_io).toBeLessThanOrEqual(1.01);
  });

  it('runs two queues of sequential 64k writes', async () => {
    const r = await runLoadgen({ socket: vhostd.socket, rw: 'write', bs: 65536, qd: 4, queues: 2, seconds: 0.5, warmup: 0.1 });
    expect(r.errors).toBe(0);
    expect(r.ios).toBeGreaterThan(0);
    expect(r.queues).toBe(2);
  });

  it('reads back a seeded pattern written on an earlier connection, and fails loudly on the wrong seed', async () => {
    const w = await runLoadgen({ socket: vhostd.socket, verifyWrite: 77, qd: 8, queues: 2, size: 8 << 20 });
    expect(w.verified).toBe((8 << 20) / 4096);
    const r = await runLoadgen({ socket: vhostd.socket, verifyRead: 77, qd: 8, size: 8 << 20 });
    expect(r.verified).toBe((8 << 20) / 4096);
    const bad = await runLoadgen({ socket: vhostd.socket, verifyRead: 78, qd: 8, size: 1 << 20 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(bad).toBeInstanceOf(LoadgenError);
    expect((bad as LoadgenError).result?.errors).toBeGreaterThan(0);
    expect((bad as LoadgenError).message).toMatch(/data mismatch/);
  });

  it.runIf(hasQsd)('data written through vhostd reads back through qemu-storage-daemon, and vice versa', async () => {
    await runLoadgen({ socket: vhostd.socket, verifyWrite: 5, qd: 16, size: 4 << 20 });
    await vhostd.stop();
    const qsd = await startStorageDaemon(image, join(dir, 'q.sock'), 1);
    try {
      expect((await runLoadgen({ socket: qsd.socket, verifyRead: 5, qd: 16, size: 4 << 20 })).verified).toBe(1024);
      await runLoadgen({ socket: qsd.socket, verifyWrite: 6, qd: 16, size: 4 << 20 });
    } finally {
      await qsd.stop();
    }
    vhostd = await startVhostd(['--file', image, '--num-queues', '2', '--log-level', 'warn'], join(dir, 'v.sock'));
    expect((await runLoadgen({ socket: vhostd.socket, verifyRead: 6, qd: 16, size: 4 << 20 })).verified).toBe(1024);
  });
});
