// Interop with an independent vhost-user front-end: DPDK's testpmd with a
// virtio-user port drives vhostd net. Packets it sends must reach the tap, and
// packets written into the tap must reach it, with matching counts.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netTotals, startVhostdNet, type Backend } from './daemons.js';
import { hasCommand } from './guest.js';
import { Netns } from './netns.js';

const TAP = 'vtpmd0';
const INJECT = 5000;
const available = hasCommand('dpdk-testpmd', ['--help']) || spawnSync('which', ['dpdk-testpmd']).status === 0;
const run = available || process.env.CI === 'true' ? describe : describe.skip;

/** Runs testpmd until `stop()`, which interrupts it and returns its final port statistics. */
function testpmd(socket: string, mode: 'txonly' | 'rxonly'): { stop(): Promise<{ rx: number; tx: number }>; output(): string } {
  const child = spawn(
    'dpdk-testpmd',
    [
      '-l', '0,1', '--no-pci', '--no-huge', '-m', '1024', '--file-prefix', `vhostd${process.pid}`,
      '--vdev', `net_virtio_user0,path=${socket},queues=1`,
      '--', `--forward-mode=${mode}`, '--auto-start', '--stats-period', '1', '--total-num-mbufs=16384',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const closed = new Promise<void>((r) => child.once('close', () => r()));
  return {
    output: () => out,
    async stop() {
      child.kill('SIGINT');
      const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await closed;
      clearTimeout(t);
      // The last "Forward statistics" block is the final count.
      const rx = [...out.matchAll(/RX-packets:\s+(\d+)/g)].pop();
      const tx = [...out.matchAll(/TX-packets:\s+(\d+)/g)].pop();
      if (!rx || !tx) throw new Error(`no statistics from testpmd:\n${out.slice(-3000)}`);
      return { rx: Number(rx[1]), tx: Number(tx[1]) };
    },
  };
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

run('vhostd net with DPDK testpmd as the front-end', () => {
  let ns: Netns;
  let dir: string;
  let daemon: Backend;

  beforeEach(async () => {
    ns = new Netns('pmd');
    // No IPv6 chatter from the tap: every packet counted is one the test sent.
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
    dir = await mkdtemp(join(tmpdir(), 'vhostd-pmd-'));
    daemon = await startVhostdNet(ns.name, ['--tap', TAP], join(dir, 'net.sock'));
  });

  afterEach(async () => {
    await daemon?.stop();
    ns?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  const tapStat = (name: string): number => Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/${name}`));

  it('delivers every packet testpmd sends to the tap', async () => {
    const pmd = testpmd(daemon.socket, 'txonly');
    await waitFor('testpmd traffic on the tap', () => tapStat('rx_packets') > 10_000, 60_000);
    const { tx } = await pmd.stop();
    const onTap = tapStat('rx_packets') + tapStat('rx_dropped'); // read before the tap goes with vhostd
    await daemon.stop();
    const [totals] = netTotals(daemon.output());
    expect(tx).toBeGreaterThan(10_000);
    expect(totals!.txPackets).toBe(tx);
    expect(onTap).toBe(tx);
    expect(totals!.txDropped).toBe(0);
  }, 120_000);

  it('delivers every packet written into the tap to testpmd', async () => {
    const pmd = testpmd(daemon.socket, 'rxonly');
    // Paced injection and a longer tap queue: the kernel must not drop a burst before vhostd reads it.
    ns.ip(`link set ${TAP} txqueuelen 10000`);
    // Wait until testpmd's port is up (vhostd is reading the tap for it).
    await waitFor('testpmd port up', () => /packet forwarding - ports=1/.test(pmd.output()), 60_000);
    await new Promise((r) => setTimeout(r, 1000));
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
    await new Promise((r) => setTimeout(r, 1500));
    const { rx } = await pmd.stop();
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
