// Image's fallocate paths and the native fallocateAsync they run on: results
// arrive through the callback on the calling thread's loop, main or worker.
import { closeSync, mkdtempSync, openSync, readFileSync, readlinkSync, readdirSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Image } from '../../src/backends/blk/image.js';
import { native, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from '../../src/native/index.js';

const addon = fileURLToPath(new URL('../../build/Release/vhostd_native.node', import.meta.url));
const KiB = 1024;

describe('Image fallocate paths', () => {
  let dir: string;
  let path: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'vhostd-image-'));
    path = join(dir, 'disk.img');
    writeFileSync(path, Buffer.alloc(256 * KiB, 0xab));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const call = (fn: (cb: (err: Error | null) => void) => void): Promise<Error | null> => new Promise((r) => fn(r));
  const fdsOn = (p: string): number => readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === p;
    } catch {
      return false;
    }
  }).length;

  it('discard and writeZeroes complete through their callbacks, asynchronously, and the ranges read as zeros', async () => {
    const img = new Image({ path, readonly: false, direct: false });
    try {
      let sync = true;
      const p = call((cb) => img.discard(8 * KiB, 8 * KiB, cb)).then((e) => ({ e, sync }));
      sync = false;
      const r = await p;
      expect(r.e).toBeNull();
      expect(r.sync, 'discard called back before returning').toBe(false);
      expect(await call((cb) => img.writeZeroes(32 * KiB, 4 * KiB, false, false, cb))).toBeNull();
      expect(await call((cb) => img.writeZeroes(64 * KiB, 4 * KiB, true, true, cb))).toBeNull();
      const b = readFileSync(path);
      expect(b.length).toBe(256 * KiB); // KEEP_SIZE
      for (const [from, len] of [[8, 8], [32, 4], [64, 4]] as const) {
        expect(b.subarray(from * KiB, (from + len) * KiB).every((x) => x === 0), `zeros at ${from} KiB`).toBe(true);
      }
      expect(b[8 * KiB - 1]).toBe(0xab);
      expect(b[16 * KiB]).toBe(0xab);
      expect(b[36 * KiB]).toBe(0xab);
    } finally {
      img.close();
    }
  });

  it('a failing fallocate is an error in the callback, not a throw', async () => {
    const img = new Image({ path, readonly: true, direct: false });
    try {
      // A read-only descriptor: EBADF.
      expect((await call((cb) => img.discard(0, 4 * KiB, cb)))?.message).toMatch(/errno 9/);
      expect((await call((cb) => img.writeZeroes(0, 4 * KiB, false, false, cb)))?.message).toMatch(/errno 9/);
    } finally {
      img.close();
    }
  });

  it('opens all its descriptors in the constructor and closes them all', () => {
    const before = fdsOn(path);
    const img = new Image({ path, readonly: false, direct: false });
    expect(fdsOn(path) - before).toBe(2); // buffered and O_DSYNC
    img.close();
    expect(fdsOn(path)).toBe(before);
  });

  it('native.fallocateAsync reports -errno and calls back on the main loop', async () => {
    const fd = openSync(path, 'r+');
    try {
      const rc = await new Promise<number>((r) => native.fallocateAsync(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * KiB, r));
      expect(rc).toBe(0);
      expect(await new Promise<number>((r) => native.fallocateAsync(-1, 0, 0, 4 * KiB, r))).toBe(-9);
      expect(() => native.fallocateAsync(fd, 0, 0, 1, undefined as never)).toThrow(/callback/);
    } finally {
      closeSync(fd);
    }
  });

  it('native.fallocateAsync works inside a worker thread: the callback runs on that worker', async () => {
    const worker = new Worker(
      `
      const { parentPort, threadId, workerData } = require('node:worker_threads');
      const fs = require('node:fs');
      const n = require(workerData.addon);
      const fd = fs.openSync(workerData.path, 'r+');
      let pending = 0;
      const results = [];
      for (let i = 0; i < 8; i++) {
        pending++;
        n.fallocateAsync(fd, ${FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE}, (128 + i * 4) * 1024, 4096, (rc) => {
          results.push({ rc, thread: require('node:worker_threads').threadId });
          if (--pending === 0) { fs.closeSync(fd); parentPort.postMessage({ threadId, results }); }
        });
      }
      `,
      { eval: true, workerData: { addon, path } },
    );
    const msg = await new Promise<{ threadId: number; results: { rc: number; thread: number }[] }>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await worker.terminate();
    expect(msg.results).toHaveLength(8);
    for (const r of msg.results) expect(r).toEqual({ rc: 0, thread: msg.threadId });
    expect(msg.threadId).not.toBe(0);
    expect(readFileSync(path).subarray(128 * KiB, 160 * KiB).every((x) => x === 0)).toBe(true);
  });

  it('a worker that ends with a fallocate in flight does not crash the process', () => {
    // Terminating the worker's env with work queued must neither crash nor call into a dead env.
    const script = `
      const { Worker } = require('node:worker_threads');
      (async () => {
        for (let i = 0; i < 20; i++) {
          const w = new Worker(\`
            const n = require(${JSON.stringify(addon)});
            const fs = require('node:fs');
            const fd = fs.openSync(${JSON.stringify(path)}, 'r+');
            for (let j = 0; j < 50; j++) n.fallocateAsync(fd, 3, j * 4096, 4096, () => {});
            require('node:worker_threads').parentPort.postMessage('go');
          \`, { eval: true });
          await new Promise((r) => w.once('message', r));
          await w.terminate();
        }
        console.log('survived');
      })();`;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('survived');
  });
});

describe('Image: whether io_uring may serve a request inline', () => {
  it('not on tmpfs (no RWF_NOWAIT there), but on a file system that has it and on a block device', () => {
    const shm = mkdtempSync('/dev/shm/vhostd-nowait-');
    const disk = mkdtempSync('/var/tmp/vhostd-nowait-');
    try {
      for (const [dir, nowait] of [[shm, false], [disk, statfsSync(disk).type !== 0x01021994]] as const) {
        writeFileSync(join(dir, 'd.img'), Buffer.alloc(64 * KiB));
        const img = new Image({ path: join(dir, 'd.img'), readonly: true, direct: false });
        try {
          expect(img.files.nowait, dir).toBe(nowait);
        } finally {
          img.close();
        }
      }
      // A block device's node lives on devtmpfs; its I/O does not.
      const loop = spawnSync('losetup', ['--find', '--show', join(disk, 'd.img')], { encoding: 'utf8' });
      if (loop.status === 0) {
        const dev = loop.stdout.trim();
        try {
          const img = new Image({ path: dev, readonly: true, direct: false });
          expect(img.files.nowait).toBe(true);
          img.close();
        } finally {
          spawnSync('losetup', ['-d', dev]);
        }
      } else if (process.env.CI === 'true') {
        throw new Error(`losetup failed: ${loop.stderr}`);
      }
    } finally {
      rmSync(shm, { recursive: true, force: true });
      rmSync(disk, { recursive: true, force: true });
    }
  });
});
