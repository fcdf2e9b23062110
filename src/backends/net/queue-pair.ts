// One virtio-net queue pair's data path (rx 2i, tx 2i+1) over tap queue i.
// Packets go straight between guest buffers and the tap with readv/writev;
// the virtio-net header is the tap's own vnet header. A pair runs on a queue
// thread of its own (createRunner), so pairs are serviced in parallel.
import { native, EAGAIN, EINTR, POLL_READABLE, POLL_WRITABLE, type WatchHandle } from '../../native/index.js';
import type { QueueRunner } from '../../ring/queue-thread.js';
import { Chain } from '../../ring/split-ring.js';
import type { Vring, VringHandler, VringLogger } from '../../ring/vring.js';

/** Ethernet + VLAN tag around the largest IP packet a GSO frame can carry. */
export const MAX_GSO_FRAME = 65535 + 18;
export const ETH_OVERHEAD = 18;
/** Packets moved per wake-up before yielding to the event loop. */
const BUDGET = 256;
const LOG_LIMIT = 20;

export interface NetStats {
  txPackets: number;
  txBytes: number;
  txDropped: number;
  /** Sent while the TX ring was disabled: consumed and discarded, as the spec asks. */
  txDiscarded: number;
  rxPackets: number;
  rxBytes: number;
  rxDropped: number;
  /** Times the tap had packets but the guest had posted no buffer. */
  rxNoBuffer: number;
}

export const noStats = (): NetStats => ({ txPackets: 0, txBytes: 0, txDropped: 0, txDiscarded: 0, rxPackets: 0, rxBytes: 0, rxDropped: 0, rxNoBuffer: 0 });

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
  mtu: number;
}

export class QueuePair {
  rx: Vring | undefined;
  tx: Vring | undefined;
  private watch: WatchHandle | undefined;
  private events = 0;
  /** The guest posted no RX buffer: stop reading until it kicks. */
  private rxStarved = false;
  /** The tap refused a write: wait until it is writable. */
  private txBlocked = false;
  /** Counters since the daemon started. */
  readonly stats = noStats();
  private logged = 0;

  constructor(
    private s: PairSetup,
    private readonly log: VringLogger,
  ) {}

  get index(): number {
    return this.s.pair;
  }

  /** A ring of this pair starts (with the settings of its connection). */
  start(q: Vring, setup: PairSetup): VringHandler {
    if (setup.tapFd !== this.s.tapFd) this.close();
    this.s = setup;
    if (q.index % 2 === 0) {
      this.rx = q;
      this.rxStarved = false;
      return {
        kick: () => {
          this.rxStarved = false;
          this.rxPump();
        },
      };
    }
    this.tx = q;
    this.txBlocked = false;
    return { kick: () => this.txPump(), tolerateBadChains: true, serveWhileDisabled: true };
  }

  /** A ring stopped and drained. Returns the counters once both are down. */
  stop(q: Vring): NetStats {
    if (q === this.rx) this.rx = undefined;
    if (q === this.tx) this.tx = undefined;
    this.update();
    if (!this.rx && !this.tx) {
      this.close();
      this.log.info({ pair: this.index, ...this.stats }, 'queue pair stopped');
    }
    return { ...this.stats };
  }

  /** Watch the tap for exactly what this pair can act on now. */
  private update(): void {
    const want = (this.rx?.active && !this.rxStarved ? POLL_READABLE : 0) | (this.tx?.active && this.txBlocked ? POLL_WRITABLE : 0);
    if (want === this.events) return;
    this.events = want;
    if (!this.watch) {
      if (!want) return;
      this.watch = native.watch(this.s.tapFd, want, (_status, ev) => this.onTapReady(ev));
    } else {
      native.setEvents(this.watch, want);
    }
  }

  private close(): void {
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    this.events = 0;
  }

  private onTapReady(events: number): void {
    // A bug here must fail this pair's queues, not the thread that runs them.
    try {
      if (events & POLL_WRITABLE) {
        this.txBlocked = false;
        this.txPump();
      }
      if (events & POLL_READABLE) this.rxPump();
    } catch (e) {
      this.log.error({ pair: this.index, err: e }, 'internal error while moving packets');
      for (const q of [this.rx, this.tx]) q?.fail(`internal error: ${(e as Error).message}`);
      this.close(); // both queues failed: nothing to watch the tap for
    }
  }

  private drop(dir: 'tx' | 'rx', reason: string): void {
    if (dir === 'tx') this.stats.txDropped++;
    else this.stats.rxDropped++;
    if (this.logged++ < LOG_LIMIT) {
      this.log.warn({ pair: this.index, dir, reason }, this.logged === LOG_LIMIT ? 'packet dropped (further drops only counted)' : 'packet dropped');
    }
  }

