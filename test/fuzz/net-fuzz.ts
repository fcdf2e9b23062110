// Net RX fuzzer: small RX rings (1-16 entries) with MRG_RXBUF and
// GUEST_TSO4/6 negotiated, so vhostd sizes RX for 64 KiB frames; buffers of
// random sizes; frames of random sizes (up to 64 KiB) injected into the tap
// from its network namespace with a raw AF_PACKET socket.
//
// The oracle is a model of mergeable RX buffers (VIRTIO 1.x 5.1.6.4): frames
// arrive in order; each goes into the fewest posted buffers, oldest first,
// that hold its 12-byte header and bytes; one larger than all the buffers a
// full ring holds is dropped. The fuzzer keeps the ring full, so which
// buffers each frame takes is known in advance. Every delivered frame must
// be byte-exact and complete, num_buffers must count its used entries and
// they must be published together, no head may be used twice or without
// being posted, and nothing is delivered cut. A small sentinel frame ends
// every input, so a dropped frame is known to be dropped, not late. The
// daemon's CPU time over an idle second must stay small (no spinning).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { startVhostdNet, type Backend } from '../e2e/daemons.js';
import { Netns } from '../e2e/netns.js';
import { FrontEnd } from '../driver/frontend.js';
import { GuestMemory } from '../driver/guest.js';
import { SplitQueue } from '../driver/virtqueue.js';
import { bit, PF, VF } from '../driver/wire.js';
import { describeFailure, sleep, Ticker, withDefaults, type Failure, type FuzzStats, type RunOptions } from './common.js';
import { Rng } from './prng.js';

const TAP = 'vtnf0';
const HDR = 12;
const NET_F_GUEST_CSUM = 1;
const NET_F_GUEST_TSO4 = 7;
const NET_F_GUEST_TSO6 = 8;
const NET_F_MRG_RXBUF = 15;
/** Largest frame the tap hands over at the MTU set below (65,500 + 14). */
const MTU = 65500;
const MAX_FRAME = MTU + 14;
const POISON = 0x5a;
const WAIT_MS = 3_000;
/** Daemon CPU over an idle second, as a fraction of a core, above which it spins. */
const IDLE_CPU_BOUND = 0.05;

// The injector: reads (u32 length, bytes) records from stdin and sends each as one frame; a length of 0 asks for an ack.
const INJECTOR = `
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("${TAP}", 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
inp = sys.stdin.buffer
print("ready", flush=True)
while True:
    h = inp.read(4)
    if len(h) < 4: break
    n = int.from_bytes(h, "little")
    if n == 0:
        sys.stdout.write("k\\n"); sys.stdout.flush(); continue
    s.send(inp.read(n))
`;

class Injector {
  private out = '';
  private acks = 0;
  constructor(readonly proc: ChildProcess) {
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.out += d;
      this.acks += (d.match(/k\n/g) ?? []).length;
    });
  }
  async ready(): Promise<void> {
    for (let i = 0; i < 200 && !this.out.includes('ready'); i++) await sleep(25);
    if (!this.out.includes('ready')) throw new Error('frame injector did not start');
  }
  /** Send frames in order and wait until the injector has handed them to the kernel. */
  async send(frames: Uint8Array[]): Promise<void> {
    const parts: Uint8Array[] = [];
    for (const f of frames) {
      const h = new Uint8Array(4);
      new DataView(h.buffer).setUint32(0, f.length, true);
      parts.push(h, f);
    }
    parts.push(new Uint8Array(4));
    const want = this.acks + 1;
    this.proc.stdin!.write(Buffer.concat(parts));
    const deadline = Date.now() + WAIT_MS;
    while (this.acks < want && Date.now() < deadline) await sleep(1);
    if (this.acks < want) throw new Error('frame injector did not acknowledge');
  }
}

interface Posted {
  head: number;
  gpa: number;
  len: number;
}

function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

