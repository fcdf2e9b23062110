// One virtio-net queue pair's data path (rx 2i, tx 2i+1) over tap queue i.
// Packets go straight between guest buffers and the tap with readv/writev;
// the virtio-net header is the tap's own vnet header. Chains are peeked and
// taken only once their packet moved, so nothing is ever handed back.
import { BAD_REQUEST_LOG_LIMIT } from '../../limits.js';
import { native, EAGAIN, EINTR, POLL_READABLE, POLL_WRITABLE, type WatchHandle } from '../../native/index.js';
import { CounterSet, type CounterNames } from '../../ring/counters.js';
import { ChainReader, ChainWriter, DescriptorChain } from '../../ring/chain.js';
import type { QueueExecutor, QueueHandler, QueueLogger, QueueRunner, RunResult } from '../../ring/executor.js';

/** Ethernet + VLAN tag around the largest IP packet a GSO frame can carry. */
export const MAX_GSO_FRAME = 65535 + 18;
export const ETH_OVERHEAD = 18;
/** Packets moved per wake-up before yielding to the event loop. */
const RX_BUDGET = 256;
/** Enough chains for the largest frame in the smallest buffers Linux posts (hdr + 1 byte each is absurd; 64 KiB / 1 KiB is not). */
const MAX_RX_CHAINS = 256;
/** Guest segments one RX readv may carry: IOV_MAX less the spill byte. */
const RX_MAX_IOV = 1023;

/** A queue pair's counters since the daemon started, in slot order (see NET_COUNTERS). */
export const NS = {
  txPackets: 0,
  txBytes: 1,
  txDropped: 2,
  /** Sent while the TX ring was disabled: consumed and discarded, as the spec asks. */
  txDiscarded: 3,
  rxPackets: 4,
  rxBytes: 5,
  rxDropped: 6,
  /** Frames longer than the buffers they were read into (tun truncates): dropped, never delivered cut. */
  rxTruncated: 7,
  /** Frames larger than every buffer the guest could ever post at once: dropped. */
  rxTooBig: 8,
  /** Times the tap had packets but the guest had posted no buffer. */
  rxNoBuffer: 9,
} as const;

export type NetStats = Record<keyof typeof NS, number>;
export const NET_COUNTERS: CounterNames = Object.keys(NS);

/** What the negotiated features make of the data path; the device hands it over at each ring start. */
export interface PairSetup {
  pair: number;
  /** This pair's tap queue; the device owns it. */
  tapFd: number;
  /** 12 with VERSION_1 or MRG_RXBUF, else 10. */
  hdrLen: number;
  mergeable: boolean;
  /** The guest takes GSO packets (TSO/UFO offloads on the tap): RX needs room for 64 KiB. */
  bigRx: boolean;
  /** The tap's MTU, as the device last read it. */
  mtu: number;
  /** The pair's counters (NET_COUNTERS), owned by the device and shared with the thread serving the pair. */
  counters: SharedArrayBuffer;
}

export class QueuePair {
  rx: QueueExecutor | undefined;
  tx: QueueExecutor | undefined;
  private watch: WatchHandle | undefined;
  private events = 0;
  /** RX wants to hear when the tap is readable (it has buffers, the tap had nothing). */
  private rxWantsTap = false;
  /** The tap refused a write: wait until it is writable. */
  private txBlocked = false;
  /** Counters since the daemon started (NS slots), shared with the device. */
  private n: Float64Array;
  private logged = 0;

  private readonly txChain = new DescriptorChain();
  private readonly reader = new ChainReader();
  private readonly writer = new ChainWriter();
  private readonly iov: Uint8Array[] = [];
  private readonly rxChains: DescriptorChain[] = [];
  private readonly rxLens: number[] = [];
  /**
   * One byte past every RX read: tun copies only what fits and returns the
   * bytes copied, so a read that reaches into it was a frame cut short.
   */
  private readonly spill = new Uint8Array(1);
  /** A frame read before there was room for it in guest buffers; `held` bytes of it. */
  private bounce = new Uint8Array(0);
  private held = 0;

