// Interop with an independent vhost-user front-end: DPDK's testpmd with a
// virtio-user port drives vhostd net. Packets it sends must reach the tap, and
// packets written into the tap must reach it, with matching counts.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netTotals, startVhostdNet, type Backend } from './daemons.js';
import { hasCommand } from './guest.js';
import { Netns } from './netns.js';
import { forget, remember } from '../support/children.js';
import { waitFor as pollFor } from '../protocol/helpers.js';

/** Polls that run commands (ip netns exec, testpmd's prompt): every 100 ms, not every millisecond. */
const waitFor = (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> =>
  pollFor(cond, what, timeoutMs, 100);

const TAP = 'vtpmd0';
const INJECT = 5000;
const available = hasCommand('dpdk-testpmd', ['--help']) || spawnSync('which', ['dpdk-testpmd']).status === 0;
const run = available || process.env.CI === 'true' ? describe : describe.skip;

/** testpmd at its interactive prompt, driven through stdin. */
interface Testpmd {
  /** `stop`: its lcores stop sending and receiving; resolves to the forward statistics it then prints. */
  stopForwarding(): Promise<{ rx: number; tx: number }>;
  /** `show port stats 0`: what its port has received and sent so far. */
  portStats(): Promise<{ rx: number; tx: number }>;
  /** `quit`: it stops and closes its port (GET_VRING_BASE) and exits. */
  quit(): Promise<void>;
  /** Cleanup after a failed test. */
  kill(): Promise<void>;
}

/** Starts testpmd and, once its prompt is up, forwarding in `mode`. */
async function startTestpmd(socket: string, mode: 'txonly' | 'rxonly'): Promise<Testpmd> {
  // stdbuf: its printf output to a pipe would otherwise sit in a buffer until exit.
  const child = spawn(
    'stdbuf',
    [
      '-o0', 'dpdk-testpmd', '-l', '0,1', '--no-pci', '--no-huge', '-m', '1024', '--file-prefix', `vhostd${process.pid}`,
      '--vdev', `net_virtio_user0,path=${socket},queues=1`,
      '--', '-i', `--forward-mode=${mode}`, '--total-num-mbufs=16384',
    ],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  const record = remember(child, dirname(socket));
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  let exited = false;
  const closed = new Promise<void>((r) =>
    child.once('close', () => {
      exited = true;
      forget(record);
      r();
    }),
  );
  const until = async (what: string, re: RegExp, from: number): Promise<RegExpMatchArray> => {
    await waitFor(`testpmd: ${what}`, () => re.test(out.slice(from)) || exited, 60_000);
    const m = out.slice(from).match(re);
    if (!m) throw new Error(`testpmd exited before ${what}:\n${out.slice(-3000)}`);
    return m;
  };
  const command = (line: string): number => {
    const from = out.length;
    child.stdin.write(`${line}\n`);
    return from;
  };
  try {
    await until('its prompt', /testpmd> /, 0);
    await until('forwarding started', /packet forwarding - ports=1/, command('start'));
  } catch (e) {
    child.kill('SIGKILL');
    await closed;
    throw e;
  }
  return {
    async stopForwarding() {
      // The per-port block comes first; with one port it is the whole story.
      const m = await until('forward statistics', /RX-packets:\s+(\d+)[\s\S]*?TX-packets:\s+(\d+)[\s\S]*?Done\./, command('stop'));
      return { rx: Number(m[1]), tx: Number(m[2]) };
    },
    async portStats() {
      const m = await until('port statistics', /NIC statistics for port 0[\s\S]*?RX-packets:\s+(\d+)[\s\S]*?TX-packets:\s+(\d+)\s/, command('show port stats 0'));
      return { rx: Number(m[1]), tx: Number(m[2]) };
    },
    async quit() {
      command('quit');
      const t = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await closed;
      clearTimeout(t);
    },
    async kill() {
      if (!exited) child.kill('SIGKILL');
      await closed;
    },
  };
}

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
