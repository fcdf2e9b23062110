// The virtio-blk device: features, config space and the driver's cache mode,
// on the daemon's thread. Requests are served by blk-queue.ts, on this thread
// or on queue threads (--threads), from what queueSetup() hands each queue.
import type { Device } from '../../device.js';
import {
  bit,
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../../features.js';
import {
  BLK_MAX_DISCARD_SECTORS,
  BLK_MAX_DISCARD_SEG,
  BLK_SEG_MAX,
  BLK_SIZE_MAX,
  MAX_QUEUE_SIZE,
} from '../../limits.js';
import { CounterSet } from '../../ring/counters.js';
import type { QueueLogger, QueueRunner } from '../../ring/executor.js';
import {
  BLK_F_BLK_SIZE,
  BLK_F_CONFIG_WCE,
  BLK_F_DISCARD,
  BLK_F_FLUSH,
  BLK_F_MQ,
  BLK_F_RO,
  BLK_F_SEG_MAX,
  BLK_F_SIZE_MAX,
  BLK_F_TOPOLOGY,
  BLK_F_WRITE_ZEROES,
  CONFIG_SPACE_LIMIT,
  encodeBlkConfig,
  ID_BYTES,
  OFF_WRITEBACK,
  SECTOR,
  type BlkConfig,
} from './config.js';
import { BC, blkRunner, BLK_COUNTERS, BLK_STATE_BYTES, BLK_STATE_SLOTS, CAPACITY_OFFSET, WRITEBACK, type BlkSetup } from './blk-queue.js';
import type { DiskImage } from './image.js';

export { MAX_QUEUE_SIZE };

export interface BlkOptions {
  image: DiskImage;
  numQueues: number;
  serial: string;
  logicalBlockSize: number;
  /** Largest queue the front-end may configure. */
  maxQueueSize?: number;
}

export class BlkDevice implements Device {
  readonly kind = 'blk';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  get queueNum(): number {
    return this.numQueues;
  }
  readonly features: bigint;
  readonly protocolFeatures = bit(5) | bit(9) | bit(12); // BACKEND_REQ, CONFIG, INFLIGHT_SHMFD
  /** The data path on the daemon's thread; queue threads load runnerModule instead. */
  readonly runner: QueueRunner;
  readonly runnerModule = new URL('./blk-queue.js', import.meta.url);
  private readonly image: DiskImage;
  private readonly serial: Uint8Array;
  private readonly blkSize: number;
  /** The driver's cache mode, shared with the queues wherever they run (BlkSetup.state). */
  private readonly state = new SharedArrayBuffer(BLK_STATE_BYTES);
  private readonly stateView = new Int32Array(this.state, 0, BLK_STATE_SLOTS);
  /** The disk's size in bytes as the queues see it: grows on resize(). */
  private readonly capacity = new Float64Array(this.state, CAPACITY_OFFSET, 1);
  private notifyConfig: (() => Promise<string | undefined>) | undefined;
  private acked = 0n;
  private readonly counters: CounterSet[];
  /** writesSoFar() at the last flush at a queue stop. */
  private flushedAt = 0;

  constructor(
    opts: BlkOptions,
    private readonly log: QueueLogger,
  ) {
    this.image = opts.image;
    this.numQueues = opts.numQueues;
    this.maxQueueSize = opts.maxQueueSize ?? MAX_QUEUE_SIZE;
    this.blkSize = opts.logicalBlockSize;
    this.serial = new Uint8Array(ID_BYTES);
    this.serial.set(new TextEncoder().encode(opts.serial).subarray(0, ID_BYTES));
    let f =
      bit(BLK_F_SIZE_MAX) | bit(BLK_F_SEG_MAX) | bit(BLK_F_BLK_SIZE) | bit(BLK_F_FLUSH) | bit(BLK_F_TOPOLOGY) |
      bit(BLK_F_CONFIG_WCE) | bit(BLK_F_MQ) |
      bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC) |
      bit(VIRTIO_F_NOTIFY_ON_EMPTY) | bit(VIRTIO_F_ANY_LAYOUT);
    f |= this.image.readonly ? bit(BLK_F_RO) : bit(BLK_F_DISCARD) | bit(BLK_F_WRITE_ZEROES);
    this.features = f;
    this.counters = Array.from({ length: this.numQueues }, () => new CounterSet(BLK_COUNTERS));
    Atomics.store(this.stateView, WRITEBACK, 1);
    this.capacity[0] = this.image.size;
    this.runner = blkRunner(() => this.image.io);
  }

  get capacitySectors(): bigint {
    return BigInt(Math.floor(this.capacity[0]! / SECTOR));
  }

  setConfigNotifier(notify: (() => Promise<string | undefined>) | undefined): void {
    this.notifyConfig = notify;
  }

  /**
   * Online resize: read the image's size again; if it grew, the guest sees the
   * new capacity (the front-end is told through CONFIG_CHANGE_MSG). A shrunk
   * image is refused: the guest may hold data past the new end, and losing it
   * silently is worse than keeping the old size until it is dealt with.
   */
  async resize(): Promise<{ ok: boolean; message: string; bytes: number }> {
    const was = this.capacity[0]!;
    let now: number;
    try {
      now = this.image.currentSize();
    } catch (e) {
      return { ok: false, message: `cannot read the image size: ${(e as Error).message}`, bytes: was };
    }
    if (now < was) {
      this.log.error({ bytes: now, was }, 'image shrank: resize refused, the guest keeps the old capacity');
      return { ok: false, message: `the image shrank from ${was} to ${now} bytes: refused (the guest keeps ${was})`, bytes: was };
    }
    if (now === was) return { ok: true, message: `the image is still ${was} bytes`, bytes: was };
    this.capacity[0] = now;
    this.log.info({ bytes: now, was }, 'image grew: capacity updated');
    if (!this.notifyConfig) return { ok: true, message: `capacity now ${now} bytes; no front-end to tell (it reads the new size when it connects)`, bytes: now };
    const why = await this.notifyConfig();
    return why
      ? { ok: false, message: `capacity now ${now} bytes, but the front-end was not told: ${why}`, bytes: now }
      : { ok: true, message: `capacity now ${now} bytes; the front-end was told`, bytes: now };
  }

  private config(): BlkConfig {
    const perBlock = this.blkSize / SECTOR;
    return {
      capacitySectors: this.capacitySectors,
      sizeMax: BLK_SIZE_MAX,
      segMax: BLK_SEG_MAX,
      blkSize: this.blkSize,
      physicalBlockExp: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: this.writeback,
      numQueues: this.numQueues,
      maxDiscardSectors: BLK_MAX_DISCARD_SECTORS,
      maxDiscardSeg: BLK_MAX_DISCARD_SEG,
      discardSectorAlignment: perBlock,
      maxWriteZeroesSectors: BLK_MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: BLK_MAX_DISCARD_SEG,
      writeZeroesMayUnmap: true,
    };
  }

  private get writeback(): boolean {
    return Atomics.load(this.stateView, WRITEBACK) === 1;
  }

  setFeatures(acked: bigint): void {
    this.acked = acked;
  }

  readConfig(offset: number, size: number): Uint8Array | undefined {
    if (offset + size > CONFIG_SPACE_LIMIT) return undefined;
    const out = new Uint8Array(size);
    out.set(encodeBlkConfig(this.config()).subarray(offset, offset + size));
    return out;
  }

  writeConfig(offset: number, data: Uint8Array): string | undefined {
    if (offset !== OFF_WRITEBACK || data.length !== 1) return `only the writeback byte (offset ${OFF_WRITEBACK}, 1 byte) is writable`;
    if (data[0]! > 1) return `writeback value ${data[0]} is not 0 or 1`;
    Atomics.store(this.stateView, WRITEBACK, data[0]!);
    this.log.info({ writeback: this.writeback }, 'cache mode changed by the driver');
    return undefined;
  }

  queueSetup(index: number): BlkSetup {
    return { files: this.image.files, serial: this.serial, acked: this.acked, state: this.state, counters: this.counters[index]!.buffer };
  }

  /**
   * A queue stopped: make everything written so far durable before the
   * front-end hears of it. After a migration's last GET_VRING_BASE the
   * destination may open the image (shared storage); on a stop without
   * migration it costs one fdatasync, and none when nothing was written.
   */
  async stopQueue(): Promise<void> {
    const writes = this.writesSoFar();
    if (writes === this.flushedAt || this.image.readonly) return;
    try {
      await new Promise<void>((resolve, reject) => this.image.io.flush((e) => (e ? reject(e) : resolve())));
      this.flushedAt = writes;
      this.log.info({ writes }, 'image flushed at queue stop');
    } catch (e) {
      this.log.error({ err: e, image: this.image.path }, 'flush at queue stop failed: writes the guest saw completed may not be durable');
    }
  }

  /** Requests that changed the image, over every queue (the counters are live on queue threads too). */
  private writesSoFar(): number {
    let n = 0;
    for (const c of this.counters) n += c.values[BC.writes]! + c.values[BC.discards]! + c.values[BC.writeZeroes]!;
    return n;
  }

  queueStats(index: number): Record<string, number> | undefined {
    return this.counters[index]?.toJSON();
  }

  deviceStats(): Record<string, unknown> {
    return { image: this.image.path, bytes: this.capacity[0], readonly: this.image.readonly, aio: this.image.aio, writeback: this.writeback, ...(this.image.uringCounts && { uring: this.image.uringCounts }) };
  }

  reset(): void {
    Atomics.store(this.stateView, WRITEBACK, 1);
    this.acked = 0n;
  }
}
