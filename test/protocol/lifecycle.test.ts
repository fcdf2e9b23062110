// Resource hygiene of vhostd, judged from /proc: after a disconnect or a
// reset, no guest memory or inflight area stays mapped and no received fd
// stays open; many connections in a row leave fds, mappings and RSS flat.
import { beforeEach, describe, expect, it } from 'vitest';
import type { Backend } from './backends.js';
import { annotate, expectBytes, useBackend } from './helpers.js';
import { fdCount, fdTargets, memfdMaps, rawBlk, rssKiB, sleep, startWithInflight, status, type InflightHandle } from './inflight-helpers.js';
import { randomBytes, S, SECTOR, T } from '../driver/blk.js';
import { DRIVER_PROTOCOL, Session } from '../driver/session.js';
import { bit, PF, Req } from '../driver/wire.js';

/** memfd names the driver gives guest RAM, and the one vhostd gives the inflight area it creates. */
const OURS = /memfd:(vhostd-test-guest-|vhostd-inflight)/;
const SETTLE_MS = 1_000;

interface Baseline {
  fds: number;
  memfds: number;
}

/** Measured on a daemon no front-end has touched yet; re-measured if the daemon was replaced. */
const baselines = new Map<number, Baseline>();
async function baseline(be: Backend): Promise<Baseline> {
  const pid = be.proc.pid!;
  let b = baselines.get(pid);
  if (!b) {
    // Let start-up finish: two equal samples.
    let prev = -1;
    for (let i = 0; i < 50; i++) {
      const n = fdCount(pid);
      if (n === prev) break;
      prev = n;
      await sleep(50);
    }
    b = { fds: prev, memfds: memfdMaps(pid).length };
    baselines.set(pid, b);
  }
  return b;
}

/** What the daemon holds beyond the baseline, or '' when it is back to it (plus `extraFds`, e.g. a live connection). */
function leftovers(be: Backend, base: Baseline, extraFds = 0): string {
  const pid = be.proc.pid!;
  const maps = memfdMaps(pid);
  const ours = maps.filter((l) => OURS.test(l));
  const fds = fdCount(pid);
  const out: string[] = [];
  if (ours.length) out.push(`still mapped:\n  ${ours.join('\n  ')}`);
  if (maps.length !== base.memfds) out.push(`${maps.length} memfd mappings, baseline ${base.memfds}`);
  if (fds !== base.fds + extraFds) out.push(`${fds} fds open, expected ${base.fds + extraFds}:\n  ${fdTargets(pid).join('\n  ')}`);
  return out.join('\n');
}

/** Poll until the daemon is back to its baseline: '' and the time it took, or what is left after SETTLE_MS. */
async function settle(be: Backend, base: Baseline, extraFds = 0): Promise<{ left: string; ms: number }> {
  const t0 = Date.now();
  let left = leftovers(be, base, extraFds);
  while (left && Date.now() - t0 < SETTLE_MS) {
    await sleep(2);
    left = leftovers(be, base, extraFds);
  }
  return { left, ms: Date.now() - t0 };
}

/** settle(), failing the test if anything is left. */
async function backToBaseline(be: Backend, base: Baseline, what: string, extraFds = 0): Promise<number> {
  const { left, ms } = await settle(be, base, extraFds);
  if (left) throw new Error(`${what}: after ${SETTLE_MS} ms vhostd still holds resources:\n${left}`);
  return ms;
}

/** A write and a read back on every queue. */
async function io(s: Session, sector: number, len = 4096): Promise<void> {
  for (const q of s.queues) {
    const d = randomBytes(len);
    const at = sector + q.index * 64;
    const w = rawBlk(s.mem, q, T.OUT, at, { out: d });
    q.kick();
    await q.waitUsed(1);
    expect(status(s.mem, w)).toBe(S.OK);
    const r = rawBlk(s.mem, q, T.IN, at, { inLen: len });
    q.kick();
    await q.waitUsed(1);
    expect(status(s.mem, r)).toBe(S.OK);
    expectBytes(s.mem.read(r.dataGpa, len), d, `queue ${q.index} read back`);
  }
}

/** Forget the rings: what a driver does after a device reset before it sets them up again. */
function dropQueues(s: Session): void {
  for (const q of s.queues) q.destroy();
  s.queues.length = 0;
  s.blk.length = 0;
}

