#!/usr/bin/env node
// `vhostd-blk ARGS` is `vhostd blk ARGS`: QEMU's vhost-user descriptors
// (/usr/share/qemu/vhost-user/50-vhostd-blk.json) name one executable and no
// arguments, so the device kind lives in the program name.
process.argv.splice(2, 0, 'blk');
await import('../dist/daemon.js');
