// vhostd under the restrictions its units impose, reproduced without systemd:
// setpriv drops to the vhostd user (or a stand-in uid) with no_new_privs, an
// empty capability set for blk and CAP_NET_ADMIN alone for net, inside a mount
// namespace whose file systems are all read-only except the image and runtime
// directories (ProtectSystem=strict + ReadWritePaths/RuntimeDirectory; /tmp is
// read-only too, stricter than PrivateTmp). The seccomp parts (SystemCallFilter,
// RestrictAddressFamilies) cannot be installed here, so strace records every
// system call and socket family the daemon uses while it serves, and the test
// checks them against what the unit allows.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { S } from '../driver/blk.js';
import { Session } from '../driver/session.js';
import { has, VF } from '../driver/wire.js';
import { DAEMON } from '../e2e/daemons.js';
import { Netns } from '../e2e/netns.js';
import { waitForOutput } from '../support/systemd.js';

/** The vhostd user when `npm run install-units` created it; else a uid no account uses, in group kvm's gid (or a stand-in). */
function identity(): { uid: number; gid: number; who: string } {
  const id = spawnSync('id', ['-u', 'vhostd'], { encoding: 'utf8' });
  const kvm = spawnSync('getent', ['group', 'kvm'], { encoding: 'utf8' });
  const gid = kvm.status === 0 ? Number(kvm.stdout.split(':')[2]) : 64_077;
  if (id.status === 0) return { uid: Number(id.stdout.trim()), gid, who: 'vhostd' };
  return { uid: 64_077, gid, who: 'uid 64077 (no vhostd user on this host)' };
}

/** Expand systemd's syscall groups into the set of names a SystemCallFilter= line allows. */
function allowedSyscalls(groups: string[]): Set<string> {
  const out = new Set<string>();
  const expand = (g: string): void => {
    const r = spawnSync('systemd-analyze', ['syscall-filter', '--no-pager', g], { encoding: 'utf8' });
    for (const raw of r.stdout.split('\n').slice(1)) {
      const name = raw.trim();
      if (!name || name.startsWith('#')) continue;
      if (name.startsWith('@')) expand(name);
      else out.add(name);
    }
  };
  groups.forEach(expand);
  return out;
}

function unitLine(unit: string, key: string): string {
  const text = readFileSync(new URL(`../../systemd/${unit}`, import.meta.url), 'utf8');
  const line = text.split('\n').find((l) => l.startsWith(`${key}=`));
  if (!line) throw new Error(`${unit} has no ${key}=`);
  return line.slice(key.length + 1);
}

