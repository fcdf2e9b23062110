// Long fuzz runs from the command line:
//   npm run fuzz -- --target socket|ring|net|both|all [--count N] [--seed S] [--start I]
//                   [--batch B] [--max-failures F] [--avoid class,...]
// Prints inputs per second as it goes and a summary at the end; exits 1 if
// anything failed. Ctrl-C stops after the current input, runs the final
// checks and prints the summary. Every failure names its seed and input index:
// replay one with --seed S --start I --count 1.
import { parseArgs } from 'node:util';
import { describeFailure, type FuzzStats, type Progress, type RunOptions } from './common.js';
import { run as runRing } from './ring-fuzz.js';
import { run as runSocket } from './socket-fuzz.js';
import { run as runNet } from './net-fuzz.js';
import { parseSeed } from './prng.js';

const USAGE = 'usage: npm run fuzz -- --target socket|ring|net|both|all [--count N] [--seed S] [--start I] [--batch B] [--max-failures F] [--avoid class,...]';

function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: {
        target: { type: 'string', default: 'both' },
        count: { type: 'string', default: '1000000' },
        seed: { type: 'string' },
        start: { type: 'string', default: '0' },
        batch: { type: 'string' },
        'max-failures': { type: 'string' },
        avoid: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }).values;
  } catch (e) {
    console.error(`${(e as Error).message}\n${USAGE}`);
    return Promise.resolve(2);
  }
  if (args.help) {
    console.log(USAGE);
    return Promise.resolve(0);
  }
  const targets = args.target === 'both' ? (['socket', 'ring'] as const) : args.target === 'all' ? (['socket', 'ring', 'net'] as const) : args.target === 'socket' || args.target === 'ring' || args.target === 'net' ? ([args.target] as const) : undefined;
  const count = Number(args.count);
  const start = Number(args.start);
  if (!targets || !Number.isInteger(count) || count < 1 || !Number.isInteger(start) || start < 0) {
    console.error(USAGE);
    return Promise.resolve(2);
  }
  const seed = parseSeed(args.seed, Math.floor(Math.random() * 2 ** 32));
  return runAll(targets, { seed, count, start, batch: args.batch ? Number(args.batch) : undefined, maxFailures: args['max-failures'] ? Number(args['max-failures']) : undefined, avoid: args.avoid?.split(',').filter(Boolean) });
}

async function runAll(targets: readonly ('socket' | 'ring' | 'net')[], base: RunOptions): Promise<number> {
  const abort = new AbortController();
  process.once('SIGINT', () => {
    console.log('\n(stopping after the current input; Ctrl-C again to kill)');
    abort.abort();
    process.once('SIGINT', () => process.exit(130));
  });
  const results: FuzzStats[] = [];
  for (const target of targets) {
    if (abort.signal.aborted) break;
    console.log(`[${target}] seed ${base.seed}, inputs ${base.start ?? 0}..${(base.start ?? 0) + base.count - 1}`);
    let lastInputs = 0;
    let lastMs = 0;
    const onProgress = (p: Progress): void => {
      const dt = p.elapsedMs - lastMs;
      const recent = dt > 0 ? ((p.inputs - lastInputs) * 1000) / dt : 0;
      if (dt < 2_000 && p.inputs < base.count) return;
      lastInputs = p.inputs;
      lastMs = p.elapsedMs;
      const what = target === 'socket' ? 'messages' : target === 'net' ? 'frames' : 'chains';
      console.log(
        `[${target}] ${p.inputs} inputs in ${(p.elapsedMs / 1000).toFixed(1)} s: ${p.rate.toFixed(0)}/s overall, ${recent.toFixed(0)}/s lately; ` +
          `${((p.messages * 1000) / Math.max(p.elapsedMs, 1)).toFixed(0)} ${what}/s; ${p.failures} failures`,
      );
    };
    const opts: RunOptions = { ...base, onProgress, signal: abort.signal, log: (l) => console.log(l) };
    const st = target === 'socket' ? await runSocket(opts) : target === 'net' ? await runNet(opts) : await runRing(opts);
    results.push(st);
  }
  console.log('\n==== summary ====');
  let failed = 0;
  for (const st of results) {
    failed += st.failures.length;
    const extra = Object.entries(st.extra).map(([k, v]) => `${k} ${v}`).join(', ');
    console.log(
      `[${st.target}] seed ${st.seed}: ${st.inputs} inputs in ${(st.elapsedMs / 1000).toFixed(1)} s = ${st.rate.toFixed(0)} inputs/s, ` +
        `${st.messages} ${st.target === 'socket' ? 'vhost-user messages' : st.target === 'net' ? 'injected frames' : 'descriptor chains'} = ${((st.messages * 1000) / st.elapsedMs).toFixed(0)}/s; ` +
        `${st.target === 'socket' ? 'closed by the daemon' : 'queue failed'} ${st.closes}, ${st.target === 'socket' ? 'answered' : 'completed'} ${st.replies}; ${extra}; ${st.failures.length} failures`,
    );
    for (const f of st.failures) console.log(`  - ${describeFailure(f, st.target).split('\n')[0]}`);
  }
  return failed ? 1 : 0;
}

process.exitCode = await main();
