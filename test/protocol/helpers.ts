// Test plumbing shared by the protocol suites.
import { readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';
import { startBackend, type Backend, type BackendKind, type BackendOptions } from './backends.js';
import { Session } from '../driver/session.js';
import type { RegionSpec } from '../driver/guest.js';
export { waitFor } from '../support/wait.js';

/** Open a session, run fn, and always release it; failures carry the wire trace and the back-end's log tail. */
export async function withSession<T>(be: Backend, fn: (s: Session) => Promise<T>, layout?: RegionSpec[]): Promise<T> {
  const s = await Session.open(be.socket, layout);
  try {
    return await fn(s);
  } catch (e) {
    throw annotate(e, be, s);
  } finally {
    s.close();
  }
}

export function annotate(e: unknown, be: Backend, s?: Session): Error {
  const err = e instanceof Error ? e : new Error(String(e));
  const tail = be.output().split('\n').slice(-25).join('\n');
  err.message += `\n--- wire trace ---\n${s ? s.fe.recentTrace(25) : '(none)'}\n--- ${be.kind} output (tail) ---\n${tail}`;
  return err;
}

/** Byte comparison that names the first difference instead of dumping arrays. */
export function expectBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length !== expected.length) throw new Error(`${what}: ${actual.length} bytes, expected ${expected.length}`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      throw new Error(`${what}: first difference at byte ${i}: 0x${actual[i]!.toString(16)} != expected 0x${expected[i]!.toString(16)}`);
    }
  }
}

export function isZero(b: Uint8Array): boolean {
  for (const x of b) if (x !== 0) return false;
  return true;
}

/** Poll a condition; fail with `what` after timeoutMs. */
/**
 * One back-end for a describe block. A back-end that dies fails the test that
 * killed it (or the next one, if it died in between), and is replaced so
 * later tests still run.
 */
export function useBackend(kind: BackendKind, opts: BackendOptions = {}): () => Backend {
  let be: Backend | undefined;
  beforeAll(async () => {
    be = await startBackend(kind, opts);
  }, 30_000);
  afterAll(async () => {
    await be?.stop();
  });
  const replaceIfDead = async (when: string): Promise<void> => {
    if (!be || !be.exited()) return;
    const tail = be.output().split('\n').slice(-15).join('\n');
    await be.stop();
    be = await startBackend(kind, opts);
    throw new Error(`${kind} died ${when}:\n${tail}`);
  };
  beforeEach(() => replaceIfDead('after the previous test'));
  afterEach(() => replaceIfDead('during this test'));
  return () => be!;
}

/** Peak RSS (VmHWM) and CPU seconds so far of a process, to assert on what a workload cost it. */
export function processUsage(pid: number): { hwmBytes: number; cpuSeconds: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { hwmBytes: hwm, cpuSeconds: (Number(fields[11]) + Number(fields[12])) / 100 }; // utime + stime, in clock ticks
}