describe('vhostd resource hygiene', { timeout: 120_000 }, () => {
  const backend = useBackend('vhostd', { numQueues: 2 });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  describe('abrupt disconnect: within 1 s all guest memory and the inflight area are unmapped and every received fd is closed', () => {
    it.each([
      ['idle', false],
      ['with writes in flight', true],
    ])('%s', async (_name, busy) => {
      const base = await baseline(be);
      const s = await Session.open(be.socket);
      let h: InflightHandle | undefined;
      try {
        h = await startWithInflight(s, { queues: 2 });
        await io(s, 1000);
        const pid = be.proc.pid!;
        // Sanity: the probe sees what it is meant to see.
        expect(memfdMaps(pid).filter((l) => OURS.test(l)).length).toBeGreaterThanOrEqual(4);
        expect(fdCount(pid)).toBeGreaterThan(base.fds);
        if (busy) {
          for (const q of s.queues) {
            for (let i = 0; i < 24; i++) rawBlk(s.mem, q, T.OUT, 20_000 + (q.index * 24 + i) * 512, { out: randomBytes(256 * 1024) });
            q.kick();
          }
        }
      } catch (e) {
        throw annotate(e, be, s);
      } finally {
        // Close the socket without any stop messages, then drop our side of everything.
        s.close();
        h?.close();
      }
      const ms = await backToBaseline(be, base, `disconnect ${busy ? 'with I/O in flight' : 'idle'}`);
      console.log(`disconnect (${busy ? 'busy' : 'idle'}): back to baseline after ${ms} ms`);
    });
  });

  // RESET_OWNER only disables the rings (vhost-user.rst warns against a full reset):
  // see frontend-hostile.test.ts.
  describe('RESET_DEVICE returns the device to its initial state', () => {
    // Without CONFIGURE_MEM_SLOTS: then a front-end always sends a whole SET_MEM_TABLE
    // before restarting, so memory kept across the reset has no use. (QEMU's
    // ADD_MEM_REG path diffs against a shadow table it does not clear on reset.)
    const plain = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.INFLIGHT_SHMFD);
    it.each([
      ['RESET_DEVICE', Req.RESET_DEVICE, plain | bit(PF.RESET_DEVICE)],
    ])('%s: memory and area unmapped, ring fds closed, the rings go quiet, and the connection starts again', async (name, request, protocol) => {
      const before = await baseline(be);
      const s = await Session.open(be.socket);
      const handles: InflightHandle[] = [];
      try {
        const start = async (): Promise<void> => {
          handles.push(await startWithInflight(s, { queues: 2, protocolFeatures: protocol }));
          // QEMU sends RESET_OWNER only when RESET_DEVICE was not negotiated.
          expect(s.protocol & bit(PF.RESET_DEVICE)).toBe(request === Req.RESET_DEVICE ? bit(PF.RESET_DEVICE) : 0n);
        };
        await start();
        await io(s, 3000);
        const old = s.queues[0]!;
        expect(await s.fe.command(request, new Uint8Array(0))).toBe(0n);
        // The connection's own socket is the one fd the daemon keeps. Judged at the
        // end, so a failure here still lets the restart below be checked.
        const afterReset = await settle(be, before, 1);
        // A ring from before the reset is not serviced any more, and not signalled.
        const signals = old.drainCall();
        old.poll = true;
        rawBlk(s.mem, old, T.FLUSH, 0);
        old.kick();
        await s.fe.getQueueNum();
        await sleep(50);
        expect(old.collect()).toEqual([]);
        expect(old.drainCall()).toBe(signals);
        // Start again on the same connection, with fresh rings, as a driver does after a reset.
        dropQueues(s);
        await start();
        expect(memfdMaps(be.proc.pid!).filter((l) => OURS.test(l)).length).toBeGreaterThanOrEqual(4);
        await io(s, 4000);
        const d = randomBytes(4096);
        const q = s.queues[1]!;
        const w = rawBlk(s.mem, q, T.OUT, 4500, { out: d });
        q.kick();
        await q.waitUsed(1);
        expect(status(s.mem, w)).toBe(S.OK);
        expectBytes(be.readImage(4500 * SECTOR, 4096), d, 'image after the restart');
        expect(afterReset.left, `after ${name}, within ${SETTLE_MS} ms, vhostd must hold nothing from before it`).toBe('');
      } catch (e) {
        throw annotate(e, be, s);
      } finally {
        s.close();
        for (const h of handles) h.close();
      }
      await backToBaseline(be, before, `disconnect after ${name}`);
    });

    it('RESET_DEVICE without the RESET_DEVICE feature negotiated closes the connection', async () => {
      const base = await baseline(be);
      const s = await Session.open(be.socket);
      try {
        await s.negotiate({ protocolFeatures: DRIVER_PROTOCOL });
        s.fe.send(Req.RESET_DEVICE, 1);
        expect(await s.fe.waitClosed(5_000)).toEqual([]);
      } catch (e) {
        throw annotate(e, be, s);
      } finally {
        s.close();
      }
      await backToBaseline(be, base, 'after the refused RESET_DEVICE');
    });
  });

  it('200 connect/start/I-O/stop/disconnect cycles keep fds and mappings at the baseline and RSS bounded', async () => {
    const base = await baseline(be);
    const pid = be.proc.pid!;
    const rss0 = rssKiB(pid);
    const t0 = Date.now();
    let worst = 0;
    for (let i = 0; i < 200; i++) {
      const s = await Session.open(be.socket);
      let h: InflightHandle | undefined;
      try {
        h = await startWithInflight(s, { queues: 2 });
        await io(s, 8 * (i % 1000), 4096);
        await s.stopDevice();
      } catch (e) {
        (e as Error).message = `cycle ${i}: ${(e as Error).message}`;
        throw annotate(e, be, s);
      } finally {
        s.close();
        h?.close();
      }
      worst = Math.max(worst, await backToBaseline(be, base, `cycle ${i}`));
    }
    const rss1 = rssKiB(pid);
    const growth = (rss1 - rss0) / 1024;
    console.log(
      `200 cycles in ${Date.now() - t0} ms; teardown at most ${worst} ms; fds ${fdCount(pid)} (baseline ${base.fds}); ` +
        `memfd mappings ${memfdMaps(pid).length} (baseline ${base.memfds}); RSS ${(rss0 / 1024).toFixed(1)} -> ${(rss1 / 1024).toFixed(1)} MiB (${growth >= 0 ? '+' : ''}${growth.toFixed(1)})`,
    );
    expect(leftovers(be, base)).toBe('');
    expect(growth, 'RSS growth over 200 cycles, MiB').toBeLessThan(30);
  });
});
