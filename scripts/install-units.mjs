#!/usr/bin/env node
// `npm run install-units`: puts vhostd's systemd units and QEMU vhost-user
// descriptors in place, creates the vhostd user (primary group kvm, the group
// QEMU's libvirt-qemu user is in on Debian) and the directories, and runs
// `systemctl daemon-reload` when systemd is running. Idempotent: a second run
// changes nothing and says so. Prints every step.
//
//   --root DIR   install below DIR instead of / (users go to DIR/etc/passwd
//                through useradd --prefix; no daemon-reload). For tests and packaging.
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
let root = '/';
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--root' && args[i + 1]) root = args[++i];
  else if (args[i].startsWith('--root=')) root = args[i].slice(7);
  else {
    console.error(`install-units: unknown argument ${args[i]} (usage: install-units [--root DIR])`);
    process.exit(2);
  }
}
const prefixed = root !== '/';
const at = (p) => join(root, p);
const USER = 'vhostd';
const GROUP = 'kvm';
let changes = 0;
const say = (what) => console.log(`install-units: ${what}`);
const did = (what) => {
  changes++;
  say(what);
};

function run(cmd, argv) {
  const r = spawnSync(cmd, argv, { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    console.error(`install-units: ${cmd} ${argv.join(' ')} failed: ${r.error?.message ?? r.stderr.trim()}`);
    process.exit(1);
  }
  return r.stdout;
}

/** An entry of DIR/etc/passwd or DIR/etc/group, read directly so --root works. */
function entry(file, name) {
  const path = at(`etc/${file}`);
  if (!existsSync(path)) return undefined;
  const line = readFileSync(path, 'utf8').split('\n').find((l) => l.split(':')[0] === name);
  return line?.split(':');
}
const prefixArgs = prefixed ? ['--prefix', root] : [];

// 1. The group QEMU connects with, and the vhostd system user in it.
if (entry('group', GROUP)) say(`group ${GROUP} exists`);
else {
  run('groupadd', [...prefixArgs, '--system', GROUP]);
  did(`created system group ${GROUP}`);
}
const user = entry('passwd', USER);
const kvmGid = entry('group', GROUP)[2];
if (!user) {
  run('useradd', [...prefixArgs, '--system', '--gid', GROUP, '--no-create-home', '--home-dir', '/var/lib/vhostd', '--shell', '/usr/sbin/nologin', '--comment', 'vhostd vhost-user back-ends', USER]);
  did(`created system user ${USER} (primary group ${GROUP})`);
} else if (user[3] !== kvmGid) {
  run('usermod', [...prefixArgs, '--gid', GROUP, USER]);
  did(`user ${USER} exists; primary group changed to ${GROUP}`);
} else say(`user ${USER} exists with primary group ${GROUP}`);
const [, , uidStr] = entry('passwd', USER);
const uid = Number(uidStr);
const gid = Number(kvmGid);
// QEMU under libvirt runs as libvirt-qemu, which Debian's libvirt puts in kvm.
const qemuUser = entry('passwd', 'libvirt-qemu');
if (qemuUser) {
  const members = (entry('group', GROUP)[3] ?? '').split(',').filter(Boolean);
  if (qemuUser[3] === kvmGid || members.includes('libvirt-qemu')) say(`libvirt-qemu is in group ${GROUP}`);
  else {
    run('usermod', [...prefixArgs, '--append', '--groups', GROUP, 'libvirt-qemu']);
    did(`added libvirt-qemu to group ${GROUP}`);
  }
} else say(`no libvirt-qemu user here; a QEMU started by hand must run as root or in group ${GROUP}`);

// 2. Directories: the runtime dir for sockets, the image dir, the config dir.
function directory(path, mode, owner, group) {
  const p = at(path);
  if (!existsSync(p)) {
    mkdirSync(p, { recursive: true });
    did(`created ${path}`);
  }
  const st = statSync(p);
  if ((st.mode & 0o7777) !== mode) {
    chmodSync(p, mode);
    did(`${path}: mode ${mode.toString(8)}`);
  }
  if (st.uid !== owner || st.gid !== group) {
    chownSync(p, owner, group);
    did(`${path}: owner ${owner}:${group}`);
  }
  if (st.uid === owner && st.gid === group && (st.mode & 0o7777) === mode) say(`${path} is in place`);
}
directory('/run/vhostd', 0o755, uid, gid);
directory('/var/lib/vhostd', 0o750, uid, gid);
directory('/etc/vhostd', 0o755, 0, 0);

// 3. Files. The units and descriptors name /usr/bin/vhostd*, where
//    `npm install -g .` puts them on Debian (npm's prefix is /usr); elsewhere
//    they are rewritten to where vhostd is installed.
const npmBin = (() => {
  const r = spawnSync('npm', ['prefix', '-g'], { encoding: 'utf8' });
  return r.status === 0 ? join(r.stdout.trim(), 'bin') : '/usr/bin';
})();
if (!prefixed && !existsSync(join(npmBin, 'vhostd'))) say(`warning: ${join(npmBin, 'vhostd')} is missing; run \`npm install -g .\` first`);
const rewrite = (text) => (npmBin === '/usr/bin' ? text : text.replaceAll('/usr/bin/vhostd', join(npmBin, 'vhostd')));

function install(from, to, mode) {
  const text = rewrite(readFileSync(join(SRC, from), 'utf8'));
  const dest = at(to);
  if (existsSync(dest) && readFileSync(dest, 'utf8') === text) {
    say(`${to} is up to date`);
    return;
  }
  mkdirSync(dirname(dest), { recursive: true });
  const existed = existsSync(dest);
  writeFileSync(dest, text, { mode });
  chmodSync(dest, mode);
  did(`${existed ? 'updated' : 'installed'} ${to}`);
}
for (const kind of ['blk', 'net']) {
  install(`systemd/vhostd-${kind}@.service`, `/etc/systemd/system/vhostd-${kind}@.service`, 0o644);
  install(`systemd/vhostd-${kind}@.socket`, `/etc/systemd/system/vhostd-${kind}@.socket`, 0o644);
  install(`share/qemu/vhost-user/50-vhostd-${kind}.json`, `/usr/share/qemu/vhost-user/50-vhostd-${kind}.json`, 0o644);
}

// 4. Tell systemd, if it runs (sd_booted: /run/systemd/system exists).
if (prefixed) say(`installed below ${root}: no daemon-reload`);
else if (!existsSync('/run/systemd/system')) say('systemd is not running as PID 1 here: skipped systemctl daemon-reload');
else if (changes === 0) say('nothing changed: no daemon-reload needed');
else {
  run('systemctl', ['daemon-reload']);
  did('ran systemctl daemon-reload');
}
say(changes ? `done: ${changes} change${changes === 1 ? '' : 's'}` : 'done: nothing to change');
