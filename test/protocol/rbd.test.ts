// vhostd blk on a Ceph RBD image, against a throw-away single-node cluster:
// the same requests through vhostd and through qemu-storage-daemon's rbd
// driver, vhostd on a queue thread too, the image growing under it (`rbd
// resize`, seen through the header watch), and the errors a user meets at
// start-up: no such pool or image, no configuration, monitors that never answer.
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes, S, SECTOR, T } from '../driver/blk.js';
import type { Session } from '../driver/session.js';
import { startCluster, type Cluster } from '../support/ceph.js';
import { RbdImage, RbdIo } from '../../src/backends/blk/rbd.js';
import { VHOSTD_BIN } from '../support/children.js';
import { availableKinds, startBackend, type Backend } from './backends.js';
import { expectBytes, isZero, waitFor, withSession } from './helpers.js';

const runFile = promisify(execFile);
const MiB = 1 << 20;
const IMAGE = 64 * MiB;

async function capacityOf(s: Session): Promise<bigint> {
  const c = await s.fe.getConfig(0, 8);
  return new DataView(c!.data.buffer, c!.data.byteOffset).getBigUint64(0, true);
}

/** Exit status and output of `vhostd blk` that must refuse to start, and how long it took. */
async function refused(args: string[], timeoutMs = 60_000): Promise<{ code: number; out: string; ms: number }> {
  const t = Date.now();
  try {
    await runFile(process.execPath, [VHOSTD_BIN, 'blk', ...args], { timeout: timeoutMs });
    return { code: 0, out: '', ms: Date.now() - t };
  } catch (e) {
    const err = e as { code?: number; stdout?: string; stderr?: string };
    return { code: err.code ?? -1, out: `${err.stdout ?? ''}${err.stderr ?? ''}`, ms: Date.now() - t };
  }
}

