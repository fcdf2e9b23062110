// virtio-net over a tap: feature negotiation, the tap's vnet header and
// offloads, MTU and RARP. Queue pair i (rx 2i, tx 2i+1) moves packets through
// tap queue i (queue-pair.ts), on a queue thread of its own by default.
import type { Device } from '../../device.js';
import {
  bit,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../../features.js';
import { MAX_QUEUE_SIZE } from '../../limits.js';
import { native } from '../../native/index.js';
import type { QueueLogger, QueueRunner } from '../../ring/executor.js';
import { createRunner, NET_COUNTERS, type NetStats, type PairSetup } from './queue-pair.js';
import { CounterSet } from '../../ring/counters.js';
import { Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO } from './tap.js';

export type { NetStats } from './queue-pair.js';

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

/**
 * The tap offloads for the guest's acked features: what the guest can take in
 * packets the tap delivers. Every offload needs GUEST_CSUM, and TSO_ECN only
 * means something with TSO4 or TSO6 (the kernel refuses it alone, and a driver
 * may ack GUEST_ECN without either).
 */
export function tapOffloads(acked: bigint): number {
  const has = (b: number): boolean => (acked & bit(b)) !== 0n;
  if (!has(NET_F_GUEST_CSUM)) return 0;
  let off = TUN_F_CSUM;
  if (has(NET_F_GUEST_TSO4)) off |= TUN_F_TSO4;
  if (has(NET_F_GUEST_TSO6)) off |= TUN_F_TSO6;
  if (has(NET_F_GUEST_ECN) && off & (TUN_F_TSO4 | TUN_F_TSO6)) off |= TUN_F_TSO_ECN;
  if (has(NET_F_GUEST_UFO)) off |= TUN_F_UFO;
  return off;
}

export interface NetOptions {
  tap: Tap;
  queuePairs: number;
  /** Offer VIRTIO_NET_F_MTU with this maximum; undefined: not offered. */
  mtu?: number;
}

export type NetLogger = QueueLogger;

export class NetDevice implements Device {
  readonly kind = 'net';
  readonly numQueues: number;
  readonly queueNum: number;
  readonly maxQueueSize = MAX_QUEUE_SIZE;
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  private readonly tap: Tap;
  private readonly maxMtu: number | undefined;
  /** The tap's MTU as last read: RX buffers are sized for it (tun truncates longer frames silently). */
  private mtu: number;
  private hdrLen = 10;
  private mergeable = false;
  private bigRx = false;
  /** The pairs' data path on the daemon's thread; queue threads load runnerModule instead. */
  readonly runner: QueueRunner;
  readonly runnerModule = new URL('./queue-pair.js', import.meta.url);
  /** Each pair's counters, shared with whichever thread serves the pair. */
  private readonly pairCounters: CounterSet[];

  constructor(
    opts: NetOptions,
    private readonly log: NetLogger,
  ) {
    if (opts.tap.queues !== opts.queuePairs) throw new Error('one tap queue per queue pair');
    this.tap = opts.tap;
    this.queueNum = opts.queuePairs;
    this.numQueues = 2 * opts.queuePairs;
    this.maxMtu = opts.mtu;
    this.mtu = opts.mtu ?? 1500;
    this.readTapMtu();
    let f = 0n;
    for (const b of [
      NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_GUEST_ECN, NET_F_GUEST_UFO,
      NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_HOST_ECN, NET_F_HOST_UFO, NET_F_MRG_RXBUF, NET_F_MQ,
      VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1,
    ]) f |= bit(b);
    if (opts.mtu) f |= bit(NET_F_MTU);
    this.features = f;
    this.protocolFeatures = bit(PROTOCOL_F_RARP) | (opts.mtu ? bit(PROTOCOL_F_MTU) : 0n);
    this.runner = createRunner(log);
    this.pairCounters = opts.tap.fds.map(() => new CounterSet(NET_COUNTERS));
  }

  /** Every pair's counters, live. */
  get stats(): NetStats[] {
    return this.pairCounters.map((c) => c.toJSON() as NetStats);
  }

  deviceStats(): Record<string, unknown> {
    return { tap: this.tap.name, mtu: this.mtu, queuePairs: this.queueNum, mergeable: this.mergeable };
  }

  /** An RX queue (even index) counts what came from the tap, a TX queue what went to it. */
  queueStats(index: number): Record<string, number> | undefined {
    const pair = this.pairCounters[index >> 1];
    if (!pair) return undefined;
    const all = pair.toJSON();
    const prefix = index % 2 === 0 ? 'rx' : 'tx';
    return Object.fromEntries(Object.entries(all).filter(([k]) => k.startsWith(prefix)));
  }

  /**
   * Read the tap's MTU; it may have changed since the last connection. On
   * failure the last value stays and a warning says so.
   */
  private readTapMtu(): void {
    try {
      const mtu = this.tap.mtu();
      if (mtu !== this.mtu) this.log.info({ tap: this.tap.name, mtu, was: this.mtu }, 'tap MTU read');
      this.mtu = mtu;
    } catch (e) {
      this.log.warn({ tap: this.tap.name, mtu: this.mtu, reason: (e as Error).message }, 'cannot read the tap MTU; RX buffers sized for the last known one');
    }
  }

  /**
   * Throws TapError only if the vnet header size cannot be set (then no
   * packet could be parsed). Offloads the tap refuses are turned off instead,
   * with an error log: fewer offloads than acked is always safe for the guest.
   */
  setFeatures(acked: bigint): void {
    const has = (b: number): boolean => (acked & bit(b)) !== 0n;
    this.mergeable = has(NET_F_MRG_RXBUF);
    this.hdrLen = has(VIRTIO_F_VERSION_1) || this.mergeable ? 12 : 10;
    this.tap.setVnetHdrSize(this.hdrLen);
    let off = tapOffloads(acked);
    try {
      this.tap.setOffload(off);
    } catch (e) {
      if (!(e instanceof TapError) || off === 0) throw e;
      this.log.error({ tap: this.tap.name, offloads: off, reason: e.message }, 'tap refused the offloads; running without any');
      off = 0;
      this.tap.setOffload(0);
    }
    this.bigRx = (off & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)) !== 0;
    this.readTapMtu();
    this.log.debug({ hdrLen: this.hdrLen, mergeable: this.mergeable, offloads: off, mtu: this.mtu }, 'net features set');
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
    this.readTapMtu(); // what the kernel made of it
    this.log.info({ mtu: this.mtu }, 'MTU set');
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
    const n = native.write(this.tap.fds[0]!, frame);
    const hex = Array.from(mac, (b) => b.toString(16).padStart(2, '0')).join(':');
    if (n < 0) this.log.warn({ mac: hex, errno: -n }, 'RARP announcement not sent');
    else this.log.info({ mac: hex }, 'RARP announcement sent');
  }

  /** Both rings of a pair run on the same thread. */
  queueGroup(index: number): number {
    return index >> 1;
  }

  /** Each ring start re-reads the tap's MTU, which sizes the pair's RX buffers. */
  queueSetup(index: number): PairSetup {
    const pair = index >> 1;
    this.readTapMtu();
    return { pair, tapFd: this.tap.fds[pair]!, hdrLen: this.hdrLen, mergeable: this.mergeable, bigRx: this.bigRx, mtu: this.mtu, counters: this.pairCounters[pair]!.buffer };
  }

  stopQueue(): void {}

  reset(): void {
    this.hdrLen = 10;
    this.mergeable = false;
    this.bigRx = false;
  }

}