  constructor(
    private s: PairSetup,
    private readonly log: QueueLogger,
  ) {
    this.n = new Float64Array(s.counters, 0, NET_COUNTERS.length);
  }

  get stats(): NetStats {
    return new CounterSet(NET_COUNTERS, this.s.counters).toJSON() as NetStats;
  }

  get index(): number {
    return this.s.pair;
  }

  /** Largest frame (with its vnet header) the tap can hand us. */
  private get room(): number {
    return this.s.hdrLen + (this.s.bigRx ? MAX_GSO_FRAME : this.s.mtu + ETH_OVERHEAD);
  }

  /** A ring of this pair starts (with the settings of its connection). */
  start(q: QueueExecutor, setup: PairSetup): QueueHandler {
    if (setup.tapFd !== this.s.tapFd) this.close();
    // A frame held under other settings (header size, tap) cannot be delivered under these.
    if (this.held && (setup.tapFd !== this.s.tapFd || setup.hdrLen !== this.s.hdrLen || setup.mergeable !== this.s.mergeable)) this.dropHeld('settings changed');
    if (setup.counters !== this.s.counters) this.n = new Float64Array(setup.counters, 0, NET_COUNTERS.length);
    this.s = setup;
    if (q.index % 2 === 0) {
      this.rx = q;
      this.rxWantsTap = false;
      return { run: () => this.rxRun(), faults: 'fail' };
    }
    this.tx = q;
    this.txBlocked = false;
    return { run: () => this.txRun(), faults: 'deliver', serveWhileDisabled: true };
  }

  /** A ring stopped and drained. Returns the counters once both are down. */
  stop(q: QueueExecutor): NetStats {
    if (q === this.rx) this.rx = undefined;
    if (q === this.tx) this.tx = undefined;
    this.update();
    if (!this.rx && !this.tx) {
      this.close();
      q.log.info({ queue: q.index, pair: this.index, ...this.stats }, 'queue pair stopped');
    }
    return this.stats;
  }

  /** Watch the tap for exactly what this pair can act on now. */
  private update(): void {
    const want = (this.rx?.active && this.rxWantsTap ? POLL_READABLE : 0) | (this.tx?.active && this.txBlocked ? POLL_WRITABLE : 0);
    if (want === this.events) return;
    this.events = want;
    if (!this.watch) {
      if (!want) return;
      this.watch = native.watch(this.s.tapFd, want, (status, ev) => this.onTapReady(status, ev));
    } else {
      native.setEvents(this.watch, want);
    }
  }

  private close(): void {
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    this.events = 0;
  }

  private onTapReady(status: number, events: number): void {
    if (status < 0) {
      // libuv stopped watching a tap in error: nothing would ever move again, so say so.
      const reason = `tap queue ${this.index} in error (libuv status ${status})`;
      this.close();
      for (const q of [this.rx, this.tx]) q?.fail(reason);
      return;
    }
    if (events & POLL_WRITABLE) {
      this.txBlocked = false;
      this.tx?.service();
    }
    if (events & POLL_READABLE) this.rx?.service();
    this.update();
  }

  private drop(dir: 'tx' | 'rx', reason: string): void {
    if (dir === 'tx') this.n[NS.txDropped]++;
    else this.n[NS.rxDropped]++;
    if (this.logged++ < BAD_REQUEST_LOG_LIMIT) {
      ((dir === 'tx' ? this.tx : this.rx)?.log ?? this.log).warn({ queue: this.index * 2 + (dir === 'tx' ? 1 : 0), pair: this.index, dir, reason }, this.logged === BAD_REQUEST_LOG_LIMIT ? 'packet dropped (further drops only counted)' : 'packet dropped');
    }
  }