describe('blk on an RBD image', { timeout: 180_000 }, () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster();
  }, 25 * 60_000);
  afterAll(async () => cluster?.stop(), 60_000);

  for (const [kind, extra] of [
    ...availableKinds().map((k) => [k, [] as string[]] as const),
    ['vhostd', ['--threads', '1']] as const,
  ]) {
    describe(`${kind}${extra.length ? ' on a queue thread' : ''}`, () => {
      let be: Backend;
      let spec: string;
      beforeAll(async () => {
        spec = await cluster.createImage(kind, IMAGE);
        be = await startBackend(kind, { numQueues: 1, imageBytes: IMAGE, rbd: { spec, conf: cluster.conf }, extraArgs: [...extra] });
      }, 60_000);
      afterAll(async () => be?.stop());

      it('reads back what it wrote, flushes, zeroes and discards, and refuses I/O past the end', async () => {
        await withSession(be, async (s) => {
          await s.startDevice({ queues: 1 });
          expect(await capacityOf(s)).toBe(BigInt(IMAGE / SECTOR));
          const blk = s.blk[0]!;
          const data = randomBytes(64 * 1024);
          // Split over descriptors: librbd gets a vector of guest buffers.
          expect((await blk.run({ type: T.OUT, sector: 2048, out: data, split: [4096, 28672, 32768] })).status).toBe(S.OK);
          expect((await blk.run({ type: T.FLUSH })).status).toBe(S.OK);
          const r = await blk.run({ type: T.IN, sector: 2048, inLen: data.length, split: [512, 65024] });
          expect(r.status).toBe(S.OK);
          expectBytes(r.data, data, 'read back');
          // Many at once: the completions come back out of order through librbd.
          const many = await blk.runAll(Array.from({ length: 32 }, (_, i) => ({ type: T.OUT, sector: 8192 + i * 8, out: data.subarray(0, 4096) })));
          expect(many.every((m) => m.status === S.OK)).toBe(true);
          const zeroes = new Uint8Array(16);
          new DataView(zeroes.buffer).setBigUint64(0, 2048n, true);
          new DataView(zeroes.buffer).setUint32(8, 64, true);
          expect((await blk.run({ type: T.WRITE_ZEROES, out: zeroes })).status).toBe(S.OK);
          const z = await blk.run({ type: T.IN, sector: 2048, inLen: 32 * 1024 });
          expect(z.status).toBe(S.OK);
          expect(isZero(z.data), 'write-zeroes left data').toBe(true);
          const tail = await blk.run({ type: T.IN, sector: 2048 + 64, inLen: 32 * 1024 });
          expectBytes(tail.data, data.subarray(32 * 1024), 'the data after the zeroed range');
          const discard = new Uint8Array(16);
          new DataView(discard.buffer).setBigUint64(0, 16384n, true);
          new DataView(discard.buffer).setUint32(8, 8192, true);
          expect((await blk.run({ type: T.DISCARD, out: discard })).status).toBe(S.OK);
          expect((await blk.run({ type: T.IN, sector: IMAGE / SECTOR - 1, inLen: 1024 })).status).toBe(S.IOERR);
          await s.stopDevice();
        });
      });
    });
  }

  it('vhostd: an image grown with `rbd resize` reaches the front-end without a signal', async () => {
    const spec = await cluster.createImage('grow', IMAGE);
    const be = await startBackend('vhostd', { numQueues: 1, imageBytes: IMAGE, rbd: { spec, conf: cluster.conf } });
    try {
      await withSession(be, async (s) => {
        await s.startDevice({ queues: 1 });
        expect(await capacityOf(s)).toBe(BigInt(IMAGE / SECTOR));
        await cluster.rbd('resize', spec, '--size', `${(2 * IMAGE) / MiB}M`);
        await waitFor(async () => (await capacityOf(s)) === BigInt((2 * IMAGE) / SECTOR), 'the new capacity in GET_CONFIG', 20_000, 50);
        const data = randomBytes(4096);
        const sector = (2 * IMAGE) / SECTOR - 8;
        expect((await s.blk[0]!.run({ type: T.OUT, sector, out: data })).status).toBe(S.OK);
        expectBytes((await s.blk[0]!.run({ type: T.IN, sector, inLen: 4096 })).data, data, 'the new tail');
        await s.stopDevice();
      });
      expect(be.output()).toMatch(/RBD image changed: capacity now/);
    } finally {
      await be.stop();
    }
  });

  it('vhostd: says clearly what is wrong when the pool, the image or the configuration is missing, and gives up on silent monitors', async () => {
    const sock = join(cluster.dir, '..', 'refused.sock');
    const base = ['--socket', sock, '--ceph-conf', cluster.conf];
    let r = await refused([...base, '--rbd', 'nopool/img']);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/pool nopool does not exist/);
    r = await refused([...base, '--rbd', `${cluster.pool}/noimage`]);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/image rbd\/noimage does not exist/);
    r = await refused(['--socket', sock, '--ceph-conf', join(cluster.dir, 'missing.conf'), '--rbd', `${cluster.pool}/x`]);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/cannot read Ceph configuration .*missing\.conf/);
    r = await refused([...base, '--rbd', 'justoneword']);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/expected POOL\/IMAGE/);
    // Monitors on a port where nothing answers: bounded by --ceph-timeout.
    const dead = join(cluster.dir, '..', 'dead.conf');
    writeFileSync(dead, `[global]\nmon host = v2:127.0.0.1:9\nkeyring = ${cluster.keyring}\n`);
    r = await refused(['--socket', sock, '--ceph-conf', dead, '--ceph-timeout', '3', '--rbd', `${cluster.pool}/x`]);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/no answer from the Ceph monitors within 3 s|cannot connect to the Ceph cluster/);
    expect(r.ms, 'start-up gave up in time').toBeLessThan(20_000);
  });

  it('RbdIo in-process: a request with more views than a slot holds (300), and slots reused across 256 requests, all in flight at once', async () => {
    const spec = await cluster.createImage('slots', IMAGE);
    const img = new RbdImage({ spec, conf: cluster.conf, readonly: false, timeoutS: 30 });
    const call = (fn: (cb: (err: Error | null) => void) => void): Promise<Error | null> => new Promise((r) => fn(r));
    try {
      const data = randomBytes(300 * SECTOR);
      const views = (buf: Uint8Array): Uint8Array[] => Array.from({ length: 300 }, (_, i) => buf.subarray(i * SECTOR, (i + 1) * SECTOR));
      expect(await call((cb) => img.io.write(MiB, views(data), true, cb))).toBeNull();
      const back = new Uint8Array(data.length);
      expect(await call((cb) => img.io.read(MiB, views(back), cb))).toBeNull();
      expectBytes(back, data, '300 views read back');
      // 256 at once: more than one batch of records through the pipe, and every slot used twice.
      for (let round = 0; round < 2; round++) {
        const bufs = Array.from({ length: 256 }, () => new Uint8Array(4096));
        const errs = await Promise.all(bufs.map((b, i) => call((cb) => img.io.read(i * 4096, [b], cb))));
        expect(errs.every((e) => e === null)).toBe(true);
        expect(img.io.inFlight).toBe(0);
        expect(bufs.every((b) => isZero(b)), 'never-written blocks read as zeros').toBe(true);
      }
      const small = new Uint8Array(300 * SECTOR);
      expect(await call((cb) => img.io.read(MiB, [small], cb))).toBeNull();
      expectBytes(small, data, 'one view over the same bytes');
    } finally {
      img.close();
    }
  });

  it('RbdIo in-process: more requests in flight than the completion pipe holds; the pipe grows to its limit, then requests wait, and none is lost', async () => {
    const spec = await cluster.createImage('pipe', IMAGE);
    const img = new RbdImage({ spec, conf: cluster.conf, readonly: false, timeoutS: 30 });
    const small = new RbdIo(img.files.rbd!, 4096);
    const grows = new RbdIo(img.files.rbd!);
    const call = (fn: (cb: (err: Error | null) => void) => void): Promise<Error | null> => new Promise((r) => fn(r));
    try {
      const data = randomBytes(4096);
      expect(await call((cb) => small.write(0, [data], true, cb))).toBeNull();
      // A one-page pipe holds 512 records: 4 times that at once, in two rounds (slots reused, no growth).
      expect(small.pipeRecords).toBe(512);
      let rss = 0;
      for (let round = 0; round < 2; round++) {
        const bufs = Array.from({ length: 2048 }, () => new Uint8Array(512));
        const pending = bufs.map((b, i) => call((cb) => small.read((i % 8) * 512, [b], cb)));
        expect(small.inFlight).toBe(2048);
        const errs = await Promise.all(pending);
        expect(errs.filter((e) => e !== null)).toEqual([]);
        expect(small.inFlight).toBe(0);
        for (let i = 0; i < bufs.length; i++) expectBytes(bufs[i]!, data.subarray((i % 8) * 512, (i % 8) * 512 + 512), `request ${i}`);
        if (round === 0) rss = process.memoryUsage().rss;
      }
      expect(small.pipeRecords, 'the pipe stayed at its limit').toBe(512);
      expect(process.memoryUsage().rss - rss, 'the second round reused the first round\'s slots').toBeLessThan(32 * MiB);
      // Past the default pipe's 8192 records, the pipe doubles instead.
      const start = grows.pipeRecords;
      const n = 2 * start + 1;
      const errs = await Promise.all(Array.from({ length: n }, (_, i) => call((cb) => grows.read((i % 8) * 512, [new Uint8Array(512)], cb))));
      expect(errs.filter((e) => e !== null)).toEqual([]);
      expect(grows.inFlight).toBe(0);
      expect(grows.pipeRecords).toBeGreaterThanOrEqual(n);
    } finally {
      small.close();
      grows.close();
      img.close();
    }
  });
});
