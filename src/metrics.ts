// Prometheus text exposition on /metrics (--metrics HOST:PORT, off by
// default), through prom-client. Every scrape reads one fresh stats snapshot;
// nothing is counted twice or kept here.
import { createServer, type Server as HttpServer } from 'node:http';
import { Counter, Gauge, Registry } from 'prom-client';
import type { Logger } from 'pino';
import type { StatsSnapshot } from './stats.js';

const snake = (s: string): string => s.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toLowerCase();

/** Ring counters that only grow, exported as *_total counters; the rest are gauges. */
const RING_TOTALS: Record<string, string> = {
  kicks: 'Kicks received from the driver',
  calls: 'Interrupts (call eventfd writes) sent to the driver',
  suppressed: 'Completions whose interrupt the event index made unnecessary',
  chains: 'Descriptor chains (requests) taken from the ring',
  completed: 'Descriptor chains completed',
  faults: 'Malformed chains met (answered with an error or failing the queue)',
  pollHits: 'Times busy-polling (--poll-us) found new requests, sparing a kick',
};

export class Metrics {
  private readonly registry = new Registry();
  private snap: StatsSnapshot | undefined;

  private constructor(
    private readonly take: () => StatsSnapshot,
    private readonly http: HttpServer,
  ) {}

  static async listen(address: string, take: () => StatsSnapshot, log: Logger): Promise<Metrics> {
    const m = /^(.*):(\d+)$/.exec(address);
    if (!m) throw new Error(`--metrics wants HOST:PORT, got ${address}`);
    const host = m[1]!.replace(/^\[(.*)\]$/, '$1');
    const port = Number(m[2]);
    const http = createServer();
    const metrics = new Metrics(take, http);
    metrics.define(take());
    http.on('request', (req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
        return;
      }
      metrics
        .render()
        .then((body) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(body))
        .catch((e: Error) => {
          log.error({ err: e }, 'metrics scrape failed');
          res.writeHead(500).end(`${e.message}\n`);
        });
    });
    await new Promise<void>((resolve, reject) => {
      http.once('error', reject);
      http.listen(port, host, () => {
        http.off('error', reject);
        resolve();
      });
    });
    http.on('error', (e) => log.warn({ err: e.message }, 'metrics server error'));
    return metrics;
  }

  get port(): number {
    const a = this.http.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  private async render(): Promise<string> {
    this.snap = this.take();
    return this.registry.metrics();
  }

  /** One metric per counter name the snapshot carries; values are filled in at each scrape. */
  private define(first: StatsSnapshot): void {
    const r = this.registry;
    const labels = ['device', 'queue'];
    const current = (): StatsSnapshot => this.snap ?? this.take();
    const perQueue = (pick: (q: StatsSnapshot['queues'][number]) => number | undefined) =>
      function (this: Counter | Gauge): void {
        const s = current();
        this.reset();
        for (const q of s.queues) {
          const v = pick(q);
          if (v === undefined) continue;
          if (this instanceof Counter) this.inc({ device: s.device, queue: String(q.index) }, v);
          else this.set({ device: s.device, queue: String(q.index) }, v);
        }
      };
    for (const [name, help] of Object.entries(RING_TOTALS)) {
      new Counter({ name: `vhostd_queue_${snake(name)}_total`, help, labelNames: labels, registers: [r], collect: perQueue((q) => q.ring[name]) });
    }
    new Gauge({ name: 'vhostd_queue_inflight', help: 'Requests in flight now', labelNames: labels, registers: [r], collect: perQueue((q) => q.ring.inflight) });
    new Gauge({ name: 'vhostd_queue_inflight_peak', help: 'Most requests in flight at once since the daemon started', labelNames: labels, registers: [r], collect: perQueue((q) => q.ring.inflightPeak) });
    for (const [p, key] of [['0.5', 'p50'], ['0.99', 'p99']] as const) {
      new Gauge({
        name: `vhostd_queue_latency_${key}_seconds`,
        help: `Request latency, ${p} quantile over the last stats interval (histogram bucket upper bound)`,
        labelNames: labels,
        registers: [r],
        collect: perQueue((q) => (q.latency[key] === undefined || q.latency[key] === Infinity ? undefined : q.latency[key]! / 1e6)),
      });
    }
    const deviceNames = new Set(first.queues.flatMap((q) => Object.keys(q.device)));
    // Device counters of queues not yet configured are still known by name from the device.
    for (const name of deviceNames) {
      new Counter({
        name: `vhostd_${first.kind}_${snake(name)}_total`,
        help: `${first.kind} ${name} per queue since the daemon started`,
        labelNames: labels,
        registers: [r],
        collect: perQueue((q) => q.device[name]),
      });
    }
    new Gauge({
      name: 'vhostd_frontend_connected',
      help: '1 while a front-end is connected',
      labelNames: ['device'],
      registers: [r],
      collect(this: Gauge) {
        const s = current();
        this.set({ device: s.device }, s.connection ? 1 : 0);
      },
    });
    new Counter({
      name: 'vhostd_frontend_connections_total',
      help: 'Front-end connections accepted since the daemon started',
      labelNames: ['device'],
      registers: [r],
      collect(this: Counter) {
        const s = current();
        this.reset();
        this.inc({ device: s.device }, s.connections);
      },
    });
    new Gauge({
      name: 'vhostd_resident_memory_bytes',
      help: 'Resident set size of the daemon',
      labelNames: ['device'],
      registers: [r],
      collect(this: Gauge) {
        const s = current();
        this.set({ device: s.device }, s.rssBytes);
      },
    });
  }

  async close(): Promise<void> {
    this.http.closeAllConnections();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
  }
}