export async function run(opts: RunOptions): Promise<FuzzStats> {
  const { seed, start, batch, maxFailures, log } = withDefaults(opts);
  const failures: Failure[] = [];
  const extra: Record<string, number> = { delivered: 0, dropped: 0, buffersUsed: 0, idleChecks: 0, maxIdleCpuPct: 0, sessions: 0 };
  const t0 = Date.now();
  const ticker = new Ticker('net', t0, opts.onProgress);
  let inputs = 0;
  const fail = (index: number, kind: string, message: string): void => {
    const f = { seed, index, kind, message };
    failures.push(f);
    log(describeFailure(f, 'net'));
  };

  const ns = new Netns('nf');
  const dir = mkdtempSync(join(tmpdir(), 'vhostd-netfuzz-'));
  let daemon: Backend | undefined;
  let fe: FrontEnd | undefined;
  let mem: GuestMemory | undefined;
  let rx: SplitQueue | undefined;
  let inj: Injector | undefined;
  const idleCheck = async (index: number): Promise<void> => {
    const a = cpuSeconds(daemon!.pid);
    await sleep(1_000);
    const used = cpuSeconds(daemon!.pid) - a;
    extra.idleChecks!++;
    extra.maxIdleCpuPct = Math.max(extra.maxIdleCpuPct!, Math.round(used * 100));
    if (used > IDLE_CPU_BOUND) fail(index, 'spinning', `the daemon used ${(used * 1000).toFixed(0)} ms of CPU over an idle second (bound ${IDLE_CPU_BOUND * 1000} ms)`);
  };
  try {
    ns.sh('sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1');
    daemon = await startVhostdNet(ns.name, ['--tap', TAP, '--log-level', 'warn'], join(dir, 'net.sock'));
    ns.ip(`link set ${TAP} mtu ${MTU} up`);
    inj = new Injector(spawn('ip', ['netns', 'exec', ns.name, 'python3', '-c', INJECTOR], { stdio: ['pipe', 'pipe', 'inherit'] }));
    inj.proc.stdin!.on('error', () => {});
    await inj.ready();

    /** A session per batch: ring size and event index from the batch number. */
    const open = async (index: number): Promise<void> => {
      const srng = new Rng(seed ^ 0x6e37, Math.floor(index / batch));
      const size = srng.pick([1, 2, 4, 8, 16]);
      fe = await FrontEnd.connect(daemon!.socket);
      mem = new GuestMemory();
      const offered = await fe.getFeatures();
      await fe.setProtocolFeatures((await fe.getProtocolFeatures()) & (bit(PF.MQ) | bit(PF.REPLY_ACK)));
      await fe.setOwner();
      let f = bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES) | bit(NET_F_MRG_RXBUF) | bit(NET_F_GUEST_CSUM) | bit(NET_F_GUEST_TSO4) | bit(NET_F_GUEST_TSO6);
      if (srng.chance(0.5)) f |= bit(VF.EVENT_IDX);
      f &= offered;
      await fe.setFeatures(f);
      await fe.setMemTable(mem.table());
      rx = new SplitQueue(mem, 0, size, 0);
      rx.eventIdx = (f & bit(VF.EVENT_IDX)) !== 0n;
      await fe.setVringNum(0, size);
      await fe.setVringBase(0, 0);
      await fe.setVringAddr({ index: 0, ...rx.addrs() });
      await fe.setVringKick(0, rx.kickFd);
      await fe.setVringCall(0, rx.callFd);
      await fe.setVringEnable(0, true);
      extra.sessions!++;
    };
    const close = async (): Promise<void> => {
      try {
        if (fe) await fe.getVringBase(0);
      } catch {
        /* judged by the next open */
      }
      fe?.close();
      rx?.destroy();
      mem?.destroy();
      fe = undefined;
    };

    let posted: Posted[] = [];
    let seq = 0;
    const bufSize = (r: Rng): number => r.weighted([[3, r.range(64, 256)], [3, r.range(256, 2048)], [2, r.range(2048, 16384)], [1, r.range(16384, 65565)]] as const);
    const post = (r: Rng): void => {
      while (posted.length < rx!.size) {
        const len = bufSize(r);
        const gpa = mem!.alloc(len, 8);
        mem!.fill(gpa, len, POISON);
        const head = rx!.submit([{ gpa, len, write: true }]);
        posted.push({ head, gpa, len });
      }
      rx!.kick();
    };

    for (let index = start; index < start + opts.count; index++) {
      if (failures.length >= maxFailures || opts.signal?.aborted) break;
      if (index === start || index % batch === 0) {
        if (fe) {
          await close();
          await idleCheck(index);
        }
        await open(index);
        posted = [];
      }
      const r = new Rng(seed, index);
      post(r);
      // Frames, then the sentinel.
      const k = r.weighted([[4, 1], [3, r.range(2, 4)], [1, r.range(5, 12)]] as const);
      const frames: Uint8Array[] = [];
      for (let i = 0; i <= k; i++) {
        const len = i === k ? 22 : r.weighted([[4, r.range(22, 1514)], [2, r.range(1515, 9000)], [2, r.range(9000, MAX_FRAME)], [1, MAX_FRAME]] as const);
        const fr = r.bytes(len);
        fr.set([0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5], 0);
        new DataView(fr.buffer).setUint32(14, seq++ >>> 0, true);
        frames.push(fr);
      }
      // The model: which buffers each frame takes (the ring is kept full).
      const fifo = posted.slice();
      const expect: { frame: Uint8Array; bufs: Posted[] }[] = [];
      const refill = new Rng(seed ^ 0x7e11, index);
      const model: Posted[] = fifo.map((p) => ({ ...p }));
      /** Buffers the fuzzer will post as earlier ones come back, in order; head and address filled in when posted. */
      const refills: Posted[] = [];
      let dropped = 0;
      for (const fr of frames) {
        let need = HDR + fr.length;
        let n = 0;
        for (; n < model.length && need > 0; n++) need -= model[n]!.len;
        if (need > 0) {
          dropped++;
          continue;
        }
        expect.push({ frame: fr, bufs: model.splice(0, n) });
        // Refilled buffers get sizes from `refill`, in the order the fuzzer posts them below.
        for (let j = 0; j < n; j++) {
          const b = { head: -1, gpa: -1, len: bufSize(refill) };
          model.push(b);
          refills.push(b);
        }
      }
      let nextRefill = 0;
      try {
        await inj.send(frames);
      } catch (e) {
        fail(index, 'fuzzer error', (e as Error).message);
        break;
      }
      // Collect packets, refilling as buffers come back.
      const errors: string[] = [];
      let got = 0;
      const deadline = Date.now() + WAIT_MS;
      let pend: { id: number; len: number }[] = [];
      while (got < expect.length && Date.now() < deadline && errors.length === 0) {
        let fresh: { id: number; len: number }[];
        try {
          fresh = rx!.collect();
        } catch (e) {
          errors.push((e as Error).message);
          break;
        }
        if (!fresh.length && !pend.length) {
          if (rx!.eventIdx) rx!.setUsedEvent(rx!.lastUsed);
          await sleep(1);
          continue;
        }
        pend.push(...fresh);
        while (pend.length && got < expect.length) {
          const first = pend[0]!;
          const p0 = posted.find((p) => p.head === first.id);
          if (!p0) {
            errors.push(`used head ${first.id} was not posted (or was used already)`);
            break;
          }
          const nb = new DataView(mem!.read(p0.gpa, HDR).buffer).getUint16(10, true);
          if (nb < 1 || nb > rx!.size) {
            errors.push(`num_buffers ${nb} with a ring of ${rx!.size}`);
            break;
          }
          if (pend.length < nb) {
            // All of a packet's used entries are published with one used->idx update.
            errors.push(`packet ${got}: num_buffers ${nb} but only ${pend.length} of its used entries were published together`);
            break;
          }
          const entries = pend.splice(0, nb);
          const e = expect[got]!;
          const want = HDR + e.frame.length;
          if (entries.length !== e.bufs.length || entries.some((u, j) => u.id !== e.bufs[j]!.head)) {
            errors.push(`frame ${got} of ${e.frame.length} bytes took heads ${entries.map((u) => u.id).join(',')} (num_buffers ${nb}); the oldest posted buffers that hold it are ${e.bufs.map((b) => `${b.head}(${b.len})`).join(',')}`);
            break;
          }
          const total = entries.reduce((a, u) => a + u.len, 0);
          const bad = entries.findIndex((u, j) => u.len > e.bufs[j]!.len || (j < entries.length - 1 && u.len !== e.bufs[j]!.len));
          if (total !== want || bad >= 0) {
            errors.push(`frame ${got}: used lengths ${entries.map((u) => u.len).join('+')} for ${want} bytes in buffers of ${e.bufs.map((b) => b.len).join('+')}`);
            break;
          }
          const bytes = Buffer.concat(entries.map((u, j) => mem!.read(e.bufs[j]!.gpa, u.len)));
          if (!bytes.subarray(HDR).equals(Buffer.from(e.frame))) {
            let at = 0;
            while (bytes[HDR + at] === e.frame[at]) at++;
            errors.push(`frame ${got} (${e.frame.length} bytes over ${nb} buffers) differs from what was injected at byte ${at}`);
            break;
          }
          got++;
          extra.buffersUsed! += nb;
          // Recycle: free and post new buffers in place of those used.
          for (const b of e.bufs) {
            posted.splice(posted.findIndex((p) => p.head === b.head), 1);
            mem!.free(b.gpa);
          }
          while (posted.length < rx!.size && nextRefill < refills.length) {
            const b = refills[nextRefill++]!;
            b.gpa = mem!.alloc(b.len, 8);
            mem!.fill(b.gpa, b.len, POISON);
            b.head = rx!.submit([{ gpa: b.gpa, len: b.len, write: true }]);
            posted.push(b);
          }
          rx!.kick();
        }
      }
      // Anything used beyond the expected packets (the sentinel is last, so all were judged).
      await sleep(0);
      try {
        const more = [...pend, ...rx!.collect()];
        if (!errors.length && more.length) errors.push(`${more.length} used entries beyond the ${expect.length} frames the model delivers (heads ${more.map((u) => u.id).join(',')})`);
      } catch (e) {
        if (!errors.length) errors.push((e as Error).message);
      }
      if (!errors.length && got < expect.length) errors.push(`${got} of ${expect.length} frames delivered within ${WAIT_MS} ms (${dropped} dropped as too big for the ring)`);
      inputs++;
      ticker.messages += frames.length;
      extra.delivered! += got;
      extra.dropped! += dropped;
      if (errors.length) {
        fail(index, 'bad delivery', `ring of ${rx!.size}, buffers ${fifo.map((p) => p.len).join(',')}, frames ${frames.map((f) => f.length).join(',')}: ${errors.join('; ')}\n--- daemon output (tail) ---\n${daemon.output().split('\n').slice(-6).join('\n')}`);
        // Start over with a fresh session.
        await close();
        await open(index + 1);
        posted = [];
      }
      ticker.tick(inputs, failures.length);
    }
    if (fe) {
      await close();
      await idleCheck(start + opts.count - 1);
    }
    const out = daemon.output();
    for (const l of out.split('\n')) {
      if (l.includes('internal error') || (l.startsWith('{') && /"level":(50|60)/.test(l) && !l.includes('virtqueue failed'))) {
        fail(-1, 'daemon logged an error', l.slice(0, 2000));
        break;
      }
    }
  } catch (e) {
    fail(-1, 'fuzzer error', (e as Error).stack ?? String(e));
  } finally {
    fe?.close();
    inj?.proc.kill('SIGKILL');
    await daemon?.stop();
    ns.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
  const elapsedMs = Date.now() - t0;
  ticker.tick(inputs, failures.length, true);
  return { target: 'net', seed, inputs, messages: ticker.messages, closes: 0, replies: inputs, failures, elapsedMs, rate: (inputs * 1000) / elapsedMs, extra };
}
