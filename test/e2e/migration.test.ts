// Live migration with real guests: a source QEMU with its own vhostd migrates
// over a Unix socket (QMP) to a destination QEMU with another vhostd, while
// the guest keeps working. blk: both daemons serve one shared image; fio
// writes with crc32c headers and verifies, and re-verifies data written before
// the migration, in rounds that run on through the switch-over. net: both
// taps sit on one bridge; TCP streams both ways (md5-checked), iperf3 and ping
// keep running, and the destination announces the guest (SEND_RARP) so the
// bridge forwards to the new tap.
import { mkdtemp, open, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startVhostd, startVhostdNet, type Backend } from './daemons.js';
import { provisionGuestKit, qemuAvailable, runMigratingGuest, vhostUserBlkArgs, vhostUserNetArgs } from './guest.js';
import { expectCleanMigrationFio, expectMigrated, migrationFioScript, summary } from './migrate.js';
import { Netns } from './netns.js';

const run = qemuAvailable() || process.env.CI === 'true' ? describe : describe.skip;
const GUEST_TIMEOUT = Number(process.env.VHOSTD_GUEST_TIMEOUT ?? 300_000);
const MiB = 1 << 20;
/** How long the guest keeps its workload going after asking to be migrated (the switch-over happens in the first seconds). */
const WORK_S = 40;

