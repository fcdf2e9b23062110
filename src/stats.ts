// What a running daemon reports about itself: one snapshot shape for the
// control socket (`vhostd stats`) and the Prometheus endpoint. Counts come
// from shared counters (ring layer and device), so they are live whichever
// thread serves a queue; latency percentiles cover the last interval.
import type { Device } from './device.js';
import type { Server } from './protocol/server.js';
import { LATENCY_BUCKETS, percentile, RC, RING_COUNTERS } from './ring/counters.js';
import type { Placement } from './ring/placement.js';

export const STATS_INTERVAL_MS = 10_000;

export interface QueueStats {
  index: number;
  /** As the current front-end configured it (absent without one). */
  state?: string;
  size?: number;
  enabled?: boolean;
  failed?: string;
  /** The ring layer's counters since the daemon started. */
  ring: Record<string, number>;
  /** Request latency (taken to completed) over the last interval, µs: a histogram bucket's upper bound. */
  latency: { p50?: number; p99?: number; samples: number; windowSeconds: number };
  /** The device's own counters for this queue. */
  device: Record<string, number>;
}

export interface StatsSnapshot {
  kind: string;
  /** The id every log line of this daemon carries. */
  device: string;
  socket: string;
  pid: number;
  uptimeSeconds: number;
  rssBytes: number;
  connection: { id: number; features: string; protocolFeatures: string } | null;
  connections: number;
  info: Record<string, unknown>;
  queues: QueueStats[];
}

const RING_NAMES = RING_COUNTERS.slice(0, RC.latency);

export class Stats {
  private readonly started = Date.now();
  /** Latency histograms at the last two interval ticks, per queue, for the windowed percentiles. */
  private ticks: { at: number; hist: Map<number, Float64Array> }[] = [];
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly id: string,
    private readonly socket: string,
    private readonly device: Device,
    private readonly placement: Placement,
    private readonly server: Server,
    intervalMs = STATS_INTERVAL_MS,
  ) {
    this.tick();
    this.timer = setInterval(() => this.tick(), intervalMs).unref();
  }

  private histograms(): Map<number, Float64Array> {
    const out = new Map<number, Float64Array>();
    for (let i = 0; i < this.device.numQueues; i++) {
      const v = this.placement.queueCounters(i).values;
      out.set(i, v.slice(RC.latency, RC.latency + LATENCY_BUCKETS));
    }
    return out;
  }

  private tick(): void {
    this.ticks.push({ at: Date.now(), hist: this.histograms() });
    if (this.ticks.length > 2) this.ticks.shift();
  }

  snapshot(): StatsSnapshot {
    const conn = this.server.active;
    const info = conn ? new Map(conn.queueInfo().map((q) => [q.index, q])) : undefined;
    const now = Date.now();
    // The window starts at the older tick: between one and two intervals long.
    const base = this.ticks[0]!;
    const queues: QueueStats[] = [];
    for (let index = 0; index < this.device.numQueues; index++) {
      const values = this.placement.queueCounters(index).values;
      const ring: Record<string, number> = {};
      RING_NAMES.forEach((n, i) => (ring[n] = values[i]!));
      const hist = values.slice(RC.latency, RC.latency + LATENCY_BUCKETS);
      const before = base.hist.get(index);
      if (before) for (let b = 0; b < LATENCY_BUCKETS; b++) hist[b]! -= before[b]!;
      const samples = hist.reduce((a, b) => a + b, 0);
      const q = info?.get(index);
      queues.push({
        index,
        ...(q && { state: q.state, size: q.size, enabled: q.enabled, ...(q.failed && { failed: q.failed }) }),
        ring,
        latency: { p50: percentile(hist, 0.5), p99: percentile(hist, 0.99), samples, windowSeconds: (now - base.at) / 1000 },
        device: this.device.queueStats(index) ?? {},
      });
    }
    return {
      kind: this.device.kind,
      device: this.id,
      socket: this.socket,
      pid: process.pid,
      uptimeSeconds: (now - this.started) / 1000,
      rssBytes: process.memoryUsage.rss(),
      connection: conn ? { id: this.server.connectionCount, features: `0x${conn.features.toString(16)}`, protocolFeatures: `0x${conn.protocolFeatures.toString(16)}` } : null,
      connections: this.server.connectionCount,
      info: this.device.deviceStats?.() ?? {},
      queues,
    };
  }

  close(): void {
    clearInterval(this.timer);
  }
}

/** The snapshot as a table for people (vhostd stats). */
export function formatStats(s: StatsSnapshot): string {
  const lines: string[] = [];
  const conn = s.connection ? `front-end connected (connection ${s.connection.id}, features ${s.connection.features})` : 'no front-end connected';
  lines.push(`vhostd ${s.kind} "${s.device}" on ${s.socket}, pid ${s.pid}, up ${s.uptimeSeconds.toFixed(0)} s, RSS ${(s.rssBytes / 2 ** 20).toFixed(1)} MiB; ${conn}`);
  const info = Object.entries(s.info).map(([k, v]) => `${k} ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`).join(', ');
  if (info) lines.push(info);
  const deviceKeys = [...new Set(s.queues.flatMap((q) => Object.keys(q.device)))];
  const head = ['queue', 'state', 'kicks', 'calls', 'suppr', 'requests', 'inflight', 'peak', 'faults', 'p50 µs', 'p99 µs', ...deviceKeys];
  const rows = s.queues.map((q) => [
    String(q.index),
    q.state ?? '-',
    ...['kicks', 'calls', 'suppressed', 'chains', 'inflight', 'inflightPeak', 'faults'].map((k) => String(q.ring[k] ?? 0)),
    q.latency.p50 === undefined ? '-' : fmtUs(q.latency.p50),
    q.latency.p99 === undefined ? '-' : fmtUs(q.latency.p99),
    ...deviceKeys.map((k) => (q.device[k] === undefined ? '' : String(q.device[k]))),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ').trimEnd();
  lines.push('', line(head), ...rows.map(line));
  const w = s.queues[0]?.latency.windowSeconds;
  if (w !== undefined) lines.push('', `latency over the last ${w.toFixed(0)} s`);
  return lines.join('\n');
}

function fmtUs(us: number): string {
  return us === Infinity ? '>16s' : us >= 100 ? us.toFixed(0) : us.toFixed(1);
}
