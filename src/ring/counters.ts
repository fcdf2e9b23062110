// Counters that outlive connections and cross threads: each set is a
// Float64Array over a SharedArrayBuffer, so a queue thread adds to it and the
// daemon's thread reads it for stats and metrics with no message in between.
// A reader may see a count one increment stale, never a torn one (aligned
// 64-bit stores on the platforms Node runs vhostd on).

/** Names a device or the ring layer gives its counters, in slot order. */
export type CounterNames = readonly string[];

export class CounterSet {
  readonly values: Float64Array;

  constructor(
    readonly names: CounterNames,
    readonly buffer: SharedArrayBuffer = new SharedArrayBuffer(8 * names.length),
  ) {
    if (buffer.byteLength < 8 * names.length) throw new Error('counter buffer too small');
    this.values = new Float64Array(buffer, 0, names.length);
  }

  /** Name -> value, for JSON and logs. */
  toJSON(): Record<string, number> {
    const out: Record<string, number> = {};
    for (let i = 0; i < this.names.length; i++) out[this.names[i]!] = this.values[i]!;
    return out;
  }
}

/** What the ring layer counts per queue (slot indices into RING_COUNTERS). */
export const RC = {
  kicks: 0,
  calls: 1,
  /** Completions whose call the event index made unnecessary. */
  suppressed: 2,
  chains: 3,
  completed: 4,
  /** Chains handed to the device with a fault (a status byte to answer with) or that failed the queue. */
  faults: 5,
  inflight: 6,
  inflightPeak: 7,
  /** Times busy-polling (--poll-us) found new requests, sparing a kick. */
  pollHits: 8,
  /** Latency histogram: LATENCY_BUCKETS slots from here (see latencyBucket). */
  latency: 9,
} as const;

/** Four buckets per power of two from 1 µs to 2^24 µs (16.8 s), one below and one above. */
export const LATENCY_BUCKETS = 2 + 4 * 24;

export const RING_COUNTERS: CounterNames = [
  'kicks', 'calls', 'suppressed', 'chains', 'completed', 'faults', 'inflight', 'inflightPeak', 'pollHits',
  ...Array.from({ length: LATENCY_BUCKETS }, (_, i) => `latency${i}`),
];

/** The histogram bucket of a latency in µs: 0 below 1 µs, then 4 per octave, the last one open. */
export function latencyBucket(us: number): number {
  if (!(us >= 1)) return 0;
  if (us >= 2 ** 24) return LATENCY_BUCKETS - 1;
  // Once per request: clz32 costs a few ns where log2 and pow cost about 100.
  const e = 31 - Math.clz32(us);
  const octave = 1 << e;
  return 1 + 4 * e + (((us - octave) * 4) / octave | 0);
}

/** The upper bound of a bucket, in µs (what a percentile in it reports). */
export function bucketUpper(b: number): number {
  if (b <= 0) return 1;
  if (b >= LATENCY_BUCKETS - 1) return Infinity;
  const e = Math.floor((b - 1) / 4);
  const sub = (b - 1) % 4;
  return 2 ** e * (1 + (sub + 1) / 4);
}

/** The p-th percentile (0 < p < 1) of a histogram, as a bucket's upper bound; undefined if it is empty. */
export function percentile(buckets: ArrayLike<number>, p: number): number | undefined {
  let total = 0;
  for (let i = 0; i < buckets.length; i++) total += buckets[i]!;
  if (total === 0) return undefined;
  const want = p * total;
  let seen = 0;
  for (let i = 0; i < buckets.length; i++) {
    seen += buckets[i]!;
    if (seen >= want) return bucketUpper(i);
  }
  return bucketUpper(buckets.length - 1);
}