  /** Guest to tap: each chain is one vnet header + frame, written with one writev, then taken. */
  private txRun(): RunResult {
    const q = this.tx!;
    if (this.txBlocked && !q.enabled) this.txBlocked = false; // disabled, nothing is written: no need to wait for the tap
    if (this.txBlocked) return 'waiting';
    const { hdrLen, tapFd } = this.s;
    const maxLen = hdrLen + MAX_GSO_FRAME;
    const chain = this.txChain;
    const one = [chain];
    while (q.peek(0, chain)) {
      if (!q.enabled) {
        this.n[NS.txDiscarded]++;
      } else if (chain.fault) {
        this.drop('tx', `malformed chain: ${chain.fault}`);
      } else if (chain.readableBytes < hdrLen + 14 || chain.readableBytes > maxLen || chain.writableBytes) {
        this.drop('tx', `malformed chain: ${chain.readableBytes} readable, ${chain.writableBytes} writable bytes`);
      } else {
        this.iov.length = 0;
        this.reader.reset(chain).views(chain.readableBytes, this.iov);
        let w = native.writev(tapFd, this.iov);
        while (w === -EINTR) w = native.writev(tapFd, this.iov);
        this.iov.length = 0;
        if (w === -EAGAIN) {
          // Not taken: the chain stays in the ring until the tap drains.
          this.txBlocked = true;
          this.update();
          return 'waiting';
        }
        if (w < 0) this.drop('tx', `tap write failed: errno ${-w}`);
        else {
          this.n[NS.txPackets]++;
          this.n[NS.txBytes] += w - hdrLen;
        }
      }
      q.take(one, 1);
      q.complete(chain, 0);
    }
    return 'idle';
  }

  private rxChain(i: number): DescriptorChain {
    while (this.rxChains.length <= i) this.rxChains.push(new DescriptorChain());
    return this.rxChains[i]!;
  }

  /**
   * Peek available RX chains until `want` bytes are covered, none is left, or
   * (for a direct read) one more would not fit one readv. Undefined when a
   * chain is unusable (the queue failed) or the executor wants us to yield.
   */
  private gather(q: QueueExecutor, want: number, direct: boolean): { count: number; bytes: number } | undefined {
    let count = 0;
    let bytes = 0;
    let segs = 0;
    const { hdrLen, mergeable } = this.s;
    while (bytes < want && count < MAX_RX_CHAINS) {
      const c = this.rxChain(count);
      if (!q.peek(count, c)) break;
      if (c.writableBytes < hdrLen || c.readableBytes) {
        // Only a broken driver posts these: nothing of it was taken, so the base stays honest.
        q.fail(`unusable rx buffer at head ${c.head}: ${c.writableBytes} writable, ${c.readableBytes} readable bytes`);
        return undefined;
      }
      if (direct && segs + c.count > RX_MAX_IOV) break;
      segs += c.count;
      count++;
      bytes += c.writableBytes;
      if (!mergeable) break;
    }
    if (!q.serving || q.yielding) return undefined;
    return { count, bytes };
  }

  /** Tap to guest: read each frame straight into posted buffers, or through the bounce buffer when they are short. */
  private rxRun(): RunResult {
    const q = this.rx!;
    if (!q.active) return 'waiting';
    const { hdrLen, mergeable, tapFd } = this.s;
    const room = this.room;
    for (let n = 0; n < RX_BUDGET; n++) {
      if (this.held) {
        const r = this.placeHeld(q);
        if (r !== 'placed') return r;
        continue;
      }
      const g = this.gather(q, room, true);
      if (!g) return 'idle';
      if (g.count === 0 && q.available() > 0) {
        // A chain too fragmented for one readv: read aside and copy it in.
        g.bytes = 0;
      } else if (g.count === 0) {
        // No buffer at all: leave the tap alone until the guest posts one.
        this.n[NS.rxNoBuffer]++;
        this.rxWantsTap = false;
        this.update();
        return 0;
      }
      if (g.count > 0 && (g.bytes >= room || !mergeable)) {
        this.iov.length = 0;
        for (let i = 0; i < g.count; i++) {
          const c = this.rxChains[i]!;
          this.writer.reset(c).views(c.writableBytes, this.iov);
        }
        this.iov.push(this.spill);
        let r = native.readv(tapFd, this.iov);
        while (r === -EINTR) r = native.readv(tapFd, this.iov);
        this.iov.length = 0;
        if (r === -EAGAIN) return this.waitForTap();
        if (r < 0 || r < hdrLen) {
          this.drop('rx', `tap read failed: ${r < 0 ? `errno ${-r}` : `${r} bytes`}`);
          continue;
        }
        if (r > g.bytes || r > room) {
          this.n[NS.rxTruncated]++;
          this.drop('rx', `frame of ${r} bytes did not fit the ${Math.min(g.bytes, room)} bytes read`);
          continue;
        }
        this.deliver(q, g.count, r);
        continue;
      }
      // Fewer bytes posted than the largest frame: read it aside, then see whether it fits.
      if (this.bounce.length < room + 1) this.bounce = new Uint8Array(room + 1);
      const b = this.bounce.subarray(0, room + 1); // the last byte is the spill byte
      let r = native.readv(tapFd, [b]);
      while (r === -EINTR) r = native.readv(tapFd, [b]);
      if (r === -EAGAIN) return this.waitForTap();
      if (r < 0 || r < hdrLen) {
        this.drop('rx', `tap read failed: ${r < 0 ? `errno ${-r}` : `${r} bytes`}`);
        continue;
      }
      if (r > room) {
        this.n[NS.rxTruncated]++;
        this.drop('rx', `frame of ${r} bytes is larger than the ${room} bytes this MTU allows`);
        continue;
      }
      this.held = r;
    }
    this.rxWantsTap = false;
    q.schedule();
    return 'waiting';
  }

