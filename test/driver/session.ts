// A front-end session with a device: connection, guest memory and queues,
// started and stopped in the order QEMU 7.2 uses for vhost-user-blk.
import { FrontEnd } from './frontend.js';
import { GuestMemory, type RegionSpec } from './guest.js';
import { BlkQueue } from './blk.js';
import { SplitQueue } from './virtqueue.js';
import { bit, has, PF, VF } from './wire.js';

/** Virtio features this driver can use; the session acks the intersection with the offer. */
export const DRIVER_FEATURES =
  bit(VF.BLK_SIZE_MAX) | bit(VF.BLK_SEG_MAX) | bit(VF.BLK_RO) | bit(VF.BLK_BLK_SIZE) | bit(VF.BLK_FLUSH) |
  bit(VF.BLK_TOPOLOGY) | bit(VF.BLK_CONFIG_WCE) | bit(VF.BLK_MQ) | bit(VF.BLK_DISCARD) | bit(VF.BLK_WRITE_ZEROES) |
  bit(VF.INDIRECT_DESC) | bit(VF.EVENT_IDX) | bit(VF.PROTOCOL_FEATURES) | bit(VF.VERSION_1);

/** Protocol features the driver implements (no back-end channel, no inflight area, no logging). */
export const DRIVER_PROTOCOL =
  bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.CONFIGURE_MEM_SLOTS);

export interface StartOptions {
  /** Queues to start (default 1). */
  queues?: number;
  queueSize?: number;
  /** Features the driver is willing to ack (intersected with the offer). */
  features?: bigint;
  protocolFeatures?: bigint;
  /** GET_CONFIG size; QEMU 7.2 asks for 57 with discard and write-zeroes on. */
  configSize?: number;
  /** Guest region holding each queue's rings. */
  ringRegions?: number[];
  /** Which regions SET_MEM_TABLE carries (default: all). */
  tableRegions?: number[];
  /** Initial avail/used index of every queue (16-bit wrap tests). */
  startIndex?: number;
}

export class Session {
  readonly queues: SplitQueue[] = [];
  readonly blk: BlkQueue[] = [];
  offeredFeatures = 0n;
  offeredProtocol = 0n;
  features = 0n;
  protocol = 0n;
  queueNum = 0;
  config: Uint8Array | undefined;
  private tableRegions: number[] | undefined;

  private constructor(
    readonly fe: FrontEnd,
    readonly mem: GuestMemory,
  ) {}

  static async open(socket: string, layout?: RegionSpec[]): Promise<Session> {
    const mem = new GuestMemory(layout);
    try {
      return new Session(await FrontEnd.connect(socket), mem);
    } catch (e) {
      mem.destroy();
      throw e;
    }
  }

  get configView(): DataView {
    if (!this.config) throw new Error('no config read');
    return new DataView(this.config.buffer, this.config.byteOffset, this.config.byteLength);
  }

  /** GET_FEATURES .. GET_CONFIG, as QEMU does when the device is realized. */
  async negotiate(opts: StartOptions = {}): Promise<void> {
    const fe = this.fe;
    this.offeredFeatures = await fe.getFeatures();
    if (has(this.offeredFeatures, VF.PROTOCOL_FEATURES)) {
      this.offeredProtocol = await fe.getProtocolFeatures();
      this.protocol = this.offeredProtocol & (opts.protocolFeatures ?? DRIVER_PROTOCOL);
      await fe.setProtocolFeatures(this.protocol);
      if (has(this.protocol, PF.MQ)) this.queueNum = Number(await fe.getQueueNum());
    }
    await fe.setOwner();
    if (has(this.protocol, PF.CONFIG)) {
      const size = opts.configSize ?? 57;
      const c = await fe.getConfig(0, size);
      if (!c) throw new Error(`GET_CONFIG(0, ${size}) failed`);
      this.config = c.data;
    }
    this.features = this.offeredFeatures & (opts.features ?? DRIVER_FEATURES);
  }

  /** The QEMU 7.2 start order: negotiation, SET_FEATURES, SET_MEM_TABLE, then each queue. */
  async startDevice(opts: StartOptions = {}): Promise<void> {
    await this.negotiate(opts);
    const n = opts.queues ?? 1;
    const size = opts.queueSize ?? 128;
    const regions = opts.ringRegions ?? [0, 2, 1, 0];
    this.tableRegions = opts.tableRegions;
    for (let i = 0; i < n; i++) {
      const q = new SplitQueue(this.mem, i, size, regions[i % regions.length]! % this.mem.regions.length);
      if (opts.startIndex !== undefined) q.startAt(opts.startIndex);
      this.queues.push(q);
      this.blk.push(new BlkQueue(q, this.mem));
    }
    await this.startRings();
  }

  /** SET_FEATURES, SET_MEM_TABLE and every queue: also what a restart after stopDevice() sends. */
  async startRings(): Promise<void> {
    const fe = this.fe;
    await fe.setFeatures(this.features);
    await fe.setMemTable(this.mem.table(this.tableRegions));
    for (const q of this.queues) {
      q.eventIdx = has(this.features, VF.EVENT_IDX);
      await fe.setVringNum(q.index, q.size);
      await fe.setVringBase(q.index, q.base);
      await fe.setVringAddr({ index: q.index, ...q.addrs() });
      await fe.setVringKick(q.index, q.kickFd);
      await fe.setVringCall(q.index, q.callFd);
    }
    if (has(this.features, VF.PROTOCOL_FEATURES)) {
      for (const q of this.queues) await fe.setVringEnable(q.index, true);
    }
  }

  /** QEMU's stop: disable every ring, then GET_VRING_BASE each. Returns the bases. */
  async stopDevice(): Promise<number[]> {
    if (has(this.features, VF.PROTOCOL_FEATURES)) {
      for (const q of this.queues) await this.fe.setVringEnable(q.index, false);
    }
    const bases: number[] = [];
    for (const q of this.queues) {
      q.base = await this.fe.getVringBase(q.index);
      bases.push(q.base);
    }
    return bases;
  }

  close(): void {
    this.fe.close();
    for (const q of this.queues) q.destroy();
    this.mem.destroy();
  }
}
