#!/usr/bin/env bash
# The whole test suite: unit, protocol (vhostd and qemu-storage-daemon),
# and end-to-end with real QEMU guests. Provisions what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci
npm run --silent build
bash test/guest/provision.sh
exec npx vitest run "$@"
