// vhostd net driven by the TypeScript front-end, with its tap in a private
// network namespace: malformed TX chains are dropped and counted while the
// queue keeps running, RX fills posted buffers, and with no buffers posted
// vhostd waits for a kick instead of reading (and dropping) from the tap.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { netTotals, startVhostdNet, type Backend } from '../e2e/daemons.js';
import { fdCount, fdTargets, memfdMaps } from './inflight-helpers.js';
import { Rng } from '../fuzz/prng.js';
import { native, EFD_CLOEXEC, EFD_NONBLOCK } from '../../src/native/index.js';
import { Netns } from '../e2e/netns.js';
import { FrontEnd } from '../driver/frontend.js';
import { waitFor } from './helpers.js';
import { GuestMemory, MiB } from '../driver/guest.js';
import { SplitQueue } from '../driver/virtqueue.js';
import { bit, PF, Req, VERSION, VF, vringState } from '../driver/wire.js';

const TAP = 'vtnp0';
const HDR = 12; // VERSION_1 header, num_buffers included
const FRAME = Uint8Array.from([
  ...[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], ...[0x02, 0, 0, 0, 0, 0x01], 0x88, 0xb5,
  ...Array.from({ length: 46 }, (_, i) => i),
]);

// Both ways to run a pair: on a queue thread (the default), and on the daemon's own thread.
describe.each([
  ['on a queue thread', []],
  ['on the main thread', ['--threads', '0']],
])('vhostd net through the protocol driver, pair %s', (_mode, threadArgs: string[]) => {
  let ns: Netns;
  let dir: string;
  let daemon: Backend;
  let fe: FrontEnd;
  let mem: GuestMemory;
  let rx: SplitQueue;
  let tx: SplitQueue;

  /** Connect and start both rings of the pair, as QEMU does. */
  async function open(): Promise<void> {
    fe = await FrontEnd.connect(daemon.socket);
    mem = new GuestMemory();
    const offered = await fe.getFeatures();
    await fe.setProtocolFeatures((await fe.getProtocolFeatures()) & (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.RARP)));
    await fe.setOwner();
    await fe.setFeatures(offered & (bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES)));
    await fe.setMemTable(mem.table());
    rx = new SplitQueue(mem, 0, 256, 0);
    tx = new SplitQueue(mem, 1, 256, 1);
    for (const q of [rx, tx]) {
      await fe.setVringNum(q.index, q.size);
      await fe.setVringBase(q.index, 0);
      await fe.setVringAddr({ index: q.index, ...q.addrs() });
      await fe.setVringKick(q.index, q.kickFd);
      await fe.setVringCall(q.index, q.callFd);
      await fe.setVringEnable(q.index, true);
    }
  }

  /** Connect again after a hang-up. vhostd refuses a second front-end until the first is torn down: retry like QEMU's reconnect. */
  async function reopen(): Promise<void> {
    for (let i = 0; ; i++) {
      try {
        return await open();
      } catch (e) {
        fe.close();
        mem.destroy();
        for (const q of [rx, tx]) q?.destroy();
        if (i === 100) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  beforeEach(async () => {
    ns = new Netns('np');
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
    dir = await mkdtemp(join(tmpdir(), 'vhostd-netproto-'));
    daemon = await startVhostdNet(ns.name, ['--tap', TAP, ...threadArgs], join(dir, 'net.sock'));
    await open();
  });

  afterEach(async () => {
    fe?.close();
    await daemon?.stop();
    rx?.destroy();
    tx?.destroy();
    mem?.destroy();
    ns?.destroy();
    await rm(dir, { recursive: true, force: true });
  });

  const tapStat = (name: string): number => Number(ns.sh(`cat /sys/class/net/${TAP}/statistics/${name}`));

  function sendFrame(region?: number): number {
    const gpa = mem.alloc(HDR + FRAME.length, 16, region);
    mem.write(gpa, new Uint8Array(HDR));
    mem.write(gpa + HDR, FRAME);
    return tx.submit([{ gpa, len: HDR + FRAME.length, write: false }]);
  }

  function inject(count: number): void {
    ns.sh(`python3 -c '
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("${TAP}", 0))
for i in range(${count}): s.send(bytes.fromhex("${Buffer.from(FRAME).toString('hex')}"))
'`);
  }

  it('SEND_RARP announces the MAC from the tap', async () => {
    // A packet socket on the tap sees what vhostd writes into it.
    const sniff = ns.spawn('python3', ['-c', `
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x8035))
s.bind(("${TAP}", 0))
print("ready", flush=True)
print(s.recv(2048).hex(), flush=True)
`]);
    let out = '';
    sniff.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    const done = new Promise((r) => sniff.once('close', r));
    for (let i = 0; i < 100 && !out.includes('ready'); i++) await new Promise((r) => setTimeout(r, 50));
    const mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const payload = new Uint8Array(8);
    payload.set(mac);
    expect(await fe.command(19 /* SEND_RARP */, payload, [], { needReply: true })).toBe(0n);
    await done;
    const frame = Buffer.from(out.split('\n')[1]!.trim(), 'hex');
    const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
    expect(hex(frame.subarray(0, 6))).toBe('ffffffffffff');
    expect(hex(frame.subarray(6, 12))).toBe(hex(Uint8Array.from(mac)));
    expect(frame.readUInt16BE(12)).toBe(0x8035);
    expect(frame.readUInt16BE(20)).toBe(3); // reverse request
    expect(hex(frame.subarray(22, 28))).toBe(hex(Uint8Array.from(mac)));
  });

  it('drops malformed TX chains, counts them, and keeps the queue running', async () => {
    const before = tapStat('rx_packets');
    sendFrame();
    const short = mem.alloc(8);
    tx.submit([{ gpa: short, len: 8, write: false }]); // shorter than the vnet header
    const big = mem.alloc(70_000);
    tx.submit([{ gpa: big, len: 70_000, write: false }]); // larger than any frame
    tx.submit([{ gpa: 0x7000_0000, len: HDR + FRAME.length, write: false }]); // outside guest memory
    const hdr = mem.alloc(HDR);
    tx.submit([{ gpa: hdr, len: HDR, write: false }, { gpa: mem.alloc(64), len: 64, write: true }]); // device-writable in TX
    sendFrame();
    tx.kick();
    const used = await tx.waitUsed(6);
    expect(used).toHaveLength(6);
    expect(tapStat('rx_packets') - before).toBe(2);
    // The queue still works after the bad ones.
    sendFrame();
    tx.kick();
    await tx.waitUsed(1);
    expect(tapStat('rx_packets') - before).toBe(3);
    const out = tapStat('rx_packets');
    fe.close();
    await daemon.stop();
    const [t] = netTotals(daemon.output());
    expect(t!.txPackets).toBe(3);
    expect(t!.txDropped).toBe(4);
    expect(daemon.output()).toMatch(/"dir":"tx".*"msg":"packet dropped"/);
    expect(out - before).toBe(3);
  });

  it('reads tap packets straight into posted RX buffers', async () => {
    const byHead = new Map<number, number>();
    for (let i = 0; i < 4; i++) {
      const gpa = mem.alloc(2048);
      byHead.set(rx.submit([{ gpa, len: 2048, write: true }]), gpa);
    }
    rx.kick();
    inject(3);
    const used = await rx.waitUsed(3);
    expect(used).toHaveLength(3);
    // Each completed chain holds the header (num_buffers = 1), then the frame.
    for (const u of used) {
      expect(u.len).toBe(HDR + FRAME.length);
      const data = mem.read(byHead.get(u.id)!, HDR + FRAME.length);
      expect(new DataView(data.buffer, data.byteOffset).getUint16(10, true)).toBe(1);
      expect(Buffer.from(data.subarray(HDR)).equals(Buffer.from(FRAME))).toBe(true);
    }
  });

  it('with no RX buffers waits for a kick, then delivers what the tap held', async () => {
    inject(2);
    await new Promise((r) => setTimeout(r, 300));
    expect(tapStat('tx_dropped')).toBe(0); // queued in the tap, not read and lost
    const b = [mem.alloc(2048), mem.alloc(2048)];
    for (const g of b) rx.submit([{ gpa: g, len: 2048, write: true }]);
    rx.kick();
    const used = await rx.waitUsed(2);
    expect(used.map((u) => u.len)).toEqual([HDR + FRAME.length, HDR + FRAME.length]);
  });

  // The pair runs on a queue thread: these check the daemon's side keeps it in step.

  it('a new memory table under running rings: both directions keep working, also in the new region', async () => {
    const before = tapStat('rx_packets');
    sendFrame();
    tx.kick();
    await tx.waitUsed(1);
    const r = mem.addRegion({ gpa: 64 * MiB, size: 4 * MiB, mmapOffset: MiB });
    await fe.setMemTable(mem.table());
    sendFrame(r.index);
    tx.kick();
    await tx.waitUsed(1);
    expect(tapStat('rx_packets') - before).toBe(2);
    const gpa = mem.alloc(2048, 16, r.index);
    const head = rx.submit([{ gpa, len: 2048, write: true }]);
    rx.kick();
    inject(1);
    const [u] = await rx.waitUsed(1);
    expect(u!.id).toBe(head);
    expect(Buffer.from(mem.read(gpa + HDR, FRAME.length)).equals(Buffer.from(FRAME))).toBe(true);
  });

  it('GET_VRING_BASE stops the pair; restarted from the bases it returned, it carries traffic again', async () => {
    const before = tapStat('rx_packets');
    sendFrame();
    tx.kick();
    await tx.waitUsed(1);
    for (const q of [rx, tx]) await fe.setVringEnable(q.index, false);
    const bases = [await fe.getVringBase(0), await fe.getVringBase(1)];
    expect(bases).toEqual([0, 1]);
    // Stopped: a frame published now stays in the ring.
    sendFrame();
    tx.kick();
    await new Promise((r) => setTimeout(r, 200));
    expect(tapStat('rx_packets') - before).toBe(1);
    // Enabled before the kick starts them: a TX ring started disabled would discard that frame.
    for (const q of [rx, tx]) {
      await fe.setVringNum(q.index, q.size);
      await fe.setVringBase(q.index, bases[q.index]!);
      await fe.setVringAddr({ index: q.index, ...q.addrs() });
      await fe.setVringEnable(q.index, true);
      await fe.setVringCall(q.index, q.callFd);
      await fe.setVringKick(q.index, q.kickFd);
    }
    await tx.waitUsed(1);
    expect(tapStat('rx_packets') - before).toBe(2);
  });

  it('started and disabled, the pair consumes and discards TX and supplies no RX; enabled again it carries both ways', async () => {
    const before = tapStat('rx_packets');
    for (const q of [rx, tx]) await fe.setVringEnable(q.index, false);
    const rxBuf = mem.alloc(2048);
    const rxHead = rx.submit([{ gpa: rxBuf, len: 2048, write: true }]);
    rx.kick();
    inject(1);
    for (let i = 0; i < 3; i++) sendFrame();
    tx.kick();
    const discarded = await tx.waitUsed(3);
    expect(discarded.map((u) => u.len)).toEqual([0, 0, 0]);
    await new Promise((r) => setTimeout(r, 300));
    expect(tapStat('rx_packets') - before).toBe(0);
    expect(rx.collect()).toEqual([]); // the injected packet waits in the tap
    for (const q of [rx, tx]) await fe.setVringEnable(q.index, true);
    const [u] = await rx.waitUsed(1);
    expect(u).toEqual({ id: rxHead, len: HDR + FRAME.length });
    expect(Buffer.from(mem.read(rxBuf + HDR, FRAME.length)).equals(Buffer.from(FRAME))).toBe(true);
    sendFrame();
    tx.kick();
    await tx.waitUsed(1);
    expect(tapStat('rx_packets') - before).toBe(1);
    fe.close();
    await daemon.stop();
    const [t] = netTotals(daemon.output());
    expect(t).toMatchObject({ txPackets: 1, txDiscarded: 3, txDropped: 0, rxPackets: 1 });
  });

  it('connections in a row leave no guest memory mapped and no fd open', async () => {
    const pid = daemon.pid;
    const cycle = async (): Promise<void> => {
      sendFrame();
      tx.kick();
      await tx.waitUsed(1);
      fe.close();
      rx.destroy();
      tx.destroy();
      mem.destroy();
    };
    /** Back to `want` fds and no guest mapping, within a second. */
    const settled = async (want?: number): Promise<number> => {
      let fds = -1;
      let maps: string[] = [];
      for (let i = 0; i < 200; i++) {
        fds = fdCount(pid);
        maps = memfdMaps(pid).filter((l) => l.includes('vhostd-test-guest-'));
        if (!maps.length && (want === undefined || fds === want)) return fds;
        await new Promise((r) => setTimeout(r, 5));
      }
      throw new Error(`vhostd holds ${fds} fds (want ${want}) and ${maps.length} guest mappings:\n${fdTargets(pid).join('\n')}\n${maps.join('\n')}`);
    };
    // The first connection starts the pair's thread (and its own fds): measure after it.
    await cycle();
    await new Promise((r) => setTimeout(r, 200));
    const base = await settled();
    for (let i = 0; i < 30; i++) {
      await open();
      await cycle();
      await settled(base);
    }
  });

  it.each([0x7e7, 0xbeef, 2026])('300 random lifecycle steps (stops, restarts, memory tables, call fds, enables, reconnects) keep the pair sound (seed %i)', async (seed) => {
    const rng = new Rng(seed, 0);
    const pid = daemon.pid;
    let running = true;
    let sent = 0;
    const expectSent = async (): Promise<void> => {
      // Everything sent so far reached the tap (a stopped pair sends when restarted).
      for (let i = 0; i < 400 && tapStat('rx_packets') < baseTx + sent; i++) await new Promise((r) => setTimeout(r, 5));
      expect(tapStat('rx_packets') - baseTx).toBe(sent);
    };
    let discarded = 0;
    const restart = async (): Promise<void> => {
      // Enabled before the kick starts them, so frames sent while stopped go out (a TX ring
      // started disabled would discard them, depending on when the enable arrives).
      for (const q of [rx, tx]) {
        await fe.setVringNum(q.index, q.size);
        await fe.setVringBase(q.index, q.base);
        await fe.setVringAddr({ index: q.index, ...q.addrs() });
        await fe.setVringEnable(q.index, true);
        await fe.setVringCall(q.index, q.callFd);
        await fe.setVringKick(q.index, q.kickFd);
      }
      running = true;
    };
    const baseTx = tapStat('rx_packets');
    for (let step = 0; step < 300; step++) {
      const op = rng.weighted([[4, 'tx'], [2, 'stop'], [2, 'memtable'], [1, 'call'], [1, 'toggle'], [1, 'reconnect']] as const);
      if (op === 'tx') {
        // While stopped the frame waits in the ring until the restart.
        sendFrame();
        sent++;
        tx.kick();
        if (running) await tx.waitUsed(1, 5_000);
      } else if (op === 'stop' && running) {
        for (const q of [rx, tx]) await fe.setVringEnable(q.index, false);
        for (const q of [rx, tx]) q.base = await fe.getVringBase(q.index);
        running = false;
      } else if (op === 'stop') {
        await restart();
        if (tx.outstanding) await tx.waitUsed(tx.outstanding, 5_000);
      } else if (op === 'memtable') {
        // Same table, or one more region: the daemon quiesces the pair's thread around it.
        if (rng.chance(0.3) && mem.regions.length < 6) mem.addRegion({ gpa: (64 + 8 * mem.regions.length) * MiB, size: 2 * MiB, mmapOffset: 0 });
        await fe.setMemTable(mem.table());
      } else if (op === 'call') {
        const old = tx.swapCallFd();
        await fe.setVringCall(1, tx.callFd);
        native.close(old);
      } else if (op === 'toggle' && running) {
        await fe.setVringEnable(1, false);
        if (rng.chance(0.5)) {
          // Disabled, the ring takes the frame and discards it.
          sendFrame();
          discarded++;
          tx.kick();
          await tx.waitUsed(1, 5_000);
        }
        await fe.setVringEnable(1, true);
      } else if (op === 'reconnect') {
        // The next front-end starts from scratch.
        if (!running) {
          await restart();
          if (tx.outstanding) await tx.waitUsed(tx.outstanding, 5_000);
        }
        await expectSent();
        fe.close();
        for (const q of [rx, tx]) q.destroy();
        mem.destroy();
        await reopen();
        running = true;
      }
      if (step % 50 === 49 && running) await expectSent();
    }
    if (!running) await restart();
    if (tx.outstanding) await tx.waitUsed(tx.outstanding, 5_000);
    await expectSent();
    expect(fdCount(pid)).toBeGreaterThan(0);
    fe.close();
    await daemon.stop();
    const [t] = netTotals(daemon.output());
    expect(t).toMatchObject({ txPackets: sent, txDiscarded: discarded, txDropped: 0 });
    expect(daemon.output()).not.toMatch(/internal error|queue thread died/);
  });

  it('an RX buffer the device cannot write fails the queue, and GET_VRING_BASE still answers', async () => {
    const err = native.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    try {
      await fe.setVringErr(0, err);
      const ok = mem.alloc(2048);
      rx.submit([{ gpa: ok, len: 2048, write: true }]);
      rx.submit([{ gpa: mem.alloc(64), len: 64, write: false }, { gpa: mem.alloc(2048), len: 2048, write: true }]);
      rx.kick();
      inject(1);
      const counter = new BigUint64Array(1);
      for (let i = 0; i < 400 && native.read(err, counter) !== 8; i++) await new Promise((r) => setTimeout(r, 5));
      expect(counter[0]).toBe(1n);
      // The packet went into the good buffer; the bad chain was handed back, and the stop does not wait for it.
      expect(Buffer.from(mem.read(ok + HDR, FRAME.length)).equals(Buffer.from(FRAME))).toBe(true);
      expect(await fe.getVringBase(0, 2_000)).toBe(1);
      expect(await fe.getVringBase(1, 2_000)).toBe(0);
      // A queue thread's log lines reach the daemon's stdout through the main thread, so they may trail the eventfd.
      await waitFor(() => /unusable rx buffer/.test(daemon.output()), 'the unusable rx buffer log line', 5_000);
    } finally {
      native.close(err);
    }
  });

  it('a front-end that hangs up while its rings are being stopped leaves nothing behind', async () => {
    const pid = daemon.pid;
    const cycle = async (): Promise<void> => {
      for (let i = 0; i < 8; i++) sendFrame();
      tx.kick();
      // The stop order, then gone before any answer.
      fe.send(Req.SET_VRING_ENABLE, VERSION, vringState(1, 0));
      fe.send(Req.GET_VRING_BASE, VERSION, vringState(1, 0));
      fe.send(Req.GET_VRING_BASE, VERSION, vringState(0, 0));
      fe.close();
      rx.destroy();
      tx.destroy();
      mem.destroy();
    };
    await cycle();
    await reopen();
    await cycle();
    await new Promise((r) => setTimeout(r, 300));
    const fds = fdCount(pid);
    for (let i = 0; i < 30; i++) {
      await reopen();
      await cycle();
    }
    for (let i = 0; i < 200 && (fdCount(pid) !== fds || memfdMaps(pid).some((l) => l.includes('vhostd-test-guest-'))); i++) {
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(fdCount(pid)).toBe(fds);
    expect(memfdMaps(pid).filter((l) => l.includes('vhostd-test-guest-'))).toEqual([]);
    await reopen();
    sendFrame();
    tx.kick();
    await tx.waitUsed(1);
    expect(daemon.output()).not.toMatch(/internal error|queue thread died/);
  });
});
