// Online resize over a real socket: the front-end hands vhostd a BACKEND_REQ
// channel, the image grows, `vhostd resize` (or SIGHUP) makes vhostd send
// CONFIG_CHANGE_MSG and wait for its answer, GET_CONFIG then shows the new
// capacity and I/O in the new tail works; a shrunk image is refused and the
// capacity stays. On the daemon's thread and on a queue thread.
import { execFile } from 'node:child_process';
import { truncateSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { S, SECTOR, T } from '../driver/blk.js';
import { DRIVER_PROTOCOL, type Session } from '../driver/session.js';
import { bit, PF, Req } from '../driver/wire.js';
import { native, EAGAIN } from '../../src/native/index.js';
import { VHOSTD_BIN } from '../support/children.js';
import { useBackend, waitFor, withSession } from './helpers.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const IMAGE = 32 * MiB;
const CONFIG_CHANGE_MSG = 2;

/** A connected pair of stream sockets (the channel's two ends). */
function socketPair(dir: string): [number, number] {
  const path = join(dir, `pair-${process.pid}-${Math.random().toString(36).slice(2)}.sock`);
  const l = native.listen(path, 1);
  const a = native.connect(path);
  let b = -EAGAIN;
  for (let i = 0; i < 100 && b === -EAGAIN; i++) b = native.accept(l);
  native.close(l);
  if (a < 0 || b < 0) throw new Error(`socket pair: ${a} ${b}`);
  return [a, b];
}

/** Answer one back-end request on our end of the channel: returns its request number. */
async function answerOne(fd: number, ack = 0n): Promise<number> {
  const buf = new Uint8Array(64);
  const fds = new Int32Array(8);
  for (let i = 0; i < 500; i++) {
    const [n] = native.recvmsg(fd, buf, fds);
    if (n > 0) {
      const dv = new DataView(buf.buffer);
      const req = dv.getUint32(0, true);
      const flags = dv.getUint32(4, true);
      expect(dv.getUint32(8, true), 'payload size').toBe(0);
      if (flags & 0x8) {
        const reply = new Uint8Array(20);
        const rv = new DataView(reply.buffer);
        rv.setUint32(0, req, true);
        rv.setUint32(4, 0x1 | 0x4, true);
        rv.setUint32(8, 8, true);
        rv.setBigUint64(12, ack, true);
        expect(native.sendmsg(fd, reply, [])).toBe(20);
      }
      return req;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error('no request on the back-end channel');
}

async function capacityOf(s: Session): Promise<bigint> {
  const c = await s.fe.getConfig(0, 8);
  return new DataView(c!.data.buffer, c!.data.byteOffset).getBigUint64(0, true);
}

describe.each([
  ['', [] as string[]],
  [' on a queue thread', ['--threads', '1']],
])('online resize%s', { timeout: 60_000 }, (_where, placement) => {
  const be = useBackend('vhostd', { numQueues: 1, imageBytes: IMAGE, extraArgs: placement });
  const ctl = (): string => be().socket.replace(/\.sock$/, '.ctl');

  it('offers BACKEND_REQ; a grown image reaches the front-end as CONFIG_CHANGE_MSG, and the new tail is usable', async () => {
    truncateSync(be().image, IMAGE);
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1, protocolFeatures: DRIVER_PROTOCOL | bit(PF.BACKEND_REQ) });
      expect(s.offeredProtocol & bit(PF.BACKEND_REQ)).toBe(bit(PF.BACKEND_REQ));
      const [ours, theirs] = socketPair(join(be().image, '..'));
      try {
        expect(await s.fe.command(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs])).toBe(0n);
        native.close(theirs);
        expect(await capacityOf(s)).toBe(BigInt(IMAGE / SECTOR));
        truncateSync(be().image, 2 * IMAGE);
        const resized = run(process.execPath, [VHOSTD_BIN, 'resize', '--control', ctl()]);
        expect(await answerOne(ours)).toBe(CONFIG_CHANGE_MSG);
        const { stdout } = await resized;
        expect(stdout).toMatch(/capacity now 67108864 bytes; the front-end was told/);
        expect(await capacityOf(s)).toBe(BigInt((2 * IMAGE) / SECTOR));
        const tail = BigInt((2 * IMAGE) / SECTOR - 8);
        const data = new Uint8Array(4096).fill(0x5a);
        expect((await s.blk[0]!.run({ type: T.OUT, sector: tail, out: data })).status).toBe(S.OK);
        const back = await s.blk[0]!.run({ type: T.IN, sector: tail, inLen: 4096 });
        expect(back.status).toBe(S.OK);
        expect(Buffer.from(back.data).equals(Buffer.from(data))).toBe(true);
        // One sector past the new end is still refused.
        expect((await s.blk[0]!.run({ type: T.IN, sector: tail + 8n, inLen: 512 })).status).toBe(S.IOERR);

        // SIGHUP does the same.
        truncateSync(be().image, 3 * IMAGE);
        be().proc.kill('SIGHUP');
        expect(await answerOne(ours)).toBe(CONFIG_CHANGE_MSG);
        await waitFor(async () => (await capacityOf(s)) === BigInt((3 * IMAGE) / SECTOR), 'the capacity after SIGHUP', 5000, 20);
      } finally {
        native.close(ours);
      }
    });
  });

  it('a shrunk image is refused: exit 1, a clear line, the capacity unchanged, the tail still served', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const cap = await capacityOf(s);
      truncateSync(be().image, Number(cap) * SECTOR - MiB);
      const r = await run(process.execPath, [VHOSTD_BIN, 'resize', '--control', ctl()]).catch((e: { code: number; stdout: string }) => e);
      expect((r as { code: number }).code).toBe(1);
      expect((r as { stdout: string }).stdout).toMatch(/shrank .* refused/);
      expect(await capacityOf(s)).toBe(cap);
      truncateSync(be().image, Number(cap) * SECTOR);
    });
  });

  it('without a channel the new size is taken, and said to be untold', async () => {
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 1 });
      const cap = await capacityOf(s);
      truncateSync(be().image, Number(cap) * SECTOR + IMAGE);
      const { stdout } = await run(process.execPath, [VHOSTD_BIN, 'resize', '--control', ctl()]);
      expect(stdout).toMatch(/no front-end to tell/);
      expect(await capacityOf(s)).toBe(cap + BigInt(IMAGE / SECTOR));
    });
  });
});
