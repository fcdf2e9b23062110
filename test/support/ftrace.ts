// Kernel tracepoints through a private tracefs instance, for tests that must
// see what the kernel did on the daemon's behalf where strace cannot look:
// io_uring runs fsyncs and writes in io-wq kernel threads, which make no
// syscalls. Markers written from the test bracket the events, and the global
// trace clock orders them across CPUs.
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';

const TRACEFS = '/sys/kernel/tracing';

export interface TraceEvent {
  task: string;
  event: string;
  /** The event's formatted fields, or the marker's text. */
  text: string;
}

export interface Ftrace {
  /** A line in the trace, ordered with the kernel's events. */
  mark(text: string): void;
  /** Every event and marker so far, in order. */
  read(): TraceEvent[];
  close(): void;
}

let instances = 0;

/** Record `events` ("ext4/ext4_sync_file_exit") in an instance of our own; throws where tracefs is unusable. */
export function ftrace(events: string[]): Ftrace {
  if (!existsSync(join(TRACEFS, 'instances'))) execFileSync('mount', ['-t', 'tracefs', 'nodev', TRACEFS]);
  const dir = join(TRACEFS, 'instances', `vhostd-test-${process.pid}-${++instances}`);
  mkdirSync(dir);
  try {
    writeFileSync(join(dir, 'trace_clock'), 'global');
    for (const e of events) writeFileSync(join(dir, 'events', e, 'enable'), '1');
    writeFileSync(join(dir, 'tracing_on'), '1');
  } catch (e) {
    rmdirSync(dir);
    throw e;
  }
  return {
    mark(text) {
      writeFileSync(join(dir, 'trace_marker'), text);
    },
    read() {
      const out: TraceEvent[] = [];
      for (const line of readFileSync(join(dir, 'trace'), 'utf8').split('\n')) {
        // "  iou-wrk-123-130  [001] .....  5.123456: ext4_sync_file_exit: dev 254,0 ino 12 ret 0"
        const m = /^\s*(.+?)-\d+\s+\[\d+\].*?\s[\d.]+: (\w+): (.*)$/.exec(line);
        if (m) out.push({ task: m[1]!, event: m[2]!, text: m[3]!.trim() });
      }
      return out;
    },
    close() {
      writeFileSync(join(dir, 'tracing_on'), '0');
      rmdirSync(dir);
    },
  };
}
