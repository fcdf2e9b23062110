// Observability against the work actually done: a protocol-driven blk
// workload of known shape, then the control socket (through `vhostd stats`,
// JSON and table) and a Prometheus scrape must count exactly that work.
import { execFile, spawn } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { createConnection } from 'node:net';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { S, T } from '../driver/blk.js';
import { VHOSTD_BIN } from '../support/children.js';
import { useBackend, withSession } from './helpers.js';

const run = promisify(execFile);

interface Snap {
  kind: string;
  device: string;
  connection: { id: number } | null;
  info: Record<string, unknown>;
  queues: { index: number; state?: string; ring: Record<string, number>; latency: { p50?: number; p99?: number; samples: number }; device: Record<string, number> }[];
}

async function until<T>(what: string, f: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function stats(ctl: string): Promise<Snap> {
  const { stdout } = await run(process.execPath, [VHOSTD_BIN, 'stats', '--control', ctl, '--json']);
  return JSON.parse(stdout) as Snap;
}

/** One sample's value from the exposition text. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const m = /^[^{]+\{([^}]*)\} (\S+)$/.exec(line);
    if (m && want.every((w) => m[1]!.split(',').includes(w))) return Number(m[2]);
  }
  return undefined;
}

function ask(path: string, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = createConnection(path);
    let got = '';
    s.on('connect', () => s.write(line));
    s.setEncoding('utf8').on('data', (d: string) => (got += d));
    s.on('end', () => resolve(got));
    s.on('error', reject);
  });
}

describe('stats and metrics (vhostd blk)', () => {
  const be = useBackend('vhostd', { numQueues: 2, extraArgs: ['--metrics', '127.0.0.1:0', '--id', 'disk-under-test'] });
  const ctl = (): string => be().socket.replace(/\.sock$/, '.ctl');
  const metricsUrl = async (): Promise<string> =>
    until('the ready line', () => {
      const m = /"metrics":"([^"]+)"/.exec(be().output());
      return m ? `http://${m[1]}/metrics` : undefined;
    });

  it('the control socket is the socket path with .ctl, owner-only', async () => {
    await until('the control socket', () => (existsSync(ctl()) ? true : undefined));
    const st = statSync(ctl());
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(process.getuid!());
  });

  it('counts exactly the requests, bytes and errors of a workload, per queue', async () => {
    await until('the control socket', () => (existsSync(ctl()) ? true : undefined));
    const before = await stats(ctl());
    expect(before.kind).toBe('blk');
    expect(before.device).toBe('disk-under-test');
    expect(before.info.aio).toBe('io_uring');
    await withSession(be(), async (s) => {
      await s.startDevice({ queues: 2 });
      const writes = Array.from({ length: 40 }, (_, i) => ({ type: T.OUT, sector: 8 * i, out: new Uint8Array(4096).fill(i) }));
      for (const r of await s.blk[0]!.runAll(writes)) expect(r.status).toBe(S.OK);
      const reads = Array.from({ length: 25 }, (_, i) => ({ type: T.IN, sector: 16 * i, inLen: 8192 }));
      for (const r of await s.blk[1]!.runAll(reads)) expect(r.status).toBe(S.OK);
      expect((await s.blk[1]!.run({ type: T.FLUSH })).status).toBe(S.OK);
      expect((await s.blk[1]!.run({ type: T.GET_ID, inLen: 20 })).status).toBe(S.OK);
      // Past the end of the disk: IOERR, counted as a bad request and not as a read.
      expect((await s.blk[0]!.run({ type: T.IN, sector: 1n << 40n, inLen: 512 })).status).toBe(S.IOERR);

      const snap = await stats(ctl());
      expect(snap.connection).not.toBeNull();
      const [q0, q1] = [snap.queues[0]!, snap.queues[1]!];
      const d0 = (k: string): number => q0.device[k]! - (before.queues[0]!.device[k] ?? 0);
      const d1 = (k: string): number => q1.device[k]! - (before.queues[1]!.device[k] ?? 0);
      const r0 = (k: string): number => q0.ring[k]! - (before.queues[0]!.ring[k] ?? 0);
      const r1 = (k: string): number => q1.ring[k]! - (before.queues[1]!.ring[k] ?? 0);
      expect(q0.state).toBe('running');
      expect([d0('writes'), d0('writtenBytes'), d0('reads'), d0('badRequests')]).toEqual([40, 40 * 4096, 0, 1]);
      expect([d1('reads'), d1('readBytes'), d1('flushes'), d1('getIds'), d1('writes'), d1('badRequests')]).toEqual([25, 25 * 8192, 1, 1, 0, 0]);
      expect([r0('chains'), r0('completed'), r1('chains'), r1('completed')]).toEqual([41, 41, 27, 27]);
      expect(q0.ring.inflight).toBe(0);
      expect(q0.ring.inflightPeak).toBeGreaterThanOrEqual(1);
      expect(q0.ring.inflightPeak).toBeLessThanOrEqual(40);
      expect(r0('kicks')).toBeGreaterThanOrEqual(1);
      expect(r0('calls') + r0('suppressed')).toBeGreaterThanOrEqual(1);
      expect(q0.latency.samples).toBeGreaterThanOrEqual(41);
      expect(q0.latency.p50).toBeGreaterThan(0);
      expect(q0.latency.p99!).toBeGreaterThanOrEqual(q0.latency.p50!);

      // The same figures through Prometheus.
      const text = await (await fetch(await metricsUrl())).text();
      const l0 = { device: 'disk-under-test', queue: '0' };
      const l1 = { device: 'disk-under-test', queue: '1' };
      expect(sample(text, 'vhostd_blk_writes_total', l0)).toBe(q0.device.writes);
      expect(sample(text, 'vhostd_blk_written_bytes_total', l0)).toBe(q0.device.writtenBytes);
      expect(sample(text, 'vhostd_blk_reads_total', l1)).toBe(q1.device.reads);
      expect(sample(text, 'vhostd_blk_read_bytes_total', l1)).toBe(q1.device.readBytes);
      expect(sample(text, 'vhostd_blk_bad_requests_total', l0)).toBe(q0.device.badRequests);
      expect(sample(text, 'vhostd_queue_chains_total', l1)).toBe(q1.ring.chains);
      expect(sample(text, 'vhostd_queue_inflight', l0)).toBe(0);
      expect(sample(text, 'vhostd_frontend_connected', { device: 'disk-under-test' })).toBe(1);
      expect(text).toMatch(/^# TYPE vhostd_queue_kicks_total counter$/m);
      expect(sample(text, 'vhostd_queue_latency_p99_seconds', l0)).toBeGreaterThan(0);
    });
  });

  it('the table names every queue and its counters', async () => {
    const { stdout } = await run(process.execPath, [VHOSTD_BIN, 'stats', '--control', ctl()]);
    expect(stdout).toMatch(/^vhostd blk "disk-under-test" on /);
    expect(stdout).toMatch(/^queue\s+state\s+kicks\s+calls/m);
    expect(stdout).toMatch(/^0\s+\S+\s+\d+/m);
    expect(stdout).toMatch(/^1\s+\S+\s+\d+/m);
    expect(stdout).toMatch(/writtenBytes/);
  });

  it('answers an unknown command or an overlong request with an error, and keeps serving', async () => {
    expect(JSON.parse(await ask(ctl(), 'reboot\n')).error).toMatch(/unknown command "reboot"/);
    expect(JSON.parse(await ask(ctl(), 'x'.repeat(1000))).error).toMatch(/longer than 256 bytes/);
    expect((await stats(ctl())).kind).toBe('blk');
  });

  it('vhostd stats says plainly when no daemon is there', async () => {
    const r = await run(process.execPath, [VHOSTD_BIN, 'stats', '--control', '/nonexistent/x.ctl']).catch((e: { code: number; stderr: string }) => e);
    expect((r as { code: number }).code).toBe(2);
    expect((r as { stderr: string }).stderr).toMatch(/no vhostd control socket at \/nonexistent\/x\.ctl/);
  });

  it('every log line names the device; every line about a queue also names its connection', () => {
    const lines = be().output().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.length).toBeGreaterThan(10);
    expect(lines.filter((l) => l.device !== 'disk-under-test')).toEqual([]);
    const aboutQueues = lines.filter((l) => 'queue' in l);
    expect(aboutQueues.length).toBeGreaterThan(0);
    expect(aboutQueues.filter((l) => typeof l.conn !== 'number')).toEqual([]);
  });

  it('vhostd stats --watch prints a fresh snapshot every interval', async () => {
    const child = spawn(process.execPath, [VHOSTD_BIN, 'stats', '--control', ctl(), '--json', '--watch', '0.2'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    try {
      await until('three snapshots', () => (out.split('\n').filter(Boolean).length >= 3 ? true : undefined));
    } finally {
      child.kill('SIGTERM');
    }
    const uptimes = out.split('\n').filter(Boolean).slice(0, 3).map((l) => (JSON.parse(l) as { uptimeSeconds: number }).uptimeSeconds);
    expect(uptimes[1]! - uptimes[0]!).toBeGreaterThanOrEqual(0.15);
    expect(uptimes[2]!).toBeGreaterThan(uptimes[1]!);
  });

  it('serves only /metrics', async () => {
    const url = await metricsUrl();
    expect((await fetch(url.replace('/metrics', '/'))).status).toBe(404);
  });
});
