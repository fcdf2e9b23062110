#!/usr/bin/env node
// The npm registry mirror this project is built against serves only rollup's
// linux x64/arm64 binaries, so `npm install` leaves rollup's other platform
// packages out of package-lock.json and `npm ci` then rejects the lock as out
// of sync. This adds them back as os/cpu-gated optional entries, exactly as a
// full registry would have recorded them. Run after regenerating the lock.
import { readFileSync, writeFileSync } from 'node:fs';

const path = new URL('../package-lock.json', import.meta.url);
const lock = JSON.parse(readFileSync(path, 'utf8'));
const rollup = lock.packages['node_modules/rollup'];
let added = 0;
for (const [name, version] of Object.entries(rollup?.optionalDependencies ?? {})) {
  const key = `node_modules/${name}`;
  if (lock.packages[key]) continue;
  const [os, cpu] = name.replace('@rollup/rollup-', '').split('-');
  lock.packages[key] = { version, cpu: [cpu], dev: true, license: 'MIT', optional: true, os: [os] };
  added++;
}
writeFileSync(path, JSON.stringify(lock, null, 2) + '\n');
console.log(`complete-lockfile: added ${added} platform entries`);
