// The contract between the vhost-user protocol layer and a device back-end.
// Back-ends see virtqueues (through the ring layer's executor) and config
// space; never sockets or messages.
import type { QueueRunnerSource } from './ring/placement.js';

export {
  VIRTIO_F_ANY_LAYOUT,
  VIRTIO_F_NOTIFY_ON_EMPTY,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from './features.js';

/** A device refused what the front-end asked (a tap that cannot take the header size, say): the connection closes, cleanly logged. */
export class DeviceError extends Error {}

export interface Device extends QueueRunnerSource {
  /** Short name for logs: "blk", "net". */
  readonly kind: string;
  /** Virtqueues the front-end may configure. */
  readonly numQueues: number;
  /** What GET_QUEUE_NUM reports: queues for blk, queue pairs for net. */
  readonly queueNum: number;
  readonly maxQueueSize: number;
  /** Virtio feature bits offered, device and ring bits together. */
  readonly features: bigint;
  /** Protocol feature bits the device itself needs (CONFIG, MTU, RARP, ...). */
  readonly protocolFeatures: bigint;

  /** The driver's acked features; called before any queue starts. */
  setFeatures(acked: bigint): void;
  /** Config space bytes [offset, offset+size); undefined if the range is not readable. */
  readConfig(offset: number, size: number): Uint8Array | undefined;
  /** Write config space; returns an error message when the write is refused. */
  writeConfig(offset: number, data: Uint8Array): string | undefined;
  /**
   * Queue `index` stopped and drained; `report` is what its runner said when it
   * stopped. A promise holds back the stop's answer to the front-end until the
   * device settled (blk makes what was written durable).
   */
  stopQueue(index: number, report: unknown): void | Promise<void>;
  /** Back to the state right after construction (front-end gone or reset). */
  reset(): void;
  /** NET_SET_MTU; returns an error message when the MTU is refused. */
  setMtu?(mtu: number): string | undefined;
  /** The device's own counters for queue `index`, since the daemon started (live, whatever thread serves it). */
  queueStats(index: number): Record<string, number> | undefined;
  /** Device-wide facts and values for stats (image, engine, tap, MTU). */
  deviceStats?(): Record<string, unknown>;
  /**
   * Called by the protocol layer with a function that tells the front-end the
   * config space changed (CONFIG_CHANGE_MSG); undefined when it cannot be told.
   */
  setConfigNotifier?(notify: (() => Promise<string | undefined>) | undefined): void;
  /** Online resize (SIGHUP, `vhostd resize`): re-read the backing size and tell the front-end. */
  resize?(): Promise<{ ok: boolean; message: string; bytes: number }>;
  /** SEND_RARP: announce the guest's MAC after migration. */
  sendRarp?(mac: Uint8Array): void;
}
