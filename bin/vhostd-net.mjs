#!/usr/bin/env node
// `vhostd-net ARGS` is `vhostd net ARGS`: QEMU's vhost-user descriptors
// (/usr/share/qemu/vhost-user/50-vhostd-net.json) name one executable and no
// arguments, so the device kind lives in the program name.
process.argv.splice(2, 0, 'net');
await import('../dist/daemon.js');
