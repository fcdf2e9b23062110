// vhostd net with a real guest: the tap and the host end live in a network
// namespace made for the test. Covers MAC/MTU, ping (also 8000 bytes), TCP both
// ways with checksums, two queue pairs, a legacy driver, and driver resets.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { netTotals, startVhostdNet, type Backend } from './daemons.js';
import { provisionGuestKit, qemuAvailable, runGuest, vhostUserNetArgs, type GuestResult } from './guest.js';
import { Netns } from './netns.js';

const GUEST_TIMEOUT = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 300_000);
const HOST_IP = '10.213.0.1';
const GUEST_IP = '10.213.0.2';
const MAC = '52:54:00:ab:cd:01';
// QEMU 7.2 segfaults when a vhost-user NIC's control queue uses MSI-X (with any
// back-end, DPDK's included); legacy INTx interrupts avoid that path.
const QEMU72_WORKAROUND = 'vectors=0';

const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;

function expectClean(r: GuestResult): void {
  if (r.exitCode !== 0) throw new Error(`guest script failed (exit ${r.exitCode}):\n${r.output.slice(-6000)}`);
}

const GUEST_NET_UP = `
ip link set eth0 up || exit 2
ip addr add ${GUEST_IP}/24 dev eth0 || exit 3
for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1 && break; done
`;

interface Rig {
  ns: Netns;
  dir: string;
  daemon: Backend;
  tap: string;
}

async function rig(tag: string, args: string[]): Promise<Rig> {
  await provisionGuestKit();
  const ns = new Netns(tag);
  const dir = await mkdtemp(join(tmpdir(), `vhostd-net-${tag}-`));
  const tap = `vt${tag}`;
  try {
    const daemon = await startVhostdNet(ns.name, ['--tap', tap, ...args], join(dir, 'net.sock'));
    ns.ip(`addr add ${HOST_IP}/24 dev ${tap}`);
    return { ns, dir, daemon, tap };
  } catch (e) {
    ns.destroy();
    throw e;
  }
}

async function teardown(r: Rig | undefined): Promise<void> {
  if (!r) return;
  await r.daemon.stop();
  r.ns.destroy();
  await rm(r.dir, { recursive: true, force: true });
}