run('live migration between two QEMUs, each with its own vhostd', { timeout: GUEST_TIMEOUT + 120_000 }, () => {
  beforeAll(async () => {
    await provisionGuestKit();
  });

  describe('blk on shared storage', () => {
    let dir: string;
    let image: string;
    let source: Backend | undefined;
    let dest: Backend | undefined;

    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-migrate-blk-'));
      image = join(dir, 'disk.img');
      await (await open(image, 'w')).close();
      await truncate(image, 64 * MiB);
      source = await startVhostd(['--file', image, '--log-level', 'info', '--id', 'source'], join(dir, 'source.sock'));
      dest = await startVhostd(['--file', image, '--log-level', 'info', '--id', 'dest'], join(dir, 'dest.sock'));
    });

    afterAll(async () => {
      await source?.stop();
      await dest?.stop();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    it('fio writes and verifies across the switch-over; the destination sees no verify error and no I/O error', async () => {
      const res = await runMigratingGuest({
        smp: 2,
        devices: vhostUserBlkArgs(source!.socket, { id: 'disk0', numQueues: 1 }),
        destDevices: vhostUserBlkArgs(dest!.socket, { id: 'disk0', numQueues: 1 }),
        timeoutMs: GUEST_TIMEOUT,
        // A pre-copy of about 11 s: the seed's page-cache pass (the back-end's writes after QEMU sent those pages) ends inside it.
        bandwidth: 24 * MiB,
        script: migrationFioScript(WORK_S),
      });
      summary('blk', res);
      expectMigrated(res);
      expectCleanMigrationFio(res);
      expect(source!.output()).toMatch(/dirty logging on/);
      expect(source!.output()).toMatch(/image flushed at queue stop/);
      expect(dest!.output()).toMatch(/queue started|front-end connected/);
    });
  });

  describe('net on one bridge', () => {
    const HOST_IP = '10.214.0.1';
    const GUEST_IP = '10.214.0.2';
    const MAC = '52:54:00:ab:cd:42';
    let ns: Netns | undefined;
    let dir: string;
    let source: Backend | undefined;
    let dest: Backend | undefined;

    beforeAll(async () => {
      ns = new Netns('mig');
      dir = await mkdtemp(join(tmpdir(), 'vhostd-e2e-migrate-net-'));
      ns.ip('link add br0 type bridge');
      ns.ip(`addr add ${HOST_IP}/24 dev br0`);
      ns.ip('link set br0 up');
      source = await startVhostdNet(ns.name, ['--tap', 'vtsrc', '--id', 'source', '--log-level', 'info'], join(dir, 'source.sock'));
      dest = await startVhostdNet(ns.name, ['--tap', 'vtdst', '--id', 'dest', '--log-level', 'info'], join(dir, 'dest.sock'));
      for (const tap of ['vtsrc', 'vtdst']) ns.ip(`link set ${tap} master br0 up`);
    });

    afterAll(async () => {
      await source?.stop();
      await dest?.stop();
      ns?.destroy();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    it('TCP both ways, iperf3 and ping run on through the switch-over; the bytes check out', async () => {
      const bytes = 48 * MiB;
      const inBytes = 16 * MiB;
      // The host sends as fast as the guest takes it, and the guest reads slowly, so its socket queue holds
      // received pages (vhostd wrote them) across the switch-over, and the destination's copies are what nc reads.
      const toGuest = ns!.tcpPeer('send', 5002, inBytes);
      const fromGuest = ns!.tcpPeer('recv', 5001, bytes);
      const iperf = ns!.spawn('iperf3', ['-s', '-1', '-J', '-p', '5201']);
      let iperfOut = '';
      iperf.stdout!.setEncoding('utf8').on('data', (d: string) => (iperfOut += d));
      const iperfDone = new Promise<void>((resolve) => iperf.once('close', () => resolve()));
      for (const port of [5001, 5002, 5201]) await ns!.waitListening(port);
      const res = await runMigratingGuest({
        smp: 2,
        devices: vhostUserNetArgs(source!.socket, { id: 'nic0', mac: MAC, extra: 'vectors=0' }),
        destDevices: vhostUserNetArgs(dest!.socket, { id: 'nic0', mac: MAC, extra: 'vectors=0' }),
        timeoutMs: GUEST_TIMEOUT,
        script: `
ip link set eth0 up || exit 2
ip addr add ${GUEST_IP}/24 dev eth0 || exit 3
for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1 && break; done
dd if=/dev/urandom of=/tmp/blob bs=1M count=${bytes / MiB} 2>/dev/null
echo "@@SENT_MD5=$(md5sum /tmp/blob | cut -d' ' -f1)"
echo "@@MIGRATE=now"
ping -i 0.5 -c ${WORK_S * 2} -W 1 ${HOST_IP} > /tmp/ping.txt 2>&1 &
ping_pid=$!
slow() { while dd bs=65536 count=1 2>/tmp/dd.err; do grep -q '^0+0 records in' /tmp/dd.err && break; sleep 0.1; done; }
nc ${HOST_IP} 5002 | slow > /tmp/recv &
recv_pid=$!
# 1 MiB every half second: the stream to the host spans the switch-over too.
i=0
while [ $i -lt ${bytes / MiB} ]; do dd if=/tmp/blob bs=1M skip=$i count=1 2>/dev/null; i=$((i + 1)); sleep 0.5; done | nc ${HOST_IP} 5001
echo "@@NC_SEND=$?"
iperf3 -c ${HOST_IP} -p 5201 -t 10 -b 50M > /tmp/iperf.txt 2>&1; echo "@@IPERF=$?"
wait $recv_pid; echo "@@NC_RECV=$?"
echo "@@RECV_MD5=$(md5sum /tmp/recv | cut -d' ' -f1)"
wait $ping_pid
echo "@@PING=$(grep -o '[0-9]* packets received' /tmp/ping.txt | cut -d' ' -f1)"
`,
      });
      summary('net', res);
      expectMigrated(res);
      const m = res.markers;
      expect(await fromGuest, 'guest to host md5').toBe(m.SENT_MD5);
      expect(m.RECV_MD5, 'host to guest md5').toBe(await toGuest);
      expect(m.NC_SEND).toBe('0');
      expect(m.NC_RECV).toBe('0');
      expect(m.IPERF, res.dest.output.slice(-2000)).toBe('0');
      await iperfDone;
      const report = JSON.parse(iperfOut) as { end: { sum_received: { bytes: number } }; intervals: { sum: { bytes: number } }[] };
      expect(report.end.sum_received.bytes).toBeGreaterThan(0);
      expect(report.intervals.every((i) => i.sum.bytes > 0), 'an iperf3 second with no bytes').toBe(true);
      // Pings every half second for the whole run: the downtime may cost a few, no more.
      expect(Number(m.PING)).toBeGreaterThanOrEqual(WORK_S * 2 - 6);
      // The guest's data moved through both daemons, and the destination announced it.
      expect(dest!.output()).toMatch(/RARP/i);
      expect(source!.output()).toMatch(/dirty logging on/);
    });
  });
});
