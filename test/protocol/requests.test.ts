// The request table (src/protocol/requests.ts) against the sizes, fds and
// protocol features of vhost-user.rst, and the generic checks made from it.
import { describe, expect, it } from 'vitest';
import { checkMessage, REQUESTS, type Message } from '../../src/protocol/requests.js';
import { bit, encodeMemTable, encodeU64, ProtocolError, ProtocolFeature, Req } from '../../src/protocol/messages.js';

const msg = (request: number, payload: Uint8Array, fds: number[] = []): Message => ({ request, flags: 1, payload, fds });
const ALL = (1n << 64n) - 1n;

/** A config payload announcing `size` data bytes, and carrying them. */
function configOf(size: number): Uint8Array {
  const p = new Uint8Array(12 + size);
  new DataView(p.buffer).setUint32(4, size, true);
  return p;
}

describe('request table', () => {
  it('fixed payload sizes as in the spec', () => {
    const sizes: [Req, number][] = [
      [Req.GET_FEATURES, 0], [Req.SET_FEATURES, 8], [Req.SET_OWNER, 0], [Req.RESET_OWNER, 0],
      [Req.SET_VRING_NUM, 8], [Req.SET_VRING_ADDR, 40], [Req.SET_VRING_BASE, 8], [Req.GET_VRING_BASE, 8],
      [Req.SET_VRING_KICK, 8], [Req.SET_VRING_CALL, 8], [Req.SET_VRING_ERR, 8],
      [Req.GET_PROTOCOL_FEATURES, 0], [Req.SET_PROTOCOL_FEATURES, 8], [Req.GET_QUEUE_NUM, 0], [Req.SET_VRING_ENABLE, 8],
      [Req.SEND_RARP, 8], [Req.NET_SET_MTU, 8], [Req.GET_INFLIGHT_FD, 24], [Req.SET_INFLIGHT_FD, 24],
      [Req.RESET_DEVICE, 0], [Req.GET_MAX_MEM_SLOTS, 0], [Req.ADD_MEM_REG, 40], [Req.REM_MEM_REG, 40],
    ];
    for (const [r, size] of sizes) expect(REQUESTS.get(r)?.size, Req[r]).toBe(size);
  });

  it('protocol features required', () => {
    const need: [Req, number | undefined][] = [
      [Req.GET_CONFIG, ProtocolFeature.CONFIG], [Req.SET_CONFIG, ProtocolFeature.CONFIG],
      [Req.GET_INFLIGHT_FD, ProtocolFeature.INFLIGHT_SHMFD], [Req.SET_INFLIGHT_FD, ProtocolFeature.INFLIGHT_SHMFD],
      [Req.RESET_DEVICE, ProtocolFeature.RESET_DEVICE], [Req.ADD_MEM_REG, ProtocolFeature.CONFIGURE_MEM_SLOTS],
      [Req.REM_MEM_REG, ProtocolFeature.CONFIGURE_MEM_SLOTS], [Req.SEND_RARP, ProtocolFeature.RARP], [Req.NET_SET_MTU, ProtocolFeature.MTU],
      [Req.SET_VRING_ENABLE, undefined], [Req.GET_MAX_MEM_SLOTS, undefined],
    ];
    for (const [r, f] of need) expect(REQUESTS.get(r)?.feature, Req[r]).toBe(f);
  });

  it('requests not implemented are not in the table', () => {
    for (const r of [22, 23, 26, 27, 28, 29, 30, 33, 35, 41, 42]) expect(REQUESTS.has(r), `request ${r}`).toBe(false);
  });

  it('every violation names the request', () => {
    const bad: [Message, bigint, RegExp][] = [
      [msg(99, new Uint8Array(0)), ALL, /^UNKNOWN\(99\): request not supported/],
      [msg(Req.SET_FEATURES, new Uint8Array(4)), ALL, /^SET_FEATURES: payload is 4 bytes, expected 8/],
      [msg(Req.GET_FEATURES, new Uint8Array(0), [7]), ALL, /^GET_FEATURES: carries 1 fds, expected 0/],
      [msg(Req.ADD_MEM_REG, new Uint8Array(40)), 0n, /^ADD_MEM_REG without the CONFIGURE_MEM_SLOTS protocol feature/],
      [msg(Req.ADD_MEM_REG, new Uint8Array(40)), ALL, /^ADD_MEM_REG: carries 0 fds, expected 1/],
      [msg(Req.REM_MEM_REG, new Uint8Array(40), [3, 4]), ALL, /^REM_MEM_REG: carries 2 fds, expected 0 or 1/],
      [msg(Req.SET_VRING_KICK, encodeU64(0x100n), [3]), ALL, /^SET_VRING_KICK: carries 1 fds, expected 0 \(the no-fd flag is set\)/],
      [msg(Req.SET_VRING_CALL, encodeU64(1n)), ALL, /^SET_VRING_CALL: carries 0 fds, expected 1/],
      [msg(Req.SET_MEM_TABLE, encodeMemTable([{ guestPhysAddr: 0n, memorySize: 1n, userspaceAddr: 0n, mmapOffset: 0n }])), ALL, /^SET_MEM_TABLE: carries 0 fds, expected 1 \(one per region\)/],
      [msg(Req.SET_MEM_TABLE, new Uint8Array(8)), ALL, /^SET_MEM_TABLE: 0 regions/],
      [msg(Req.GET_CONFIG, configOf(257)), bit(ProtocolFeature.CONFIG), /^GET_CONFIG: config size 257 exceeds 256/],
    ];
    for (const [m, acked, why] of bad) {
      let err: unknown;
      try {
        checkMessage(m, acked);
      } catch (e) {
        err = e;
      }
      expect(err, `${Req[m.request] ?? m.request}`).toBeInstanceOf(ProtocolError);
      expect((err as Error).message).toMatch(why);
    }
  });

  it('well-formed messages pass', () => {
    const ok: Message[] = [
      msg(Req.SET_VRING_KICK, encodeU64(0x100n)),
      msg(Req.SET_VRING_KICK, encodeU64(3n), [9]),
      msg(Req.REM_MEM_REG, new Uint8Array(40)),
      msg(Req.REM_MEM_REG, new Uint8Array(40), [9]),
      msg(Req.GET_QUEUE_NUM, new Uint8Array(0)),
    ];
    for (const m of ok) expect(checkMessage(m, ALL), Req[m.request]).toBe(REQUESTS.get(m.request));
  });
});
