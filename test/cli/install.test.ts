// `npm run install-units` below a scratch root (--root): the user, group,
// directories, units and descriptors it creates, and that a second run
// changes nothing.
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
let dest: string;
beforeAll(() => {
  dest = mkdtempSync(join(tmpdir(), 'vhostd-install-'));
  mkdirSync(join(dest, 'etc'));
  writeFileSync(join(dest, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nlibvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n');
  writeFileSync(join(dest, 'etc/group'), 'root:x:0:\nlibvirt-qemu:x:64055:\n');
  writeFileSync(join(dest, 'etc/shadow'), 'root:*:19000:0:99999:7:::\nlibvirt-qemu:!:19000::::::\n');
  writeFileSync(join(dest, 'etc/gshadow'), 'root:*::\nlibvirt-qemu:!::\n');
  chmodSync(join(dest, 'etc/shadow'), 0o640);
  chmodSync(join(dest, 'etc/gshadow'), 0o640);
});
afterAll(() => rmSync(dest, { recursive: true, force: true }));

const install = () => spawnSync(process.execPath, [join(ROOT, 'scripts/install-units.mjs'), '--root', dest], { encoding: 'utf8' });
const files = [
  ['systemd/vhostd-blk@.service', 'etc/systemd/system/vhostd-blk@.service'],
  ['systemd/vhostd-blk@.socket', 'etc/systemd/system/vhostd-blk@.socket'],
  ['systemd/vhostd-net@.service', 'etc/systemd/system/vhostd-net@.service'],
  ['systemd/vhostd-net@.socket', 'etc/systemd/system/vhostd-net@.socket'],
  ['share/qemu/vhost-user/50-vhostd-blk.json', 'usr/share/qemu/vhost-user/50-vhostd-blk.json'],
  ['share/qemu/vhost-user/50-vhostd-net.json', 'usr/share/qemu/vhost-user/50-vhostd-net.json'],
];

describe('npm run install-units', () => {
  it('creates the user, group, directories, units and descriptors, then finds nothing to change', () => {
    const first = install();
    expect(first.stderr).toBe('');
    expect(first.status).toBe(0);
    expect(first.stdout).toMatch(/created system group kvm/);
    expect(first.stdout).toMatch(/created system user vhostd \(primary group kvm\)/);
    expect(first.stdout).toMatch(/added libvirt-qemu to group kvm/);
    expect(first.stdout).toMatch(/no daemon-reload/);

    const passwd = readFileSync(join(dest, 'etc/passwd'), 'utf8');
    const group = readFileSync(join(dest, 'etc/group'), 'utf8');
    const kvm = group.split('\n').find((l) => l.startsWith('kvm:'))!.split(':');
    const vhostd = passwd.split('\n').find((l) => l.startsWith('vhostd:'))!.split(':');
    expect(vhostd[3]).toBe(kvm[2]); // primary group kvm
    expect(vhostd[6]).toBe('/usr/sbin/nologin');
    expect(kvm[3]!.split(',')).toContain('libvirt-qemu');

    for (const [path, mode] of [['run/vhostd', 0o755], ['var/lib/vhostd', 0o750]] as const) {
      const st = statSync(join(dest, path));
      expect(st.mode & 0o7777, path).toBe(mode);
      expect(st.uid, path).toBe(Number(vhostd[2]));
      expect(st.gid, path).toBe(Number(kvm[2]));
    }
    for (const [from, to] of files) {
      // npm's global prefix is /usr on Debian, so the /usr/bin paths stay as shipped; elsewhere they follow npm.
      const bin = join(spawnSync('npm', ['prefix', '-g'], { encoding: 'utf8' }).stdout.trim(), 'bin');
      const want = readFileSync(join(ROOT, from!), 'utf8');
      expect(readFileSync(join(dest, to!), 'utf8'), to).toBe(bin === '/usr/bin' ? want : want.replaceAll('/usr/bin/vhostd', join(bin, 'vhostd')));
      expect(statSync(join(dest, to!)).mode & 0o777).toBe(0o644);
    }

    const second = install();
    expect(second.status).toBe(0);
    expect(second.stdout).toMatch(/done: nothing to change/);
    expect(second.stdout).not.toMatch(/created|installed \/|updated/);
    expect(readFileSync(join(dest, 'etc/passwd'), 'utf8')).toBe(passwd);
  });

  it('refuses unknown arguments', () => {
    const r = spawnSync(process.execPath, [join(ROOT, 'scripts/install-units.mjs'), '--bogus'], { encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown argument --bogus/);
  });
});
