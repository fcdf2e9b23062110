// The io_uring engine against a real file: whole transfers, short ones carried
// on, errors as errors, a full ring refusing (so the caller falls back), and
// close failing what is still in flight.
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { IoUring, type IoDone } from '../../src/backends/blk/io-uring.js';
import { Image } from '../../src/backends/blk/image.js';

const dir = mkdtempSync(join(tmpdir(), 'vhostd-uring-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function open(entries = 64): IoUring {
  const u = IoUring.open(entries);
  if (typeof u === 'string') throw new Error(`io_uring is needed here: ${u}`);
  return u;
}

const run = (start: (cb: IoDone) => boolean): Promise<Error | null> =>
  new Promise((resolve, reject) => {
    if (!start(resolve)) reject(new Error('refused'));
  });

function file(bytes: Uint8Array): { path: string; fd: number } {
  const path = join(dir, `f${Math.random().toString(36).slice(2)}`);
  writeFileSync(path, bytes);
  return { path, fd: openSync(path, 'r+') };
}

describe('IoUring', () => {
  it('reads and writes scattered views, the position honoured', async () => {
    const data = Uint8Array.from({ length: 64 * 1024 }, (_, i) => (i * 7) & 0xff);
    const f = file(data);
    const u = open();
    try {
      const a = new Uint8Array(1000);
      const b = new Uint8Array(24);
      const c = new Uint8Array(3000);
      expect(await run((cb) => u.readv(f.fd, 4096, [a, b, c], false, cb))).toBeNull();
      expect(Buffer.concat([a, b, c])).toEqual(Buffer.from(data.subarray(4096, 4096 + 4024)));
      const w = [new Uint8Array(512).fill(1), new Uint8Array(100).fill(2)];
      expect(await run((cb) => u.writev(f.fd, 10_000, w, true, false, cb))).toBeNull();
      expect(await run((cb) => u.fdatasync(f.fd, cb))).toBeNull();
      const back = readFileSync(f.path);
      expect(back.subarray(10_000, 10_512).every((x) => x === 1)).toBe(true);
      expect(back.subarray(10_512, 10_612).every((x) => x === 2)).toBe(true);
      expect(back[10_612]).toBe(data[10_612]);
      expect(u.inFlight).toBe(0);
    } finally {
      u.close();
      closeSync(f.fd);
    }
  });

  it('a read past the end is an error, never a partly filled success', async () => {
    const f = file(new Uint8Array(6000).fill(5));
    const u = open();
    try {
      const buf = new Uint8Array(4096);
      const err = await run((cb) => u.readv(f.fd, 4096, [buf], false, cb));
      expect(err?.message).toMatch(/short read at byte 6000/);
      // It went on after the first short piece: what exists was read.
      expect(buf.subarray(0, 1904).every((x) => x === 5)).toBe(true);
    } finally {
      u.close();
      closeSync(f.fd);
    }
  });

  it('reports the errno of a failed request', async () => {
    const u = open();
    try {
      const err = (await run((cb) => u.readv(987_654, 0, [new Uint8Array(512)], false, cb))) as NodeJS.ErrnoException;
      expect(err.errno).toBe(9); // EBADF
      expect(err.message).toMatch(/read failed: errno 9/);
    } finally {
      u.close();
    }
  });

  it('refuses past its slots (the caller falls back) and takes more once they complete', async () => {
    const f = file(new Uint8Array(1 << 20));
    const u = open(8);
    try {
      const pending: Promise<Error | null>[] = [];
      let accepted = 0;
      for (let i = 0; i < 100; i++) {
        const p = new Promise<Error | null>((resolve) => {
          if (u.readv(f.fd, i * 4096, [new Uint8Array(4096)], false, resolve)) accepted++;
          else resolve(new Error('refused'));
        });
        pending.push(p);
      }
      expect(accepted).toBe(8);
      expect(u.full).toBe(true);
      const results = await Promise.all(pending);
      expect(results.filter((r) => r === null).length).toBe(8);
      expect(u.full).toBe(false);
      expect(await run((cb) => u.readv(f.fd, 0, [new Uint8Array(4096)], false, cb))).toBeNull();
    } finally {
      u.close();
      closeSync(f.fd);
    }
  });

  for (const inline of [false, true]) {
    it(`batches what one turn of the loop queues into one submission (${inline ? 'every SQE inline' : 'past the first, io-wq'})`, async () => {
      const f = file(new Uint8Array(1 << 20));
      const u = open();
      try {
        const before = u.submits;
        const all = Array.from({ length: 32 }, (_, i) => run((cb) => u.readv(f.fd, i * 4096, [new Uint8Array(4096)], inline, cb)));
        expect((await Promise.all(all)).every((e) => e === null)).toBe(true);
        expect(u.submits - before).toBe(1);
        expect(u.submitted).toBeGreaterThanOrEqual(32);
      } finally {
        u.close();
        closeSync(f.fd);
      }
    });
  }

  it('close fails what is still queued, exactly once each', async () => {
    const f = file(new Uint8Array(1 << 16));
    const u = open();
    const results: (Error | null)[] = [];
    for (let i = 0; i < 4; i++) u.readv(f.fd, 0, [new Uint8Array(4096)], false, (e) => results.push(e));
    u.close();
    await new Promise((r) => setImmediate(r));
    expect(results.length).toBe(4);
    expect(u.full).toBe(true);
    closeSync(f.fd);
  });
});

describe('Image engine choice', () => {
  it('uses io_uring by default here and the thread pool when asked', () => {
    const path = join(dir, 'img');
    writeFileSync(path, new Uint8Array(1 << 16));
    const a = new Image({ path, readonly: false, direct: false });
    const b = new Image({ path, readonly: false, direct: false, aio: 'threads' });
    try {
      expect(a.aio).toBe('io_uring');
      expect(b.aio).toBe('threads');
      expect(b.aioNote).toBe('threads were asked for');
    } finally {
      a.close();
      b.close();
    }
  });
});
