// What the executor needs of a virtqueue layout. The split layout
// (split-ring.ts) is the one implemented; a packed one will sit beside it.
// Every method is mechanics only: nothing here completes, fails or logs.
import type { DescriptorChain } from './chain.js';
import type { DirtyLog } from './dirty-log.js';

/** The ring itself is unusable (impossible index, head out of range): the queue must stop. */
export class RingError extends Error {}

export interface Ring {
  readonly size: number;
  /** The next available entry to take: what GET_VRING_BASE reports. */
  readonly nextAvail: number;
  /** Our copy of the used index. */
  readonly usedIdx: number;
  /** Descriptors resolved since the last call: the executor's measure of work done. */
  takeWork(): number;
  /** Entries published by the driver and not taken yet. Throws RingError on an impossible index. */
  pending(): number;
  /**
   * Resolve the k-th untaken entry (k < pending()) into `chain` and change
   * nothing. Chain-level problems are reported in chain.fault; a ring-level
   * one throws RingError.
   */
  peek(k: number, chain: DescriptorChain): void;
  /** Consume the first n untaken entries (those peek() saw at 0..n-1). */
  take(n: number): void;
  /** Resolve the chain that starts at `head` (resubmitting what a dead back-end left in flight). */
  chainAt(head: number, chain: DescriptorChain): void;
  /** Skip ahead to `next` as the next entry to take (inflight recovery). */
  rewindTo(next: number): void;
  /** Write a used element; nothing is visible to the driver before publish(). */
  add(head: number, written: number): void;
  /** Make every added element visible, with a full barrier. */
  publish(): void;
  /** Whether the driver wants a notification for what was published since the last call. */
  needsNotify(): boolean;
  /**
   * Ask the driver to notify once more than `seen` entries are pending (0:
   * any new entry). Returns true if that is already the case after the
   * request became visible, so the caller must go on instead of sleeping.
   */
  enableNotifications(seen: number): boolean;
  /** Tell the driver notifications are not needed (we are busy anyway). */
  disableNotifications(): void;
  /**
   * Mark every later write to the device area (used entries, the used index,
   * flags, avail_event) in `log`, the area starting at guest physical address
   * `usedGpa`; undefined stops marking.
   */
  setLog(log: DirtyLog | undefined, usedGpa: number): void;
}

/** VIRTIO 1.2 "vring_need_event": notify when the driver's event index lies in [old, new). */
export function needEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - event - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

export const u16 = (v: number): number => v & 0xffff;
