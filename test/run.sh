#!/usr/bin/env bash
# The whole test suite: unit, protocol (vhostd and qemu-storage-daemon),
# fuzzing, and end-to-end with real QEMU guests. Provisions what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci
npm run --silent build
# Tests run untyped under vitest; check the whole tree, tests included, here.
npm run --silent typecheck
bash test/guest/provision.sh
results=.vitest-results.json
rm -f "$results"
status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$results" "$@" || status=$?
# One plain closing line, whatever the reporter printed above.
if [ -f "$results" ]; then
  node -e '
    const r = require(process.argv[1]);
    const skipped = r.numPendingTests + r.numTodoTests;
    console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
    if (r.numTotalTests === 0) process.exit(1);
  ' "$PWD/$results" || status=1
else
  echo "0 passed, 0 failed"; status=1
fi
exit $status