run('vhostd net with a real guest', () => {
  let r: Rig | undefined;
  beforeAll(async () => {
    r = await rig('a', ['--mtu', '1400']);
  });
  afterAll(async () => teardown(r));

  it(
    'gives the guest its MAC and MTU, pings, and moves TCP both ways intact',
    async () => {
      const bytes = 8 * 1024 * 1024;
      const fromGuest = r!.ns.tcpPeer('recv', 5001, bytes);
      const toGuest = r!.ns.tcpPeer('send', 5002, bytes);
      await r!.ns.waitListening(5001);
      await r!.ns.waitListening(5002);
      const res = await runGuest({
        devices: vhostUserNetArgs(r!.daemon.socket, { mac: MAC, extra: `host_mtu=1400,${QEMU72_WORKAROUND}` }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@MAC=$(cat /sys/class/net/eth0/address)"
echo "@@MTU=$(cat /sys/class/net/eth0/mtu)"
${GUEST_NET_UP}
ping -c 3 -W 2 ${HOST_IP} > /dev/null; echo "@@PING=$?"
ping -c 3 -W 3 -s 8000 ${HOST_IP} > /dev/null; echo "@@PING8000=$?"
dd if=/dev/urandom of=/tmp/blob bs=1M count=${bytes / 1024 / 1024} 2>/dev/null
echo "@@SENT_MD5=$(md5sum /tmp/blob | cut -d' ' -f1)"
nc ${HOST_IP} 5001 < /tmp/blob; echo "@@NC_SEND=$?"
nc ${HOST_IP} 5002 > /tmp/recv; echo "@@NC_RECV=$?"
echo "@@RECV_MD5=$(md5sum /tmp/recv | cut -d' ' -f1)"
`,
      });
      expectClean(res);
      const m = res.markers;
      expect(m.MAC).toBe(MAC);
      expect(m.MTU).toBe('1400');
      expect(m.PING).toBe('0');
      expect(m.PING8000).toBe('0');
      expect(await fromGuest).toBe(m.SENT_MD5);
      expect(m.RECV_MD5).toBe(await toGuest);
      expect(r!.ns.ip(`link show ${r!.tap}`)).toMatch(/mtu 1400/);
    },
    GUEST_TIMEOUT + 60_000,
  );

  it(
    'keeps serving across driver resets and a second guest',
    async () => {
      const res = await runGuest({
        devices: vhostUserNetArgs(r!.daemon.socket, { mac: MAC, extra: QEMU72_WORKAROUND }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
${GUEST_NET_UP}
ping -c 2 -W 2 ${HOST_IP} > /dev/null; echo "@@BEFORE=$?"
# Unbinding and rebinding the driver resets the device, as a reboot does.
dev=$(basename $(readlink /sys/class/net/eth0/device))
echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind
echo $dev > /sys/bus/virtio/drivers/virtio_net/bind
sleep 1
${GUEST_NET_UP}
ping -c 2 -W 2 ${HOST_IP} > /dev/null; echo "@@AFTER=$?"
`,
      });
      expectClean(res);
      expect(res.markers.BEFORE).toBe('0');
      expect(res.markers.AFTER).toBe('0');
    },
    GUEST_TIMEOUT + 60_000,
  );

  it(
    'serves a legacy (virtio 0.9) driver',
    async () => {
      const res = await runGuest({
        devices: vhostUserNetArgs(r!.daemon.socket, { mac: MAC, extra: `disable-modern=on,disable-legacy=off,${QEMU72_WORKAROUND}` }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@VERSION1=$(cat /sys/bus/virtio/devices/virtio*/features | head -c 33 | tail -c 1)"
${GUEST_NET_UP}
ping -c 3 -W 2 ${HOST_IP} > /dev/null; echo "@@PING=$?"
ping -c 2 -W 3 -s 8000 ${HOST_IP} > /dev/null; echo "@@PING8000=$?"
`,
      });
      expectClean(res);
      expect(res.markers.VERSION1).toBe('0');
      expect(res.markers.PING).toBe('0');
      expect(res.markers.PING8000).toBe('0');
    },
    GUEST_TIMEOUT + 60_000,
  );
});

// Two pairs on two threads (the default), and both on one thread.
const MQ_LAYOUTS: [string, string[], Set<string>][] = [
  ['one thread each', [], new Set(['0@net-thread-0', '1@net-thread-1'])],
  ['sharing one thread', ['--threads', '1'], new Set(['0@net-thread-0', '1@net-thread-0'])],
];

run.each(MQ_LAYOUTS)('vhostd net with two queue pairs, %s', (_name, threadArgs, layout) => {
  let r: Rig | undefined;
  beforeAll(async () => {
    r = await rig('mq', ['--num-queues', '2', ...threadArgs]);
  });
  afterAll(async () => teardown(r));

  it(
    'carries traffic on both tap queues',
    async () => {
      // Four flows each way: the tap hashes flows over its queues, the guest picks TX queues by CPU.
      const peers = [0, 1, 2, 3].flatMap((i) => [r!.ns.tcpPeer('recv', 5100 + i, 2 << 20), r!.ns.tcpPeer('send', 5200 + i, 2 << 20)]);
      for (let i = 0; i < 4; i++) {
        await r!.ns.waitListening(5100 + i);
        await r!.ns.waitListening(5200 + i);
      }
      const res = await runGuest({
        smp: 2,
        devices: vhostUserNetArgs(r!.daemon.socket, { mac: MAC, queuePairs: 2, extra: QEMU72_WORKAROUND }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
echo "@@QUEUES=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
${GUEST_NET_UP}
dd if=/dev/urandom of=/tmp/blob bs=1M count=2 2>/dev/null
for i in 0 1 2 3; do
  taskset $((1 << (i % 2))) sh -c "nc ${HOST_IP} $((5100 + i)) < /tmp/blob; nc ${HOST_IP} $((5200 + i)) > /tmp/r$i" &
done
wait
echo "@@SENT_MD5=$(md5sum /tmp/blob | cut -d' ' -f1)"
for i in 0 1 2 3; do echo "@@RECV$i=$(md5sum /tmp/r$i | cut -d' ' -f1)"; done
`,
      });
      expectClean(res);
      expect(res.markers.QUEUES).toBe('2');
      const results = await Promise.all(peers);
      for (let i = 0; i < 4; i++) {
        expect(results[2 * i]).toBe(res.markers.SENT_MD5);
        expect(res.markers[`RECV${i}`]).toBe(results[2 * i + 1]);
      }
      await r!.daemon.stop();
      const totals = netTotals(r!.daemon.output());
      expect(totals).toHaveLength(2);
      for (const t of totals) {
        expect(t.txPackets).toBeGreaterThan(0);
        expect(t.rxPackets).toBeGreaterThan(0);
      }
      // Each pair ran on the thread the layout gives it.
      const stops = r!.daemon.output().split('\n').filter((l) => l.includes('"msg":"queue pair stopped"')).map((l) => JSON.parse(l) as { thread: string; pair: number });
      expect(new Set(stops.map((l) => `${l.pair}@${l.thread}`))).toEqual(layout);
    },
    GUEST_TIMEOUT + 60_000,
  );
});
