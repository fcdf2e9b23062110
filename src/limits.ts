// Every bound vhostd puts on what a front-end or a guest can make it hold or
// do, in one place. The guest and the socket peer are hostile: each number
// here caps memory, CPU time or fds that one of them could otherwise grow.

/** Largest ring any device offers. QEMU's virtio devices go to 1024; the split layout allows 32768. */
export const MAX_QUEUE_SIZE = 1024;
/** Ceiling of the split layout itself (VIRTIO 1.2 §2.7: Queue Size ≤ 32768). */
export const SPLIT_RING_MAX_SIZE = 32768;

/**
 * Segments one chain may resolve to, counting the splits at region and window
 * boundaries. libvhost-user stops at the same number, and it is IOV_MAX, so a
 * chain's data always fits one readv/writev.
 */
export const MAX_CHAIN_SEGMENTS = 1024;
/** Bytes one chain may describe; more is a guest bug or an attack (used lengths are u32). */
export const MAX_CHAIN_BYTES = 2 ** 32 - 1;

/**
 * What one queue may hold in flight. A new chain is taken only while the
 * queue holds less than this, so the peak is this plus one chain's worth.
 */
export const MAX_INFLIGHT_SEGMENTS = 4096;
export const MAX_INFLIGHT_BYTES = 64 * 2 ** 20;

/**
 * Work one queue may do in one event-loop turn before it yields: a driver
 * that republishes as fast as we complete (or lays its used ring over its
 * avail ring) would otherwise starve every other queue and the socket.
 */
export const RUN_BUDGET_CHAINS = 1024;
export const RUN_BUDGET_DESCRIPTORS = 65536;

/** How long a ring with no kick fd (VRING_NOFD) waits between polls. */
export const POLL_INTERVAL_MS = 1;

/** A vhost-user payload larger than this is hostile: the largest legal one (a memory table of 8) is 264 bytes. */
export const MAX_PAYLOAD = 4096;
/**
 * Memory slots offered with CONFIGURE_MEM_SLOTS, as libvhost-user offers.
 * QEMU takes the smaller of this and its own limit; a region identical to a
 * mapped one (a net device's second vhost_dev) only counts a reference.
 */
export const MAX_MEM_SLOTS = 509;

/**
 * Largest dirty log mapped (SET_LOG_BASE): one bit per 4 KiB page, so 1 GiB
 * covers 32 TiB of guest memory; a bigger one is a hostile front-end.
 */
export const MAX_LOG_BYTES = 2 ** 30;

/** virtio-blk limits advertised in config space, and enforced on every request. */
export const BLK_SEG_MAX = 126;
export const BLK_SIZE_MAX = 1 << 20;
export const BLK_MAX_DISCARD_SECTORS = 0x3fffff;
export const BLK_MAX_DISCARD_SEG = 16;

/** Malformed requests or packets logged per queue before the log goes quiet (they are still counted). */
export const BAD_REQUEST_LOG_LIMIT = 20;