  private waitForTap(): RunResult {
    this.rxWantsTap = true;
    this.update();
    return 'waiting';
  }

  /**
   * Deliver the held frame if the posted buffers can take it. If not, wait
   * for more buffers (the driver is asked to notify past those seen), unless
   * the whole ring is posted and still too small: then the frame can never fit.
   */
  private placeHeld(q: QueueExecutor): 'placed' | RunResult {
    const g = this.gather(q, this.held, false);
    if (!g) return 'idle';
    if (g.bytes < this.held) {
      // Without MRG_RXBUF a frame goes into one buffer, so a bigger buffer behind it cannot help.
      if (g.count >= q.size || g.count >= MAX_RX_CHAINS || (!this.s.mergeable && g.count > 0)) {
        this.n[NS.rxTooBig]++;
        this.dropHeld(`frame of ${this.held} bytes is larger than the ${g.bytes} bytes the whole ring can post`);
        return 'placed';
      }
      this.rxWantsTap = false;
      this.update();
      return g.count;
    }
    let off = 0;
    for (let i = 0; off < this.held; i++) {
      const c = this.rxChains[i]!;
      const n = Math.min(this.held - off, c.writableBytes);
      this.writer.reset(c).write(this.bounce.subarray(off, off + n));
      off += n;
    }
    const len = this.held;
    this.held = 0;
    this.deliver(q, g.count, len);
    return 'placed';
  }

  private dropHeld(reason: string): void {
    this.held = 0;
    this.drop('rx', reason);
  }

  /** Take and complete the chains a frame of `len` bytes filled; the rest stay posted. */
  private deliver(q: QueueExecutor, available: number, len: number): void {
    let used = 0;
    for (let left = len; left > 0 && used < available; used++) {
      const c = this.rxChains[used]!;
      const n = Math.min(left, c.writableBytes);
      this.rxLens[used] = n;
      left -= n;
    }
    // num_buffers lives in bytes 10-11 of the header, in the first chain.
    if (this.s.hdrLen === 12) this.writer.reset(this.rxChains[0]!).pokeU16(10, used);
    q.take(this.rxChains, used);
    q.completeMany(this.rxChains, this.rxLens, used);
    this.n[NS.rxPackets]++;
    this.n[NS.rxBytes] += len - this.s.hdrLen;
  }
}

/** The runner a placement uses for net queues: the pairs it is given, on whatever thread it runs. */
export function createRunner(log: QueueLogger): QueueRunner {
  const pairs = new Map<number, QueuePair>();
  return {
    start(q, setup) {
      const s = setup as PairSetup;
      let p = pairs.get(s.pair);
      if (!p) pairs.set(s.pair, (p = new QueuePair(s, log)));
      return p.start(q, s);
    },
    stop(q) {
      return pairs.get(q.index >> 1)?.stop(q);
    },
  };
}
