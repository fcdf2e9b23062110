// What the live-migration tests share: the guest's fio workload that runs on
// through the switch-over, and the checks on a migration's result.
import { expect } from 'vitest';
import type { MigrationResult } from './guest.js';

/** What the run looked like, for the log (and the closing note). */
export function summary(what: string, r: MigrationResult): void {
  const m = r.migration as { 'total-time'?: number; downtime?: number; ram?: Record<string, number> };
  const ram = m.ram ?? {};
  console.log(
    `${what}: migrated in ${m['total-time']} ms, downtime ${m.downtime} ms, ${ram['dirty-sync-count']} bitmap syncs, ` +
      `${Math.round((ram.transferred ?? 0) / 2 ** 20)} MiB sent, ${ram['dirty-pages-rate'] ?? 0} dirty pages/s; ` +
      `source printed ${Object.keys(r.source.markers).join(' ')}; destination printed ${Object.keys(r.dest.markers).join(' ')}`,
  );
}

export function expectMigrated(r: MigrationResult): void {
  if (r.exitCode !== 0) throw new Error(`guest failed (exit ${r.exitCode}):\n--- source ---\n${r.source.output.slice(-3000)}\n--- destination ---\n${r.dest.output.slice(-4000)}`);
  expect(r.migration.status).toBe('completed');
  const ram = r.migration.ram as { 'dirty-sync-count': number };
  expect(ram['dirty-sync-count'], 'dirty bitmap syncs').toBeGreaterThan(1);
}

/**
 * Guest script for a migration: seed data written and verified, then @@MIGRATE,
 * then rounds of writes and verifies (and a re-verify of the seed through the
 * page cache) for `workS` seconds, on through the switch-over.
 */
export function migrationFioScript(workS: number, sizeMiB = 16): string {
  const job = (name: string, offsetMiB: number, seed: string, direct = 1): string =>
    `fio --name=${name} --filename=/dev/vda --rw=randwrite --bs=4k --offset=${offsetMiB}M --size=${sizeMiB}M --ioengine=libaio --iodepth=8 --direct=${direct} ` +
    `--verify=crc32c --randseed=${seed} --output-format=terse --terse-version=3${direct ? '' : ' --invalidate=0'}`;
  return `
# Data written before the migration, verified again in every round after it.
${job('seed', 0, '7')} --do_verify=0 > /tmp/s.txt 2>&1 || { cat /tmp/s.txt; exit 1; }
${job('seed', 0, '7')} --verify_only > /tmp/sv.txt 2>&1 || { cat /tmp/sv.txt; exit 2; }
echo "@@SEED=$(cut -d';' -f5 /tmp/s.txt),$(cut -d';' -f5 /tmp/sv.txt)"
# The seed is re-verified through the page cache (--invalidate=0 keeps fio from
# dropping it): the first pass fills it while the pre-copy runs (the back-end
# writes those pages after QEMU sent them), and the rounds on the destination
# read it from there. A page the back-end did not log is stale there.
echo 3 > /proc/sys/vm/drop_caches
echo "@@MIGRATE=now"
${job('seed', 0, '7', 0)} --verify_only > /tmp/c.txt 2>&1 || { cat /tmp/c.txt; exit 6; }
echo "@@CACHED=$(cut -d';' -f5 /tmp/c.txt)"
end=$(( $(cut -d. -f1 /proc/uptime) + ${workS} ))
round=0
while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
  round=$((round + 1))
  ${job('r$round', 16, '$round')} --do_verify=0 > /tmp/w.txt 2>&1 || { cat /tmp/w.txt; exit 3; }
  ${job('r$round', 16, '$round')} --verify_only > /tmp/v.txt 2>&1 || { cat /tmp/v.txt; exit 4; }
  ${job('seed', 0, '7', 0)} --verify_only > /tmp/a.txt 2>&1 || { cat /tmp/a.txt; exit 5; }
  echo "@@ROUND$round=$(cut -d';' -f5 /tmp/w.txt),$(cut -d';' -f5 /tmp/v.txt),$(cut -d';' -f5 /tmp/a.txt)"
done
echo "@@ROUNDS=$round"
echo "@@IOERRORS=$(dmesg | grep -ci 'I/O error')"
`;
}

/** Every round clean, the seed cached before the switch-over, and at least two rounds finished on the destination. */
export function expectCleanMigrationFio(res: MigrationResult, opts: { cachedBeforeSwitch: boolean } = { cachedBeforeSwitch: true }): void {
  expect(res.markers.SEED).toBe('0,0');
  expect(res.markers.CACHED).toBe('0');
  // On a fast disk the cache fills during the pre-copy, which is what makes the test see an unlogged page.
  if (opts.cachedBeforeSwitch) expect(res.source.markers.CACHED, 'the seed was cached before the switch-over').toBeDefined();
  const rounds = Number(res.markers.ROUNDS);
  for (let i = 1; i <= rounds; i++) expect(res.markers[`ROUND${i}`], `fio errors in round ${i}`).toBe('0,0,0');
  expect(res.markers.IOERRORS).toBe('0');
  const onDest = Object.keys(res.dest.markers).filter((k) => /^ROUND\d+$/.test(k));
  expect(onDest.length, 'rounds finished on the destination').toBeGreaterThanOrEqual(2);
}
