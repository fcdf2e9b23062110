// vhostd net and the tap it is given: RX buffers sized from the tap's own MTU
// (an admin may have set it before vhostd started, or between connections),
// offloads the kernel accepts whatever the guest acked, and what a tap read
// into too short an iovec returns (the kernel behaviour truncation detection
// rests on). The tap lives in a private namespace.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DAEMON, startVhostdNet, type Backend } from '../e2e/daemons.js';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Netns } from '../e2e/netns.js';
import { FrontEnd } from '../driver/frontend.js';
import { GuestMemory } from '../driver/guest.js';
import { SplitQueue, type UsedElem } from '../driver/virtqueue.js';
import { bit, PF, VF } from '../driver/wire.js';
import { native, EFD_CLOEXEC, EFD_NONBLOCK } from '../../src/native/index.js';
import { netTotals } from '../e2e/daemons.js';
import { processUsage, waitFor } from './helpers.js';

const execFileP = promisify(execFile);
const TAP = 'vtnt0';
const HDR = 12; // VERSION_1 / MRG_RXBUF header, num_buffers included
const NET_F_GUEST_CSUM = 1;
const NET_F_GUEST_TSO4 = 7;
const NET_F_GUEST_TSO6 = 8;
const NET_F_GUEST_ECN = 9;
const NET_F_MRG_RXBUF = 15;
/** Mergeable buffers and GSO: vhostd must be ready for 64 KiB frames whatever the guest posted. */
const MERGE_GSO = bit(NET_F_MRG_RXBUF) | bit(NET_F_GUEST_CSUM) | bit(NET_F_GUEST_TSO4) | bit(NET_F_GUEST_TSO6);
const ADDON = fileURLToPath(new URL('../../build/Release/vhostd_native.node', import.meta.url));

const shellQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** An Ethernet frame of `len` bytes (broadcast, a local ethertype) with a recognisable payload. */
function frame(len: number, seed = 0): Uint8Array {
  const f = new Uint8Array(len);
  f.fill(0xff, 0, 6);
  f.set([0x02, 0, 0, 0, 0, 0x01], 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  for (let i = 14; i < len; i++) f[i] = (i * 7 + seed) & 0xff;
  return f;
}

// Both places a pair runs: a queue thread (the default: its setup crosses to the thread at each ring
// start) and the daemon's own thread.
describe.each([
  ['on a queue thread', []],
  ['on the main thread', ['--threads', '0']],
])('vhostd net and its tap, pair %s', { timeout: 60_000 }, (_mode, threadArgs: string[]) => {
  let ns: Netns;
  let dir: string;
  let daemon: Backend | undefined;
  let fe: FrontEnd | undefined;
  let mem: GuestMemory | undefined;
  let rx: SplitQueue | undefined;
  let tx: SplitQueue | undefined;

  beforeEach(async () => {
    ns = new Netns('nt');
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
    dir = await mkdtemp(join(tmpdir(), 'vhostd-nettap-'));
  });

  afterEach(async () => {
    closeSession();
    await daemon?.stop();
    daemon = undefined;
    ns?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  function closeSession(): void {
    fe?.close();
    rx?.destroy();
    tx?.destroy();
    mem?.destroy();
    fe = mem = rx = tx = undefined;
  }

  /** A tap that exists before vhostd starts, as an admin would leave it. */
  function existingTap(mtu: number): void {
    ns.ip(`tuntap add dev ${TAP} mode tap vnet_hdr`);
    ns.ip(`link set dev ${TAP} mtu ${mtu} up`);
  }

  async function startDaemon(args: string[] = []): Promise<void> {
    daemon = await startVhostdNet(ns.name, ['--tap', TAP, ...threadArgs, ...args], join(dir, 'net.sock'));
  }

  /** Connect and start both rings as QEMU does; returns SET_FEATURES' ack. */
  async function open(deviceFeatures: bigint, rxSize = 256): Promise<bigint> {
    fe = await FrontEnd.connect(daemon!.socket);
    mem = new GuestMemory();
    const offered = await fe.getFeatures();
    const want = bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES) | deviceFeatures;
    expect(offered & want).toBe(want);
    await fe.setProtocolFeatures((await fe.getProtocolFeatures()) & (bit(PF.MQ) | bit(PF.REPLY_ACK)));
    await fe.setOwner();
    const ack = await fe.setFeatures(want, { needReply: true });
    await fe.setMemTable(mem.table());
    rx = new SplitQueue(mem, 0, rxSize, 0);
    tx = new SplitQueue(mem, 1, 256, 1);
    for (const q of [rx, tx]) {
      await fe.setVringNum(q.index, q.size);
      await fe.setVringBase(q.index, 0);
      await fe.setVringAddr({ index: q.index, ...q.addrs() });
      await fe.setVringKick(q.index, q.kickFd);
      await fe.setVringCall(q.index, q.callFd);
      await fe.setVringEnable(q.index, true);
    }
    return ack;
  }

  function inject(f: Uint8Array): void {
    ns.sh(`python3 -c '
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("${TAP}", 0))
s.send(bytes.fromhex("${Buffer.from(f).toString('hex')}"))
'`);
  }

  const tapStat = (name: string): number => Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/${name}`));

  /** Post `count` mergeable RX buffers of `size` bytes; returns head -> guest address. */
  function postRx(count: number, size: number): Map<number, number> {
    const byHead = new Map<number, number>();
    for (let i = 0; i < count; i++) {
      const gpa = mem!.alloc(size);
      byHead.set(rx!.submit([{ gpa, len: size, write: true }]), gpa);
    }
    rx!.kick();
    return byHead;
  }

  /** Wait for the used entries of one packet: num_buffers of them, as the first buffer's header says. */
  async function receivePacket(byHead: Map<number, number>): Promise<{ numBuffers: number; used: UsedElem[]; bytes: Uint8Array }> {
    const used = await rx!.waitUsed(1);
    const first = mem!.read(byHead.get(used[0]!.id)!, HDR);
    const numBuffers = new DataView(first.buffer, first.byteOffset).getUint16(10, true);
    // The device publishes a packet's buffers together; give a late batch a moment anyway.
    for (let i = 0; i < 100 && used.length < numBuffers; i++) {
      await new Promise((r) => setTimeout(r, 10));
      used.push(...rx!.collect());
    }
    const parts = used.map((u) => mem!.read(byHead.get(u.id)!, u.len));
    const bytes = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      bytes.set(p, at);
      at += p.length;
    }
    return { numBuffers, used, bytes };
  }

  /** A jumbo frame into mergeable 1536-byte buffers arrives whole: num_buffers, lengths and bytes. */
  async function expectWholeJumbo(frameLen: number): Promise<void> {
    const byHead = postRx(16, 1536);
    const f = frame(frameLen);
    inject(f);
    const { numBuffers, used, bytes } = await receivePacket(byHead);
    const want = Math.ceil((HDR + frameLen) / 1536);
    expect({ numBuffers, entries: used.length, total: bytes.length }, 'num_buffers, used entries and total length').toEqual({
      numBuffers: want,
      entries: want,
      total: HDR + frameLen,
    });
    expect(used.slice(0, -1).every((u) => u.len === 1536), 'every buffer but the last filled').toBe(true);
    expect(Buffer.from(bytes.subarray(HDR)).equals(Buffer.from(f)), 'frame bytes').toBe(true);
  }

  it('a tap with MTU 9000 before vhostd starts (no --mtu): a 9014-byte frame arrives whole in mergeable 1536-byte buffers', async () => {
    existingTap(9000);
    await startDaemon();
    expect(await open(bit(NET_F_MRG_RXBUF))).toBe(0n);
    await expectWholeJumbo(9014); // MTU 9000 of payload + the 14-byte Ethernet header
    expect(daemon!.output()).not.toMatch(/internal error/);
  });

  it('the tap MTU raised to 9000 between connections: the next connection receives jumbo frames whole', async () => {
    existingTap(1500);
    await startDaemon();
    expect(await open(bit(NET_F_MRG_RXBUF))).toBe(0n);
    const byHead = postRx(4, 1536);
    inject(frame(1514));
    const first = await receivePacket(byHead);
    expect(first.bytes.length).toBe(HDR + 1514);
    closeSession();
    ns.ip(`link set dev ${TAP} mtu 9000`);
    // vhostd takes the next front-end once the first is torn down: retry like QEMU's reconnect.
    for (let i = 0; ; i++) {
      try {
        expect(await open(bit(NET_F_MRG_RXBUF))).toBe(0n);
        break;
      } catch (e) {
        closeSession();
        if (i === 100) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    await expectWholeJumbo(9014);
  });

  it('GUEST_CSUM|GUEST_ECN without TSO4/TSO6: SET_FEATURES acks OK and the pair moves a frame both ways', async () => {
    await startDaemon(); // vhostd creates the tap
    expect(await open(bit(NET_F_GUEST_CSUM) | bit(NET_F_GUEST_ECN))).toBe(0n);
    // Guest to tap.
    const before = tapStat('rx_packets');
    const out = frame(60, 1);
    const gpa = mem!.alloc(HDR + out.length);
    mem!.write(gpa, new Uint8Array(HDR));
    mem!.write(gpa + HDR, out);
    tx!.submit([{ gpa, len: HDR + out.length, write: false }]);
    tx!.kick();
    await tx!.waitUsed(1);
    expect(tapStat('rx_packets') - before).toBe(1);
    // Tap to guest.
    const byHead = postRx(2, 2048);
    const f = frame(100, 2);
    inject(f);
    const got = await receivePacket(byHead);
    expect(Buffer.from(got.bytes.subarray(HDR)).equals(Buffer.from(f))).toBe(true);
    expect(daemon!.output()).not.toMatch(/internal error|closing connection/);
  });

  /** CPU seconds the daemon spends over `ms` of waiting: a spinning queue shows here. */
  async function idleCpu(ms: number): Promise<number> {
    const before = processUsage(daemon!.pid).cpuSeconds;
    await new Promise((r) => setTimeout(r, ms));
    return processUsage(daemon!.pid).cpuSeconds - before;
  }

  it('MRG_RXBUF with GSO and only eight 1536-byte buffers posted: a 60-byte frame arrives at once, and nothing spins', async () => {
    await startDaemon();
    expect(await open(MERGE_GSO)).toBe(0n);
    const byHead = postRx(8, 1536);
    const f = frame(60, 3);
    inject(f);
    const got = await receivePacket(byHead);
    expect({ numBuffers: got.numBuffers, total: got.bytes.length }).toEqual({ numBuffers: 1, total: HDR + 60 });
    expect(Buffer.from(got.bytes.subarray(HDR)).equals(Buffer.from(f))).toBe(true);
    expect(await idleCpu(1000)).toBeLessThan(0.3);
  });

  it('a frame larger than the posted buffers waits without spinning, and arrives whole once the guest posts more', async () => {
    existingTap(9000);
    await startDaemon();
    expect(await open(MERGE_GSO)).toBe(0n);
    const byHead = postRx(2, 1536);
    const f = frame(9014, 4);
    inject(f);
    expect(await idleCpu(1000)).toBeLessThan(0.3);
    expect(rx!.collect()).toEqual([]); // nothing delivered cut, nothing taken
    for (const [h, g] of postRx(5, 1536)) byHead.set(h, g);
    const got = await receivePacket(byHead);
    expect({ numBuffers: got.numBuffers, total: got.bytes.length }).toEqual({ numBuffers: Math.ceil((HDR + 9014) / 1536), total: HDR + 9014 });
    expect(Buffer.from(got.bytes.subarray(HDR)).equals(Buffer.from(f))).toBe(true);
  });

  it('a frame larger than every buffer the ring can hold is dropped and counted; the next one is delivered', async () => {
    existingTap(9000);
    await startDaemon();
    expect(await open(MERGE_GSO, 4)).toBe(0n);
    const byHead = postRx(4, 1536); // the whole ring: 6 KiB
    inject(frame(9014, 5));
    const small = frame(200, 6);
    inject(small);
    const got = await receivePacket(byHead);
    expect(Buffer.from(got.bytes.subarray(HDR)).equals(Buffer.from(small))).toBe(true);
    closeSession();
    await daemon!.stop();
    const [t] = netTotals(daemon!.output());
    expect(t).toMatchObject({ rxTooBig: 1, rxDropped: 1, rxPackets: 1 });
  });

  it('stats and metrics count, live, the frames that moved each way and the one dropped', async () => {
    existingTap(9000);
    await startDaemon(['--metrics', '127.0.0.1:0', '--id', 'nic-under-test']);
    expect(await open(MERGE_GSO, 4)).toBe(0n);
    // Three frames from the guest.
    for (const len of [60, 400, 1000]) {
      const gpa = mem!.alloc(HDR + len);
      mem!.write(gpa, new Uint8Array(HDR));
      mem!.write(gpa + HDR, frame(len, len));
      tx!.submit([{ gpa, len: HDR + len, write: false }]);
    }
    tx!.kick();
    await tx!.waitUsed(3);
    // One frame too big for the whole RX ring (dropped), then one delivered.
    const byHead = postRx(4, 1536);
    inject(frame(9014, 9));
    inject(frame(200, 10));
    await receivePacket(byHead);
    const ctl = daemon!.socket.replace(/\.sock$/, '.ctl');
    const { stdout } = await execFileP(process.execPath, [DAEMON, 'stats', '--control', ctl, '--json']);
    const snap = JSON.parse(stdout) as { device: string; info: Record<string, unknown>; queues: { index: number; device: Record<string, number>; ring: Record<string, number> }[] };
    expect(snap.device).toBe('nic-under-test');
    expect(snap.info).toMatchObject({ tap: TAP, mtu: 9000 });
    expect(snap.queues[0]!.device).toMatchObject({ rxPackets: 1, rxBytes: 200, rxTooBig: 1, rxDropped: 1, rxTruncated: 0 });
    expect(snap.queues[1]!.device).toMatchObject({ txPackets: 3, txBytes: 1460, txDropped: 0 });
    expect(snap.queues[1]!.ring).toMatchObject({ chains: 3, completed: 3, inflight: 0 });
    const port = /"metrics":"127\.0\.0\.1:(\d+)"/.exec(daemon!.output())![1];
    // The daemon lives in the namespace, and so does its loopback listener.
    const text = ns.sh(`curl -sf http://127.0.0.1:${port}/metrics`);
    const value = (name: string, queue: number): number => Number(new RegExp(`^${name}\\{device="nic-under-test",queue="${queue}"\\} (\\S+)$`, 'm').exec(text)?.[1]);
    expect(value('vhostd_net_rx_too_big_total', 0)).toBe(1);
    expect(value('vhostd_net_rx_packets_total', 0)).toBe(1);
    expect(value('vhostd_net_tx_bytes_total', 1)).toBe(1460);
    expect(value('vhostd_queue_completed_total', 1)).toBe(3);
  });

  it('a frame longer than the tap MTU vhostd sized for (MTU raised under a running pair) is dropped, never delivered cut', async () => {
    existingTap(1500);
    await startDaemon();
    expect(await open(bit(NET_F_MRG_RXBUF))).toBe(0n);
    const byHead = postRx(16, 1536);
    ns.ip(`link set dev ${TAP} mtu 9000`); // behind vhostd's back
    inject(frame(9014, 7));
    const ok = frame(300, 8);
    inject(ok);
    const got = await receivePacket(byHead);
    expect(Buffer.from(got.bytes.subarray(HDR)).equals(Buffer.from(ok))).toBe(true);
    closeSession();
    await daemon!.stop();
    const [t] = netTotals(daemon!.output());
    expect(t).toMatchObject({ rxTruncated: 1, rxPackets: 1 });
  });

  it('a malformed buffer met while gathering for a frame fails the queue with nothing taken: GET_VRING_BASE is not behind any used entry', async () => {
    await startDaemon();
    expect(await open(MERGE_GSO)).toBe(0n);
    const err = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    try {
      await fe!.setVringErr(0, err);
      rx!.submit([{ gpa: mem!.alloc(512), len: 512, write: true }]);
      rx!.submit([{ gpa: 0x7000_0000, len: 1536, write: true }]); // outside guest memory
      rx!.submit([{ gpa: mem!.alloc(512), len: 512, write: true }]);
      rx!.kick();
      inject(frame(1000, 9));
      await waitFor(() => native.read(err, new BigUint64Array(1)) === 8, 'a signal on the RX err eventfd');
      expect(rx!.usedIdx()).toBe(0);
      await fe!.setVringEnable(0, false);
      expect(await fe!.getVringBase(0)).toBe(rx!.usedIdx());
    } finally {
      native.close(err);
    }
  });

  // Not vhostd's code: the kernel behaviour RX truncation detection has to rest on.
  it('kernel: read() on a tap into an iovec shorter than the frame returns the bytes copied, and the rest of the frame is lost', () => {
    ns.ip(`tuntap add dev ${TAP} mode tap vnet_hdr`);
    ns.ip(`link set dev ${TAP} mtu 9000 up`);
    const hex = (len: number): string => Buffer.from(frame(len)).toString('hex');
    const frames = [1000, 9014].map(hex);
    const scratchFrames = [3072, 1000, 9014].map(hex); // 3072: exactly the two buffers
    // One process in the namespace holds the tap open, injects each frame through a packet socket and reads it.
    const script = `
      const fs = require('node:fs');
      const { spawnSync } = require('node:child_process');
      const n = require(${JSON.stringify(ADDON)});
      const fd = fs.openSync('/dev/net/tun', fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
      const req = new Uint8Array(40);
      req.set(new TextEncoder().encode(${JSON.stringify(TAP)}));
      new DataView(req.buffer).setUint16(16, 0x0002 | 0x1000 | 0x4000, true); // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
      if (n.ioctl(fd, 0x400454ca, req) < 0) throw new Error('TUNSETIFF');
      if (n.ioctl(fd, 0x400454d8, new Int32Array([${HDR}])) < 0) throw new Error('TUNSETVNETHDRSZ');
      const junk = new Uint8Array(70000);
      const py = 'import socket,sys\\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\\ns.bind((\\'${TAP}\\',0))\\ns.send(bytes.fromhex(sys.argv[1]))';
      /** Inject one frame from the namespace side, then readv it into buffers of these sizes. */
      const injectAndRead = (hex, sizes) => {
        while (n.read(fd, junk) > 0);
        const p = spawnSync('python3', ['-c', py, hex], { encoding: 'utf8' });
        if (p.status !== 0) throw new Error(p.stderr);
        const bufs = sizes.map((len) => new Uint8Array(len));
        let r = -11;
        const until = Date.now() + 5000;
        while (r === -11 && Date.now() < until) r = n.readv(fd, bufs);
        return { r, bufs };
      };
      const out = [];
      for (const hex of ${JSON.stringify(frames)}) {
        const { r, bufs } = injectAndRead(hex, [${HDR}, 1536, 1536]);
        const copied = Buffer.concat(bufs.slice(1)).subarray(0, Math.max(0, r - ${HDR}));
        out.push({ r, again: n.read(fd, junk), prefix: copied.equals(Buffer.from(hex, 'hex').subarray(0, copied.length)) });
      }
      // Exact detection: one private byte after the buffers. A frame that fits never reaches it.
      for (const hex of ${JSON.stringify(scratchFrames)}) {
        const { r } = injectAndRead(hex, [${HDR}, 1536, 1536, 1]);
        out.push({ frame: hex.length / 2, r, truncated: r > ${HDR} + 3072 });
      }
      console.log(JSON.stringify(out));`;
    const [small, big, ...scratch] = JSON.parse(ns.sh(`${process.execPath} -e ${shellQuote(script)}`)) as object[];
    expect(small).toEqual({ r: HDR + 1000, again: -11, prefix: true }); // it fits: the frame's length
    // Too long: the iovec's capacity (12 + 3072), not 12 + 9014; the head of the frame was copied,
    // nothing of it is left to read, and nothing says it was cut.
    expect(big).toEqual({ r: HDR + 2 * 1536, again: -11, prefix: true });
    // So a reader cannot tell a frame that exactly fills the buffers from a cut one, unless it reads
    // one more private byte after them: then bytes read > capacity means cut.
    expect(scratch).toEqual([
      { frame: 3072, r: HDR + 3072, truncated: false },
      { frame: 1000, r: HDR + 1000, truncated: false },
      { frame: 9014, r: HDR + 3073, truncated: true },
    ]);
  });
});
