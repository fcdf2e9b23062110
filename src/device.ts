// The contract between the vhost-user protocol layer and a device back-end.
// Back-ends see virtqueues and config space; never sockets or messages.
import type { QueueThread } from './ring/queue-thread.js';
import type { QueueOwner, Virtqueue, Vring, VringHandler } from './ring/vring.js';

export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_F_ANY_LAYOUT = 27;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

export interface Device extends QueueOwner {
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
  /** A queue starts on the daemon's thread: return who handles its kicks. */
  startQueue(q: Vring): VringHandler;
  /**
   * The thread that runs queue `index`, or undefined to run it on the daemon's
   * thread. A threaded queue starts through queueSetup() and the thread's runner.
   */
  queueThread?(index: number): QueueThread | undefined;
  /** A queue stopped and drained; the device forgets it. */
  stopQueue(q: Virtqueue): void;
  /** Back to the state right after construction (front-end gone or reset). */
  reset(): void;
  /** NET_SET_MTU; returns an error message when the MTU is refused. */
  setMtu?(mtu: number): string | undefined;
  /** SEND_RARP: announce the guest's MAC after migration. */
  sendRarp?(mac: Uint8Array): void;
}
