// Interop with an independent vhost-user front-end: DPDK's testpmd with a
// virtio-user port drives vhostd net. Packets it sends must reach the tap, and
// packets written into the tap must reach it, with matching counts.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netTotals, startVhostdNet, type Backend } from './daemons.js';
import { Netns } from './netns.js';
import { startTestpmd, testpmdAvailable, waitFor, type Testpmd } from '../support/testpmd.js';

const TAP = 'vtpmd0';
const INJECT = 5000;
const run = testpmdAvailable() || process.env.CI === 'true' ? describe : describe.skip;

run('vhostd net with DPDK testpmd as the front-end', () => {
  let ns: Netns;
  let dir: string;
  let daemon: Backend;
  let pmd: Testpmd | undefined;

  beforeEach(async () => {
    ns = new Netns('pmd');
    // No IPv6 chatter from the tap: every packet counted is one the test sent.
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
    dir = await mkdtemp(join(tmpdir(), 'vhostd-pmd-'));
    daemon = await startVhostdNet(ns.name, ['--tap', TAP], join(dir, 'net.sock'));
  });

  afterEach(async () => {
    await pmd?.kill();
    pmd = undefined;
    await daemon?.stop();
    ns?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  const tapStat = (name: string): number => Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/${name}`));

  it('delivers every packet testpmd sends to the tap', async () => {
    pmd = await startTestpmd(daemon.socket, 'txonly');
    await waitFor('testpmd traffic on the tap', () => tapStat('rx_packets') > 10_000, 60_000);
    // testpmd counts a packet once it is on the ring. Stop sending and let vhostd catch up before the
    // port closes: a ring that is stopped keeps what it has not taken, by design.
    const { tx } = await pmd.stopForwarding();
    const onTap = (): number => tapStat('rx_packets') + tapStat('rx_dropped');
    await waitFor(`all ${tx} packets on the tap`, () => onTap() >= tx, 30_000);
    await pmd.quit();
    const arrived = onTap(); // read before the tap goes with vhostd
    await daemon.stop();
    const [totals] = netTotals(daemon.output());
    expect(tx).toBeGreaterThan(10_000);
    expect(totals!.txPackets).toBe(tx);
    expect(arrived).toBe(tx);
    expect(totals!.txDropped).toBe(0);
    expect(totals!.txDiscarded).toBe(0);
  }, 120_000);

  it('delivers every packet written into the tap to testpmd', async () => {
    // Paced injection and a longer tap queue: the kernel must not drop a burst before vhostd reads it.
    ns.ip(`link set ${TAP} txqueuelen 10000`);
    pmd = await startTestpmd(daemon.socket, 'rxonly');
    const inject = `
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("${TAP}", 0))
frame = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + bytes(range(46))
for i in range(${INJECT}):
    s.send(frame[:14] + struct.pack("!I", i) + frame[18:])
    if i % 64 == 63: time.sleep(0.002)
`;
    ns.sh(`python3 -c '${inject}'`);
    await waitFor('all packets through vhostd', () => tapStat('tx_packets') >= INJECT, 30_000);
    await waitFor(`testpmd to receive ${INJECT} packets`, async () => (await pmd!.portStats()).rx >= INJECT, 30_000);
    const { rx } = await pmd.stopForwarding();
    await pmd.quit();
    const fromTap = tapStat('tx_packets');
    const dropped = tapStat('tx_dropped');
    await daemon.stop();
    const [totals] = netTotals(daemon.output());
    expect(fromTap).toBe(INJECT);
    expect(dropped).toBe(0);
    expect(totals!.rxPackets).toBe(INJECT);
    expect(rx).toBe(INJECT);
  }, 120_000);
});