  /** Guest to tap: each chain is one vnet header + frame, written with one writev. */
  private txPump(): void {
    const q = this.tx;
    if (!q) return;
    if (this.txBlocked && !q.enabled) {
      // Disabled, nothing is written: no need to wait for the tap.
      this.txBlocked = false;
      this.update();
    }
    if (this.txBlocked) return;
    const { hdrLen, tapFd } = this.s;
    const chain = new Chain();
    const maxLen = hdrLen + MAX_GSO_FRAME;
    for (;;) {
      for (let n = 0; n < BUDGET; n++) {
        if (!q.pop(chain)) break;
        if (!q.enabled) {
          this.stats.txDiscarded++;
          q.complete(chain.head, 0);
          continue;
        }
        if (chain.error) {
          this.drop('tx', `malformed chain: ${chain.error}`);
          q.complete(chain.head, 0);
          continue;
        }
        if (chain.readableBytes < hdrLen + 14 || chain.readableBytes > maxLen || chain.writableBytes) {
          this.drop('tx', `malformed chain: ${chain.readableBytes} readable, ${chain.writableBytes} writable bytes`);
          q.complete(chain.head, 0);
          continue;
        }
        let w = native.writev(tapFd, chain.readable);
        while (w === -EINTR) w = native.writev(tapFd, chain.readable);
        if (w === -EAGAIN) {
          q.unpop(1);
          this.txBlocked = true;
          this.update();
          return;
        }
        if (w < 0) this.drop('tx', `tap write failed: errno ${-w}`);
        else {
          this.stats.txPackets++;
          this.stats.txBytes += w - hdrLen;
        }
        q.complete(chain.head, 0);
      }
      if (!q.rearm()) return;
    }
  }

  /** Tap to guest: read each packet straight into posted buffers. */
  private rxPump(): void {
    const q = this.rx;
    if (!q || !q.active) return this.update();
    const { hdrLen, mergeable, tapFd } = this.s;
    const room = hdrLen + (this.s.bigRx ? MAX_GSO_FRAME : this.s.mtu + ETH_OVERHEAD);
    const chains: Chain[] = [];
    const iov: Uint8Array[] = [];
    for (let n = 0; n < BUDGET; n++) {
      // Gather buffers until the largest possible packet fits.
      chains.length = 0;
      iov.length = 0;
      let have = 0;
      while (have < room) {
        const c = new Chain();
        if (!q.pop(c)) break;
        if (c.writableBytes < hdrLen || c.readableBytes) {
          // Only a broken driver posts these; give back everything taken (this one too, or a stop
          // would wait for it forever) and stop the queue.
          q.unpop(chains.length + 1);
          q.fail(`unusable rx buffer: ${c.writableBytes} writable, ${c.readableBytes} readable bytes`);
          return this.update();
        }
        chains.push(c);
        for (const v of c.writable) iov.push(v);
        have += c.writableBytes;
        if (!mergeable) break;
      }
      if (have < room && (mergeable || chains.length === 0)) {
        q.unpop(chains.length);
        if (q.rearm()) continue; // buffers raced in: try again
        this.stats.rxNoBuffer++;
        this.rxStarved = true;
        this.update();
        return;
      }
      let r = native.readv(tapFd, iov);
      while (r === -EINTR) r = native.readv(tapFd, iov);
      if (r === -EAGAIN) {
        q.unpop(chains.length);
        break;
      }
      if (r < 0 || r < hdrLen) {
        q.unpop(chains.length);
        this.drop('rx', `tap read failed: ${r < 0 ? `errno ${-r}` : `${r} bytes`}`);
        continue;
      }
      this.deliver(q, chains, r);
    }
    this.update();
  }

  /** Complete the chains a packet of `len` bytes filled; give back the rest. */
  private deliver(q: Vring, chains: Chain[], len: number): void {
    const heads: number[] = [];
    const lens: number[] = [];
    let left = len;
    for (const c of chains) {
      if (left === 0) break;
      const used = Math.min(left, c.writableBytes);
      heads.push(c.head);
      lens.push(used);
      left -= used;
    }
    if (this.s.hdrLen === 12) {
      // num_buffers lives in bytes 10-11 of the header, in the first chain.
      writeU16At(chains[0]!.writable, 10, heads.length);
    }
    // Chains beyond those used were popped last: give them back before completing.
    q.unpop(chains.length - heads.length);
    q.completeMany(heads, lens);
    this.stats.rxPackets++;
    this.stats.rxBytes += len - this.s.hdrLen;
  }
}

/** Little-endian u16 at byte `at` of a segmented buffer. */
function writeU16At(segs: Uint8Array[], at: number, v: number): void {
  const bytes = [v & 0xff, v >> 8];
  for (let i = 0; i < 2; i++) {
    let off = at + i;
    for (const s of segs) {
      if (off < s.byteLength) {
        s[off] = bytes[i]!;
        break;
      }
      off -= s.byteLength;
    }
  }
}

/** The queue thread's runner: the pairs it is given (one, as NetDevice assigns them). */
export function createRunner(log: VringLogger): QueueRunner {
  const pairs = new Map<number, QueuePair>();
  const pairOf = (q: Vring): QueuePair | undefined => pairs.get(q.index >> 1);
  return {
    start(q, setup) {
      const s = setup as PairSetup;
      let p = pairs.get(s.pair);
      if (!p) pairs.set(s.pair, (p = new QueuePair(s, log)));
      return p.start(q, s);
    },
    stop(q) {
      return pairOf(q)?.stop(q);
    },
  };
}
