// Tap.mtu() against what `ip link` reports, in a private namespace (the tap
// code runs in a child there), and the offloads the acked features turn into.
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Netns } from '../e2e/netns.js';
import { tapOffloads } from '../../src/backends/net/net-device.js';
import { TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO } from '../../src/backends/net/tap.js';

const TAP_JS = fileURLToPath(new URL('../../dist/backends/net/tap.js', import.meta.url));
const bit = (n: number): bigint => 1n << BigInt(n);
const GUEST_CSUM = 1;
const GUEST_TSO4 = 7;
const GUEST_TSO6 = 8;
const GUEST_ECN = 9;
const GUEST_UFO = 10;

describe('Tap.mtu()', () => {
  let ns: Netns;
  beforeAll(() => {
    ns = new Netns('tapu');
  });
  afterAll(() => ns?.destroy());

  /** In the namespace: open `name` with Tap, then for each MTU set it with `ip link` and read both. */
  function probe(name: string, mtus: number[], viaSetMtu = false): { ipLink: number; tap: number }[] {
    const script = `
      const { execFileSync } = require('node:child_process');
      import(${JSON.stringify(TAP_JS)}).then(({ Tap }) => {
        const tap = new Tap({ name: ${JSON.stringify(name)}, queues: 1, persist: false });
        const ipLink = () => Number(/ mtu (\\d+) /.exec(execFileSync('ip', ['-o', 'link', 'show', 'dev', ${JSON.stringify(name)}], { encoding: 'utf8' }))[1]);
        const out = [{ ipLink: ipLink(), tap: tap.mtu() }];
        for (const m of ${JSON.stringify(mtus)}) {
          if (${viaSetMtu}) tap.setMtu(m);
          else execFileSync('ip', ['link', 'set', 'dev', ${JSON.stringify(name)}, 'mtu', String(m)]);
          out.push({ ipLink: ipLink(), tap: tap.mtu() });
        }
        tap.close();
        console.log(JSON.stringify(out));
      });`;
    return JSON.parse(ns.sh(`${process.execPath} -e '${script.replace(/'/g, `'\\''`)}'`)) as { ipLink: number; tap: number }[];
  }

  it('matches ip link on a tap it created, as ip link changes the MTU', () => {
    const r = probe('vtu0', [9000, 68, 65521, 1500]);
    expect(r.map((x) => x.ipLink)).toEqual([1500, 9000, 68, 65521, 1500]);
    for (const x of r) expect(x.tap).toBe(x.ipLink);
  });

  it('matches ip link on an existing tap, and after its own setMtu', () => {
    ns.ip('tuntap add dev vtu1 mode tap vnet_hdr');
    ns.ip('link set dev vtu1 mtu 4000');
    const r = probe('vtu1', [9000, 1280], true);
    expect(r.map((x) => x.ipLink)).toEqual([4000, 9000, 1280]);
    for (const x of r) expect(x.tap).toBe(x.ipLink);
  });
});

describe('tapOffloads', () => {
  it('needs GUEST_CSUM for anything', () => {
    expect(tapOffloads(bit(GUEST_TSO4) | bit(GUEST_TSO6) | bit(GUEST_ECN) | bit(GUEST_UFO))).toBe(0);
  });

  it('sets TSO_ECN only together with TSO4 or TSO6', () => {
    expect(tapOffloads(bit(GUEST_CSUM) | bit(GUEST_ECN))).toBe(TUN_F_CSUM);
    expect(tapOffloads(bit(GUEST_CSUM) | bit(GUEST_ECN) | bit(GUEST_UFO))).toBe(TUN_F_CSUM | TUN_F_UFO);
    expect(tapOffloads(bit(GUEST_CSUM) | bit(GUEST_ECN) | bit(GUEST_TSO4))).toBe(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN);
    expect(tapOffloads(bit(GUEST_CSUM) | bit(GUEST_ECN) | bit(GUEST_TSO6))).toBe(TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN);
    expect(tapOffloads(bit(GUEST_CSUM) | bit(GUEST_TSO4) | bit(GUEST_TSO6))).toBe(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
  });
});
