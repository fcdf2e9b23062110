#!/usr/bin/env node
// Entry point. The libuv thread pool runs the image I/O; size it before
// anything can start it (the pool is created on first use).
process.env.UV_THREADPOOL_SIZE ??= '16';
const { main } = await import('./cli.js');
process.exitCode = await main(process.argv.slice(2));
