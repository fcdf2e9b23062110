// A read-only disk: vhostd --readonly, and qsd with writable=off for reference.
import { beforeEach, describe, expect, it } from 'vitest';
import { availableKinds, type Backend, type BackendKind } from './backends.js';
import { isZero, useBackend, withSession } from './helpers.js';
import { randomBytes, S, SECTOR, T } from '../driver/blk.js';
import { has, VF } from '../driver/wire.js';

describe.each<BackendKind>(availableKinds())('read-only disk: %s', { timeout: 60_000 }, (kind) => {
  const backend = useBackend(kind, { numQueues: 1, readonly: true });
  let be: Backend;
  beforeEach(() => {
    be = backend();
  });

  it('offers VIRTIO_BLK_F_RO', async () => {
    await withSession(be, async (s) => {
      const f = await s.fe.getFeatures();
      expect(has(f, VF.BLK_RO)).toBe(true);
      if (kind === 'vhostd') {
        // Nothing that writes is offered.
        expect(has(f, VF.BLK_DISCARD)).toBe(false);
        expect(has(f, VF.BLK_WRITE_ZEROES)).toBe(false);
      }
    });
  });

  it('OUT, WRITE_ZEROES and DISCARD fail; the image is untouched; IN and FLUSH work', async () => {
    await withSession(be, async (s) => {
      await s.startDevice({ queues: 1 });
      expect(has(s.features, VF.BLK_RO)).toBe(true);
      const b = s.blk[0]!;
      expect((await b.write(8, randomBytes(4096))).status).toBe(S.IOERR);
      expect((await b.write(8, randomBytes(4096), { indirect: true })).status).toBe(S.IOERR);
      // vhostd never offered these, so the driver cannot have acked them: UNSUPP. qsd offers them and fails the I/O.
      const notWritten = kind === 'vhostd' ? S.UNSUPP : S.IOERR;
      expect((await b.writeZeroes([{ sector: 8, sectors: 8 }])).status).toBe(notWritten);
      expect((await b.discard([{ sector: 8, sectors: 8 }])).status).toBe(notWritten);
      expect(isZero(be.readImage(8 * SECTOR, 4096))).toBe(true);
      const r = await b.read(8, 4096);
      expect(r.status).toBe(S.OK);
      expect(isZero(r.data)).toBe(true);
      expect((await b.run({ type: T.FLUSH })).status).toBe(S.OK);
    });
  });
});
