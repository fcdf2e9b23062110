// The guest workload the crash tests share: fio random writes with crc32c
// headers and separate verify passes, and the check that none of it failed.
import { expect } from 'vitest';
import type { GuestResult } from './guest.js';

/**
 * Guest script: rounds of random writes with crc32c headers, each followed by a
 * separate verify pass, long enough to span every kill the host makes.
 */
export function fioVerifyScript(o: { rounds: number; sizeMiB: number; iodepth: number }): string {
  const job = `--filename=/dev/vda --rw=randwrite --bs=4k --size=${o.sizeMiB}M --ioengine=libaio --iodepth=${o.iodepth} --direct=1 \\
      --verify=crc32c --randseed=$round --output-format=terse --terse-version=3`;
  return `
echo "@@FIO_STARTED=1"
round=0
while [ $round -lt ${o.rounds} ]; do
  round=$((round + 1))
  fio --name=r$round ${job} --do_verify=0 > /tmp/w.txt 2>&1 || { cat /tmp/w.txt; exit 1; }
  fio --name=r$round ${job} --verify_only > /tmp/v.txt 2>&1 || { cat /tmp/v.txt; exit 2; }
  echo "@@ROUND$round=$(cut -d';' -f5 /tmp/w.txt),$(cut -d';' -f5 /tmp/v.txt)"
done
echo "@@IOERRORS=$(dmesg | grep -ci 'I/O error')"
`;
}

/** The guest ran every round, and neither fio nor the kernel saw an error. */
export function expectCleanFio(res: GuestResult, rounds: number): void {
  if (res.exitCode !== 0) throw new Error(`guest failed (exit ${res.exitCode}):\n${res.output.slice(-6000)}`);
  expect(res.markers.IOERRORS).toBe('0');
  for (let i = 1; i <= rounds; i++) expect(res.markers[`ROUND${i}`], `fio errors in round ${i}`).toBe('0,0');
}
