// The command line as a user meets it: errors are one clear line and exit 2,
// no socket is left behind, stale sockets are replaced, live ones refused.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../src/native/index.js';
import { DAEMON, startVhostd } from '../e2e/daemons.js';

let dir: string;
let image: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhostd-cli-'));
  image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 16 << 20);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function vhostd(...args: string[]): { status: number | null; stderr: string; stdout: string } {
  const r = spawnSync(process.execPath, [DAEMON, ...args], { encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stderr: r.stderr, stdout: r.stdout };
}

describe('vhostd CLI', () => {
  it('prints help for blk', () => {
    const r = vhostd('blk', '--help');
    expect(r.status).toBe(0);
    for (const opt of ['--socket', '--file', '--readonly', '--num-queues', '--direct', '--aio', '--serial', '--logical-block-size', '--control', '--metrics', '--id', '--log-level']) {
      expect(r.stdout).toContain(opt);
    }
  });

  it.each([
    [['blk', '--num-queues', '0'], /--num-queues must be an integer in 1\.\.64/],
    [['blk', '--num-queues', 'two'], /--num-queues/],
    [['blk', '--logical-block-size', '1024'], /--logical-block-size must be 512 or 4096/],
    [['blk', '--serial', 'x'.repeat(21)], /--serial must be at most 20 bytes/],
    [['blk', '--bogus'], /Unknown argument: bogus/],
    [['net', '--num-queues', '2', '--threads', '3'], /--threads must be an integer in 0\.\.2/],
    [['net', '--threads', '-1'], /--threads must be an integer in 0\.\.1/],
    [['frobnicate'], /Unknown arguments?: .*frobnicate/],
    [[], /name a command/],
  ])('rejects %j with one clear line and exit 2', (args, re) => {
    const sock = join(dir, 'never.sock');
    const r = vhostd(...args, ...(args.length ? ['--socket', sock] : []));
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(re);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(existsSync(sock)).toBe(false);
  });

  it('reports a missing image and leaves no socket', () => {
    const sock = join(dir, 'missing.sock');
    const r = vhostd('blk', '--socket', sock, '--file', join(dir, 'nope.img'));
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/cannot open image .*nope\.img: ENOENT/);
    expect(existsSync(sock)).toBe(false);
  });

  it('refuses a socket path that a live daemon owns, and the live one keeps serving', async () => {
    const sock = join(dir, 'busy.sock');
    const first = await startVhostd(['--file', image], sock);
    try {
      const r = vhostd('blk', '--socket', sock, '--file', image);
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(/is in use: another process is listening on it/);
      const fd = native.connect(sock);
      expect(fd).toBeGreaterThanOrEqual(0);
      native.close(fd);
    } finally {
      expect(await first.stop()).toBe(0);
    }
    expect(existsSync(sock)).toBe(false); // removed on clean exit
  });

  it('replaces a stale socket left by a crashed daemon', async () => {
    const sock = join(dir, 'stale.sock');
    const fd = native.listen(sock, 1);
    native.close(fd); // socket file remains, nobody listens
    expect(lstatSync(sock).isSocket()).toBe(true);
    const d = await startVhostd(['--file', image], sock);
    expect(await d.stop()).toBe(0);
  });

  it('refuses to replace a file that is not a socket', () => {
    const path = join(dir, 'not-a-socket');
    writeFileSync(path, 'keep me');
    const r = vhostd('blk', '--socket', path, '--file', image);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/exists and is not a socket/);
    expect(readFileSync(path, 'utf8')).toBe('keep me');
  });

  // Into a pipe it logs pino JSON: every protocol test parses those lines.
  it('logs readable lines on a terminal', async () => {
    const sock = join(dir, 'tty.sock');
    const cmd = `exec ${process.execPath} ${DAEMON} blk --socket ${sock} --file ${image} --id tty-disk`;
    // script(1) gives the daemon a pseudo-terminal for stdout.
    const child = spawn('script', ['-qfec', cmd, '/dev/null'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    const closed = new Promise<void>((r) => child.once('close', () => r()));
    try {
      for (let i = 0; i < 200 && !/ready/.test(out); i++) await new Promise((r) => setTimeout(r, 50));
      const plain = out.replace(/\x1b\[[0-9;]*m/g, '');
      expect(plain).toMatch(/INFO.*vhost-user-blk ready/);
      expect(plain).toMatch(/device: "tty-disk"/);
      expect(plain).not.toMatch(/^\{"level"/m);
    } finally {
      child.kill('SIGTERM');
      await closed;
    }
  });

  it('exits 0 on SIGINT and SIGTERM and removes its socket', async () => {
    for (const sig of ['SIGINT', 'SIGTERM'] as const) {
      const sock = join(dir, `sig-${sig}.sock`);
      const child = spawn(process.execPath, [DAEMON, 'blk', '--socket', sock, '--file', image], { stdio: 'ignore' });
      for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
      expect(existsSync(sock)).toBe(true);
      const code = new Promise<number | null>((r) => child.once('close', r));
      child.kill(sig);
      expect(await code).toBe(0);
      expect(existsSync(sock)).toBe(false);
    }
  });
});

describe('systemd units', () => {
  const unitText = (unit: string): string => readFileSync(new URL(`../../systemd/${unit}`, import.meta.url), 'utf8');
  // ExecStart names the installed /usr/bin/vhostd; here it points at this build instead.
  const localCopy = (unit: string): string => {
    const text = unitText(unit);
    if (unit.endsWith('.service')) expect(text).toMatch(/^ExecStart=\/usr\/bin\/vhostd /m);
    const copy = join(dir, unit.replace('@.', '@check.'));
    writeFileSync(copy, text.replace(/^ExecStart=\/usr\/bin\/vhostd /m, `ExecStart=${process.execPath} ${DAEMON} `));
    return copy;
  };

  it.each(['blk', 'net'])('vhostd-%s@.service and its .socket pass systemd-analyze verify', (kind) => {
    // The socket unit is verified beside the service it activates.
    const copies = [localCopy(`vhostd-${kind}@.service`), localCopy(`vhostd-${kind}@.socket`)];
    const r = spawnSync('systemd-analyze', ['verify', '--man=no', ...copies], { encoding: 'utf8', cwd: dir });
    expect(r.error).toBeUndefined();
    expect(`${r.stdout}${r.stderr}`.trim()).toBe('');
    expect(r.status).toBe(0);
  });

  it.each(['blk', 'net'])('vhostd-%s@.service: systemd-analyze security --offline=true rates exposure <= 2.0', (kind) => {
    const r = spawnSync('systemd-analyze', ['security', '--offline=true', '--no-pager', join(fileURLToPath(new URL('../../systemd/', import.meta.url)), `vhostd-${kind}@.service`)], { encoding: 'utf8' });
    expect(r.error).toBeUndefined();
    const m = /Overall exposure level for \S+: (\d+\.\d+)/.exec(r.stdout);
    expect(m, r.stdout + r.stderr).not.toBeNull();
    const exposure = Number(m![1]);
    console.log(`vhostd-${kind}@.service exposure ${exposure}`);
    expect(exposure).toBeLessThanOrEqual(2.0);
    // The number the unit's own comment states is the one systemd computes.
    expect(unitText(`vhostd-${kind}@.service`)).toContain(`rates this unit ${exposure.toFixed(1)}`);
  });

  it.each(['blk', 'net'])('vhostd-%s@.socket: the QEMU group may connect, and the socket outlives the daemon', (kind) => {
    const sock = unitText(`vhostd-${kind}@.socket`);
    for (const line of ['ListenStream=/run/vhostd/%i.sock', 'SocketMode=0660', 'SocketGroup=kvm', 'SocketUser=vhostd', 'RemoveOnStop=no']) {
      expect(sock.split('\n')).toContain(line);
    }
    const svc = unitText(`vhostd-${kind}@.service`).split('\n');
    for (const line of ['Type=notify', 'User=vhostd', 'Group=kvm', 'Restart=on-failure', 'NoNewPrivileges=yes', 'ProtectSystem=strict', 'SystemCallFilter=@system-service @pkey']) {
      expect(svc).toContain(line);
    }
    expect(svc).toContain(kind === 'blk' ? 'CapabilityBoundingSet=' : 'CapabilityBoundingSet=CAP_NET_ADMIN');
    expect(svc).toContain(kind === 'blk' ? 'RestrictAddressFamilies=AF_UNIX' : 'RestrictAddressFamilies=AF_UNIX AF_INET');
  });
});
