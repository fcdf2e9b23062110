// Feature bits shared by every layer (VIRTIO 1.2 §6, vhost-user.rst). Device
// bits (blk, net) live with their devices; these are the transport's and the ring's.

export const bit = (n: number): bigint => 1n << BigInt(n);
export const has = (features: bigint, n: number): boolean => (features & bit(n)) !== 0n;

export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
/** vhost: log every write into guest memory in the dirty log (live migration). */
export const VHOST_F_LOG_ALL = 26;
export const VIRTIO_F_ANY_LAYOUT = 27;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** vhost-user: the back-end speaks GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_RING_PACKED = 34;

/** What a ring needs to know of the negotiated features, whatever its layout. */
export interface RingFeatures {
  eventIdx: boolean;
  indirect: boolean;
  notifyOnEmpty: boolean;
}

export function ringFeatures(acked: bigint): RingFeatures {
  return {
    eventIdx: has(acked, VIRTIO_RING_F_EVENT_IDX),
    indirect: has(acked, VIRTIO_RING_F_INDIRECT_DESC),
    notifyOnEmpty: has(acked, VIRTIO_F_NOTIFY_ON_EMPTY),
  };
}
