// The N-API module under stress the daemon puts on it: fd passing, and
// watchers created, stopped and garbage collected in any order.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { native, EAGAIN, EFD_NONBLOCK, MFD_CLOEXEC } from '../../src/native/index.js';

const addon = fileURLToPath(new URL('../../build/Release/vhostd_native.node', import.meta.url));

describe('native module', () => {
  it('survives watchers being unwatched and then collected', () => {
    // Exercises both release orders (libuv close first, or GC first); a use-after-free here once crashed the daemon.
    const script = `
      const n = require(${JSON.stringify(addon)});
      (async () => {
        for (let i = 0; i < 3000; i++) {
          const e = n.eventfd(0, ${EFD_NONBLOCK});
          let h = n.watch(e, 1, () => {});
          if (i % 2) { n.unwatch(h); n.close(e); } else { h = null; }
          if (i % 97 === 0) { gc(); await new Promise((r) => setImmediate(r)); }
        }
        gc(); await new Promise((r) => setTimeout(r, 20)); gc();
        await new Promise((r) => setTimeout(r, 20));
        console.log('survived');
        process.exit(0);
      })();`;
    const r = spawnSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8', timeout: 60_000 });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('survived');
  });

  it('passes fds over a socketpair-like connection with SCM_RIGHTS', async () => {
    const path = `/tmp/vhostd-native-${process.pid}.sock`;
    const lfd = native.listen(path, 1);
    try {
      const c = native.connect(path);
      expect(c).toBeGreaterThanOrEqual(0);
      let s = -EAGAIN;
      for (let i = 0; i < 100 && s === -EAGAIN; i++) s = native.accept(lfd);
      expect(s).toBeGreaterThanOrEqual(0);
      const memfd = native.memfdCreate('x', MFD_CLOEXEC);
      const ev = native.eventfd(0, EFD_NONBLOCK);
      expect(native.sendmsg(c, new Uint8Array([1, 2, 3]), [memfd, ev])).toBe(3);
      const fds = new Int32Array(8);
      const buf = new Uint8Array(16);
      const [n, nfds, trunc] = native.recvmsg(s, buf, fds);
      expect([n, nfds, trunc]).toEqual([3, 2, 0]);
      // The received eventfd is the same object: a write on one end is read on the other.
      expect(native.write(ev, new BigUint64Array([7n]))).toBe(8);
      const out = new BigUint64Array(1);
      expect(native.read(fds[1]!, out)).toBe(8);
      expect(out[0]).toBe(7n);
      for (const fd of [c, s, memfd, ev, fds[0]!, fds[1]!]) native.close(fd);
    } finally {
      native.close(lfd);
      await import('node:fs').then((fs) => fs.rmSync(path, { force: true }));
    }
  });
});

describe('native module in a worker thread', () => {
  it('loads and delivers fd readiness on the worker\'s own event loop', async () => {
    const { Worker } = await import('node:worker_threads');
    const code = `
      const { parentPort } = require('node:worker_threads');
      const n = require(${JSON.stringify(addon)});
      const e = n.eventfd(0, ${EFD_NONBLOCK});
      const h = n.watch(e, 1, () => {
        const v = new BigUint64Array(1);
        n.read(e, v);
        n.unwatch(h);
        n.close(e);
        parentPort.postMessage(Number(v[0]));
      });
      n.write(e, new BigUint64Array([42n]));`;
    const w = new Worker(code, { eval: true });
    const got = await new Promise<number>((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
    });
    await w.terminate();
    expect(got).toBe(42);
  });
});
