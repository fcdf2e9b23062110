// virtio-net over a tap: queue pair i (rx 2i, tx 2i+1) moves packets through
// tap queue i. Packets go straight between guest buffers and the tap with
// readv/writev; the virtio-net header is the tap's own vnet header.
import type { Device } from '../../device.js';
import {
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../../device.js';
import { native, EAGAIN, EINTR, POLL_READABLE, POLL_WRITABLE, type WatchHandle } from '../../native/index.js';
import { Chain } from '../../ring/split-ring.js';
import type { Vring, VringHandler } from '../../ring/vring.js';
import { Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO } from './tap.js';

export const NET_F_CSUM = 0;
export const NET_F_GUEST_CSUM = 1;
export const NET_F_MTU = 3;
export const NET_F_GUEST_TSO4 = 7;
export const NET_F_GUEST_TSO6 = 8;
export const NET_F_GUEST_ECN = 9;
export const NET_F_GUEST_UFO = 10;
export const NET_F_HOST_TSO4 = 11;
export const NET_F_HOST_TSO6 = 12;
export const NET_F_HOST_ECN = 13;
export const NET_F_HOST_UFO = 14;
export const NET_F_MRG_RXBUF = 15;
export const NET_F_MQ = 22;

const PROTOCOL_F_RARP = 2;
const PROTOCOL_F_MTU = 4;
const bit = (n: number): bigint => 1n << BigInt(n);

/** Ethernet + VLAN tag around the largest IP packet a GSO frame can carry. */
const MAX_GSO_FRAME = 65535 + 18;
const ETH_OVERHEAD = 18;
/** Packets moved per wake-up before yielding to the event loop. */
const BUDGET = 256;
const LOG_LIMIT = 20;
const MAX_QUEUE_SIZE = 1024;

export interface NetStats {
  txPackets: number;
  txBytes: number;
  txDropped: number;
  rxPackets: number;
  rxBytes: number;
  rxDropped: number;
  /** Times the tap had packets but the guest had posted no buffer. */
  rxNoBuffer: number;
}

export interface NetOptions {
  tap: Tap;
  queuePairs: number;
  /** Offer VIRTIO_NET_F_MTU with this maximum; undefined: not offered. */
  mtu?: number;
}

export interface NetLogger {
  error(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

class Pair {
  rx: Vring | undefined;
  tx: Vring | undefined;
  private watch: WatchHandle | undefined;
  private events = 0;
  /** The guest posted no RX buffer: stop reading until it kicks. */
  rxStarved = false;
  /** The tap refused a write: wait until it is writable. */
  txBlocked = false;
  readonly stats: NetStats = { txPackets: 0, txBytes: 0, txDropped: 0, rxPackets: 0, rxBytes: 0, rxDropped: 0, rxNoBuffer: 0 };
  logged = 0;

  constructor(
    readonly index: number,
    readonly fd: number,
    private readonly onReady: (p: Pair, events: number) => void,
  ) {}

  /** Watch the tap for exactly what this pair can act on now. */
  update(): void {
    const want =
      (this.rx?.active && !this.rxStarved ? POLL_READABLE : 0) | (this.tx?.active && this.txBlocked ? POLL_WRITABLE : 0);
    if (want === this.events) return;
    this.events = want;
    if (!this.watch) {
      if (!want) return;
      this.watch = native.watch(this.fd, want, (_status, ev) => this.onReady(this, ev));
    } else {
      native.setEvents(this.watch, want);
    }
  }

  close(): void {
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    this.events = 0;
  }
}

export class NetDevice implements Device {
  readonly kind = 'net';
  readonly numQueues: number;
  readonly queueNum: number;
  readonly maxQueueSize = MAX_QUEUE_SIZE;
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  private readonly tap: Tap;
  private readonly maxMtu: number | undefined;
  private mtu = 1500;
  private hdrLen = 10;
  private mergeable = false;
  private bigRx = false;
  private readonly pairs: Pair[];

  constructor(
    opts: NetOptions,
    private readonly log: NetLogger,
  ) {
    if (opts.tap.queues !== opts.queuePairs) throw new Error('one tap queue per queue pair');
    this.tap = opts.tap;
    this.queueNum = opts.queuePairs;
    this.numQueues = 2 * opts.queuePairs;
    this.maxMtu = opts.mtu;
    if (opts.mtu) this.mtu = opts.mtu;
    let f = 0n;
    for (const b of [
      NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_GUEST_ECN, NET_F_GUEST_UFO,
      NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_HOST_ECN, NET_F_HOST_UFO, NET_F_MRG_RXBUF, NET_F_MQ,
      VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1,
    ]) f |= bit(b);
    if (opts.mtu) f |= bit(NET_F_MTU);
    this.features = f;
    this.protocolFeatures = bit(PROTOCOL_F_RARP) | (opts.mtu ? bit(PROTOCOL_F_MTU) : 0n);
    this.pairs = opts.tap.fds.map((fd, i) => new Pair(i, fd, (p, ev) => this.onTapReady(p, ev)));
  }

  get stats(): NetStats[] {
    return this.pairs.map((p) => ({ ...p.stats }));
  }

  setFeatures(acked: bigint): void {
    const has = (b: number): boolean => (acked & bit(b)) !== 0n;
    this.mergeable = has(NET_F_MRG_RXBUF);
    this.hdrLen = has(VIRTIO_F_VERSION_1) || this.mergeable ? 12 : 10;
    this.tap.setVnetHdrSize(this.hdrLen);
    let off = 0;
    if (has(NET_F_GUEST_CSUM)) {
      off |= TUN_F_CSUM;
      if (has(NET_F_GUEST_TSO4)) off |= TUN_F_TSO4;
      if (has(NET_F_GUEST_TSO6)) off |= TUN_F_TSO6;
      if (has(NET_F_GUEST_ECN)) off |= TUN_F_TSO_ECN;
      if (has(NET_F_GUEST_UFO)) off |= TUN_F_UFO;
    }
    this.tap.setOffload(off);
    this.bigRx = (off & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)) !== 0;
    this.log.debug({ hdrLen: this.hdrLen, mergeable: this.mergeable, offloads: off }, 'net features set');
  }

  readConfig(): Uint8Array | undefined {
    return undefined; // QEMU owns virtio-net config space (MAC, status, MTU)
  }

  writeConfig(): string | undefined {
    return 'virtio-net config space is handled by the front-end';
  }

  setMtu(mtu: number): string | undefined {
    if (this.maxMtu === undefined) return 'MTU feature not offered';
    if (mtu < 68 || mtu > this.maxMtu) return `MTU ${mtu} is outside 68..${this.maxMtu}`;
    try {
      this.tap.setMtu(mtu);
    } catch (e) {
      return (e as Error).message;
    }
    this.mtu = mtu;
    this.log.info({ mtu }, 'MTU set');
    return undefined;
  }

  sendRarp(mac: Uint8Array): void {
    const frame = new Uint8Array(this.hdrLen + 60);
    const f = frame.subarray(this.hdrLen);
    const dv = new DataView(f.buffer, f.byteOffset);
    f.fill(0xff, 0, 6);
    f.set(mac, 6);
    dv.setUint16(12, 0x8035); // RARP
    dv.setUint16(14, 1); // Ethernet
    dv.setUint16(16, 0x0800); // IPv4
    f[18] = 6;
    f[19] = 4;
    dv.setUint16(20, 3); // reverse request
    f.set(mac, 22);
    f.set(mac, 32);
    const n = native.write(this.pairs[0]!.fd, frame);
    const hex = Array.from(mac, (b) => b.toString(16).padStart(2, '0')).join(':');
    if (n < 0) this.log.warn({ mac: hex, errno: -n }, 'RARP announcement not sent');
    else this.log.info({ mac: hex }, 'RARP announcement sent');
  }

  startQueue(vring: Vring): VringHandler {
    const pair = this.pairs[vring.index >> 1]!;
    if (vring.index % 2 === 0) {
      pair.rx = vring;
      pair.rxStarved = false;
      return {
        kick: () => {
          pair.rxStarved = false;
          this.rxPump(pair);
        },
      };
    }
    pair.tx = vring;
    pair.txBlocked = false;
    return { kick: () => this.txPump(pair), tolerateBadChains: true };
  }

  stopQueue(vring: Vring): void {
    const pair = this.pairs[vring.index >> 1]!;
    if (vring.index % 2 === 0) pair.rx = undefined;
    else pair.tx = undefined;
    pair.update();
    if (!pair.rx && !pair.tx) {
      pair.close();
      this.log.info({ pair: pair.index, ...pair.stats }, 'queue pair stopped');
    }
  }

  reset(): void {
    for (const p of this.pairs) {
      p.rx = p.tx = undefined;
      p.close();
    }
    this.hdrLen = 10;
    this.mergeable = false;
  }

  private onTapReady(pair: Pair, events: number): void {
    if (events & POLL_WRITABLE) {
      pair.txBlocked = false;
      this.txPump(pair);
    }
    if (events & POLL_READABLE) this.rxPump(pair);
  }

  private drop(pair: Pair, dir: 'tx' | 'rx', reason: string): void {
    if (dir === 'tx') pair.stats.txDropped++;
    else pair.stats.rxDropped++;
    if (pair.logged++ < LOG_LIMIT) {
      this.log.warn({ pair: pair.index, dir, reason }, pair.logged === LOG_LIMIT ? 'packet dropped (further drops only counted)' : 'packet dropped');
    }
  }

  /** Guest to tap: each chain is one vnet header + frame, written with one writev. */
  private txPump(pair: Pair): void {
    const q = pair.tx;
    if (!q || pair.txBlocked) return;
    const chain = new Chain();
    const maxLen = this.hdrLen + MAX_GSO_FRAME;
    for (;;) {
      for (let n = 0; n < BUDGET; n++) {
        if (!q.pop(chain)) break;
        if (chain.error) {
          this.drop(pair, 'tx', `malformed chain: ${chain.error}`);
          q.complete(chain.head, 0);
          continue;
        }
        if (chain.readableBytes < this.hdrLen + 14 || chain.readableBytes > maxLen || chain.writableBytes) {
          this.drop(pair, 'tx', `malformed chain: ${chain.readableBytes} readable, ${chain.writableBytes} writable bytes`);
          q.complete(chain.head, 0);
          continue;
        }
        let w = native.writev(pair.fd, chain.readable);
        while (w === -EINTR) w = native.writev(pair.fd, chain.readable);
        if (w === -EAGAIN) {
          q.unpop(1);
          pair.txBlocked = true;
          pair.update();
          return;
        }
        if (w < 0) this.drop(pair, 'tx', `tap write failed: errno ${-w}`);
        else {
          pair.stats.txPackets++;
          pair.stats.txBytes += w - this.hdrLen;
        }
        q.complete(chain.head, 0);
      }
      if (!q.rearm()) return;
    }
  }

  /** Tap to guest: read each packet straight into posted buffers. */
  private rxPump(pair: Pair): void {
    const q = pair.rx;
    if (!q || !q.active) return pair.update();
    const room = this.hdrLen + (this.bigRx ? MAX_GSO_FRAME : this.mtu + ETH_OVERHEAD);
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
        if (c.writableBytes < this.hdrLen || c.readableBytes) {
          // Only a broken driver posts these; other chains may be gathered, so the queue stops.
          q.unpop(chains.length);
          q.fail(`unusable rx buffer: ${c.writableBytes} writable, ${c.readableBytes} readable bytes`);
          return pair.update();
        }
        chains.push(c);
        for (const v of c.writable) iov.push(v);
        have += c.writableBytes;
        if (!this.mergeable) break;
      }
      if (have < room && (this.mergeable || chains.length === 0)) {
        q.unpop(chains.length);
        if (q.rearm()) continue; // buffers raced in: try again
        pair.stats.rxNoBuffer++;
        pair.rxStarved = true;
        pair.update();
        return;
      }
      let r = native.readv(pair.fd, iov);
      while (r === -EINTR) r = native.readv(pair.fd, iov);
      if (r === -EAGAIN) {
        q.unpop(chains.length);
        break;
      }
      if (r < 0 || r < this.hdrLen) {
        q.unpop(chains.length);
        this.drop(pair, 'rx', `tap read failed: ${r < 0 ? `errno ${-r}` : `${r} bytes`}`);
        continue;
      }
      this.deliver(pair, q, chains, r);
    }
    pair.update();
  }

  /** Complete the chains a packet of `len` bytes filled; give back the rest. */
  private deliver(pair: Pair, q: Vring, chains: Chain[], len: number): void {
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
    if (this.hdrLen === 12) {
      // num_buffers lives in bytes 10-11 of the header, in the first chain.
      const first = chains[0]!.writable;
      writeU16At(first, 10, heads.length);
    }
    // Chains beyond those used were popped last: give them back before completing.
    q.unpop(chains.length - heads.length);
    q.completeMany(heads, lens);
    pair.stats.rxPackets++;
    pair.stats.rxBytes += len - this.hdrLen;
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