/** The system calls and socket families in an strace -f log, from node's execve on (setpriv's own calls excluded). */
function traced(log: string): { syscalls: Set<string>; families: Set<string> } {
  const lines = log.split('\n');
  const start = lines.findIndex((l) => /execve\("[^"]*node"/.test(l));
  const syscalls = new Set<string>();
  const families = new Set<string>();
  for (const l of lines.slice(Math.max(0, start))) {
    const m = /^\d+\s+([a-z0-9_]+)\(/.exec(l);
    if (!m) continue;
    syscalls.add(m[1]!);
    const f = /^\d+\s+socket\((AF_[A-Z0-9]+)/.exec(l);
    if (f) families.add(f[1]!);
  }
  return { syscalls, families };
}

/**
 * The restricted launch: a private mount namespace, every ordinary file system
 * remounted read-only but RW, then setpriv to the user with the given
 * capabilities (none: '') and no_new_privs, exec'ing argv under strace.
 */
function restricted(rw: string, caps: string, argv: string[], strace: string, prefix: string[] = []): { child: ChildProcess; output: () => string } {
  const { uid, gid } = identity();
  const capsArgs = caps ? `--inh-caps=-all,+${caps} --ambient-caps=-all,+${caps} --bounding-set=-all,+${caps}` : '--inh-caps=-all --ambient-caps=-all --bounding-set=-all';
  const script = `
set -e
mount --make-rprivate /
mount --bind "$RW" "$RW"
findmnt -rno TARGET -t ext2,ext3,ext4,xfs,btrfs,tmpfs,overlay,vfat,zfs | while read -r m; do
  [ "$m" = "$RW" ] || mount -o remount,ro,bind "$m" 2>/dev/null || true
done
for probe in /vhostd-ro-probe /tmp/vhostd-ro-probe /var/lib/vhostd-ro-probe; do
  if touch "$probe" 2>/dev/null; then rm -f "$probe"; echo "WRITABLE $probe"; exit 9; fi
done
touch "$RW/rw-probe" && rm "$RW/rw-probe"
echo "read-only root: ok"
exec strace -f -qq -o "$STRACE" setpriv --reuid ${uid} --regid ${gid} --clear-groups ${capsArgs} --no-new-privs -- "$@"
`;
  const cmd = [...prefix, 'unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'sh', ...argv];
  const child = spawn(cmd[0]!, cmd.slice(1), {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RW: rw, STRACE: strace },
  });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  return { child, output: () => out };
}

function procStatus(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const l of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const i = l.indexOf(':');
    if (i > 0) out[l.slice(0, i)] = l.slice(i + 1).trim();
  }
  return out;
}

/** The daemon process: the node that strace runs under setpriv (a descendant of the launched sh). */
function daemonPid(root: number): number {
  const kids = (pid: number): number[] => {
    try {
      return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    } catch {
      return [];
    }
  };
  const queue = [root];
  while (queue.length) {
    const p = queue.shift()!;
    try {
      if (readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'node' && p !== root) return p;
    } catch {
      /* gone */
    }
    queue.push(...kids(p));
  }
  throw new Error(`no node process under ${root}`);
}

/** On failure: the daemon first (strace would only detach from it), then the wrapper. */
function killTree(child: ChildProcess): void {
  if (child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(daemonPid(child.pid!), 'SIGKILL');
  } catch {
    /* not started or gone */
  }
  child.kill('SIGKILL');
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync('/tmp/vhostd-restrict-');
  chmodSync(dir, 0o755);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function rwTree(name: string): { rw: string; run: string; images: string } {
  const { uid, gid } = identity();
  const rw = join(dir, name);
  const run = join(rw, 'run');
  const images = join(rw, 'images');
  for (const d of [rw, run, images]) {
    mkdirSync(d, { recursive: true });
    chownSync(d, uid, gid);
    chmodSync(d, 0o750);
  }
  chmodSync(rw, 0o755);
  return { rw, run, images };
}

describe('vhostd under its units\' restrictions', () => {
  it('blk: no capabilities, no_new_privs, read-only root: serves I/O from a protocol driver', async () => {
    const { uid, gid, who } = identity();
    const { rw, run, images } = rwTree('blk');
    const image = join(images, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 16 << 20);
    chownSync(image, uid, gid);
    chmodSync(image, 0o600);
    const sock = join(run, 'blk.sock');
    const log = join(rw, 'strace.log'); // inside the one writable tree
    const d = restricted(rw, '', [process.execPath, DAEMON, 'blk', '--socket-path', sock, '--blk-file', image], log);
    const code = new Promise<number | null>((r) => d.child.once('close', r));
    try {
      await Promise.race([waitForOutput(d.output, /vhost-user-blk ready/, 30_000), code.then((c) => Promise.reject(new Error(`exited ${c}:\n${d.output()}`)))]);
      expect(d.output()).toContain('read-only root: ok');
      const pid = daemonPid(d.child.pid!);
      const st = procStatus(pid);
      expect(st.Uid!.split(/\s+/)[0]).toBe(String(uid));
      expect(st.Gid!.split(/\s+/)[0]).toBe(String(gid));
      expect(st.NoNewPrivs).toBe('1');
      for (const k of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) expect(st[k], k).toBe('0000000000000000');
      const s = await Session.open(sock);
      try {
        await s.startDevice({ queues: 1 });
        for (let i = 0; i < 8; i++) {
          const data = new Uint8Array(16384).map((_, j) => (i * 31 + j) & 0xff);
          expect((await s.blk[0]!.write(i * 64, data)).status).toBe(S.OK);
          const r = await s.blk[0]!.read(i * 64, data.length);
          expect(Buffer.from(r.data).equals(Buffer.from(data))).toBe(true);
        }
        expect((await s.blk[0]!.flush()).status).toBe(S.OK);
        await s.stopDevice();
      } finally {
        s.close();
      }
      // As systemd does: SIGTERM to the main process (strace, its parent, would detach instead).
      process.kill(pid, 'SIGTERM');
      expect(await code).toBe(0);
      console.log(`restricted blk ran as ${who}`);
    } finally {
      killTree(d.child);
    }
    const t = traced(readFileSync(log, 'utf8'));
    // The trace saw the daemon serve: its accept, the guest memory mapping, the image I/O (io_uring).
    for (const c of ['accept4', 'recvmsg', 'mmap', 'eventfd2', 'io_uring_setup', 'io_uring_enter']) expect(t.syscalls.has(c), c).toBe(true);
    const allowed = allowedSyscalls(unitLine('vhostd-blk@.service', 'SystemCallFilter').split(/\s+/));
    expect([...t.syscalls].filter((c) => !allowed.has(c)), 'system calls outside SystemCallFilter=').toEqual([]);
    const families = new Set(unitLine('vhostd-blk@.service', 'RestrictAddressFamilies').split(/\s+/));
    expect([...t.families].filter((f) => !families.has(f)), 'socket families outside RestrictAddressFamilies=').toEqual([]);
  }, 120_000);

  it('net: CAP_NET_ADMIN alone creates and brings up the tap and serves a front-end; without it, exit 2', async () => {
    // Debian's udev creates /dev/net/tun mode 0666; a machine without udev may leave it 0600, which no unprivileged daemon can open.
    const tunMode = statSync('/dev/net/tun').mode & 0o777;
    if ((tunMode & 0o006) !== 0o006) chmodSync('/dev/net/tun', 0o666);
    const ns = new Netns('rst');
    try {
      const { rw, run } = rwTree('net');
      const sock = join(run, 'net.sock');
      const log = join(rw, 'strace.log');
      const d = restricted(rw, 'net_admin', [process.execPath, DAEMON, 'net', '--socket-path', sock, '--tap', 'vhdrst0'], log, ['ip', 'netns', 'exec', ns.name]);
      const code = new Promise<number | null>((r) => d.child.once('close', r));
      try {
        await Promise.race([waitForOutput(d.output, /vhost-user-net ready/, 30_000), code.then((c) => Promise.reject(new Error(`exited ${c}:\n${d.output()}`)))]);
        const pid = daemonPid(d.child.pid!);
        const st = procStatus(pid);
        expect(st.NoNewPrivs).toBe('1');
        // CAP_NET_ADMIN is bit 12.
        for (const k of ['CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) expect(st[k], k).toBe('0000000000001000');
        expect(ns.ip('link show vhdrst0')).toMatch(/[<,]UP[,>]/);
        const s = await Session.open(sock);
        try {
          await s.negotiate({ protocolFeatures: 0n });
          expect(has(s.offeredFeatures, VF.VERSION_1)).toBe(true);
        } finally {
          s.close();
        }
        process.kill(pid, 'SIGTERM');
        expect(await code).toBe(0);
      } finally {
        killTree(d.child);
      }
      const t = traced(readFileSync(log, 'utf8'));
      const allowed = allowedSyscalls(unitLine('vhostd-net@.service', 'SystemCallFilter').split(/\s+/));
      expect([...t.syscalls].filter((c) => !allowed.has(c)), 'system calls outside SystemCallFilter=').toEqual([]);
      const families = new Set(unitLine('vhostd-net@.service', 'RestrictAddressFamilies').split(/\s+/));
      expect([...t.families].filter((f) => !families.has(f)), 'socket families outside RestrictAddressFamilies=').toEqual([]);
      expect(t.families.has('AF_INET')).toBe(true); // the interface ioctls' socket

      // The same without the capability: a clear refusal, not a crash.
      const { rw: rw2, run: run2 } = rwTree('net-nocap');
      const n = restricted(rw2, '', [process.execPath, DAEMON, 'net', '--socket-path', join(run2, 'n.sock'), '--tap', 'vhdrst1'], join(rw2, 'strace.log'), ['ip', 'netns', 'exec', ns.name]);
      const ncode = await new Promise<number | null>((r) => n.child.once('close', r));
      expect(ncode).toBe(2);
      expect(n.output()).toMatch(/vhostd needs CAP_NET_ADMIN/);
    } finally {
      ns.destroy();
      chmodSync('/dev/net/tun', tunMode);
    }
  }, 120_000);
});
