import { describe, expect, it } from 'vitest';
import { bucketUpper, LATENCY_BUCKETS, latencyBucket, percentile } from '../../src/ring/counters.js';

/** The lower bound of a bucket, in µs: the upper bound of the one below. */
const lower = (b: number): number => (b <= 1 ? (b === 1 ? 1 : 0) : bucketUpper(b - 1));

describe('latency histogram', () => {
  it('puts a latency in the bucket whose bounds hold it', () => {
    let seed = 12345;
    const rand = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const wrong: string[] = [];
    for (let i = 0; i < 100_000; i++) {
      const us = 2 ** (rand() * 25);
      const b = latencyBucket(us);
      const fits = b >= 1 && b < LATENCY_BUCKETS && us >= lower(b) && (b === LATENCY_BUCKETS - 1 || us < bucketUpper(b));
      if (!fits) wrong.push(`${us} µs in bucket ${b}`);
    }
    expect(wrong.slice(0, 5)).toEqual([]);
  });

  it('splits each octave in four at its exact edges', () => {
    expect(latencyBucket(1)).toBe(1);
    expect(latencyBucket(1.25)).toBe(2);
    expect(latencyBucket(1.2499)).toBe(1);
    expect(latencyBucket(1.99)).toBe(4);
    expect(latencyBucket(2)).toBe(5);
    expect(latencyBucket(96)).toBe(1 + 4 * 6 + 2);
    expect(latencyBucket(2 ** 24 - 1e-6)).toBe(LATENCY_BUCKETS - 2);
    expect(latencyBucket(2 ** 24)).toBe(LATENCY_BUCKETS - 1);
    expect(latencyBucket(1e12)).toBe(LATENCY_BUCKETS - 1);
  });

  it('puts below 1 µs, and what is not a latency, in bucket 0', () => {
    for (const us of [0, 0.999, -5, NaN, -Infinity]) expect(latencyBucket(us)).toBe(0);
    expect(latencyBucket(Infinity)).toBe(LATENCY_BUCKETS - 1);
  });

  it('reports a percentile as the upper bound of its bucket', () => {
    const h = new Array<number>(LATENCY_BUCKETS).fill(0);
    expect(percentile(h, 0.5)).toBeUndefined();
    for (let i = 0; i < 99; i++) h[latencyBucket(100)]++;
    h[latencyBucket(5000)]++;
    expect(percentile(h, 0.5)).toBe(bucketUpper(latencyBucket(100)));
    expect(percentile(h, 0.999)).toBe(bucketUpper(latencyBucket(5000)));
    expect(bucketUpper(latencyBucket(100))).toBeGreaterThan(100);
  });
});
