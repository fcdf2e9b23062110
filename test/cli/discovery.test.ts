// QEMU's "Backend program conventions" (vhost-user.rst): --print-capabilities
// prints a VHostUserBackendCapabilities object and exits, the standard options
// work, and the descriptors shipped for /usr/share/qemu/vhost-user conform to
// the VhostUserBackend type of vhost-user.json.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DAEMON } from '../e2e/daemons.js';
import { check } from './vhost-user-schema.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { bin: Record<string, string> };

function run(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  // stdin is /dev/null: a pipe would be an AF_UNIX socket as fd 0.
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe'] });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhostd-disc-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('--print-capabilities', () => {
  it.each([
    ['blk', { type: 'block', features: ['read-only', 'blk-file'] }],
    ['net', { type: 'net' }],
  ])('vhostd %s prints capabilities that conform to VHostUserBackendCapabilities', (kind, want) => {
    // Other options are ignored, as the convention asks; nothing is opened or bound.
    const r = run(process.execPath, [DAEMON, kind, '--print-capabilities', '--socket-path', join(dir, 'never.sock'), '--bogus']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const caps: unknown = JSON.parse(r.stdout);
    expect(check(caps, 'VHostUserBackendCapabilities')).toEqual([]);
    expect(caps).toEqual(want);
  });

  it.each(['blk', 'net'])('the vhostd-%s wrapper prints the same', (kind) => {
    const wrapper = join(root, pkg.bin[`vhostd-${kind}`]!);
    const viaWrapper = run(wrapper, ['--print-capabilities']);
    const direct = run(process.execPath, [DAEMON, kind, '--print-capabilities']);
    expect(viaWrapper.status).toBe(0);
    expect(viaWrapper.stdout).toBe(direct.stdout);
  });

  it('needs a device kind', () => {
    const r = run(process.execPath, [DAEMON, '--print-capabilities']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/needs a device/);
  });

  it('the checker rejects what the schema does not allow', () => {
    expect(check({ type: 'disk' }, 'VHostUserBackendCapabilities')).not.toEqual([]);
    expect(check({ type: 'block', features: ['discard'] }, 'VHostUserBackendCapabilities')).not.toEqual([]);
    expect(check({ type: 'net', features: [] }, 'VHostUserBackendCapabilities')).not.toEqual([]);
    expect(check({ type: 'block', binary: '/x' }, 'VhostUserBackend')).not.toEqual([]);
  });
});

describe('vhost-user descriptors', () => {
  it.each([
    ['50-vhostd-blk.json', 'block', 'vhostd-blk'],
    ['50-vhostd-net.json', 'net', 'vhostd-net'],
  ])('%s is a VhostUserBackend naming an installed executable', (file, type, bin) => {
    const desc = JSON.parse(readFileSync(join(root, 'share/qemu/vhost-user', file), 'utf8')) as Record<string, unknown>;
    expect(check(desc, 'VhostUserBackend')).toEqual([]);
    expect(desc.type).toBe(type);
    // npm install -g puts package.json's bin entries in /usr/bin (prefix /usr on Debian).
    expect(desc.binary).toBe(`/usr/bin/${bin}`);
    expect(pkg.bin[bin]).toBeDefined();
    // The binary's capabilities agree with the descriptor's type.
    const caps = JSON.parse(run(join(root, pkg.bin[bin]!), ['--print-capabilities']).stdout) as { type: string };
    expect(caps.type).toBe(type);
  });
});

describe('standard options', () => {
  it('--socket-path, --blk-file and --read-only are --socket, --file and --readonly', async () => {
    const image = join(dir, 'ro.img');
    writeFileSync(image, '');
    truncateSync(image, 8 << 20);
    const sock = join(dir, 'std.sock');
    const help = run(process.execPath, [DAEMON, 'blk', '--help']).stdout;
    for (const o of ['--socket-path', '--fd', '--print-capabilities', '--blk-file', '--read-only']) expect(help).toContain(o);
    const child = spawn(process.execPath, [DAEMON, 'blk', '--socket-path', sock, '--blk-file', image, '--read-only'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = new Promise<number | null>((res) => child.once('close', res));
    for (let i = 0; i < 400 && !out.includes('# attach with'); i++) await new Promise((res) => setTimeout(res, 25));
    child.kill('SIGTERM');
    expect(await code).toBe(0);
    const r = { stdout: out };
    expect(r.stdout).toMatch(/"readonly":true/);
    expect(r.stdout).toContain(`path=${sock}`);
    expect(r.stdout).toMatch(/"msg":"stopped"/);
  });

  it.each([
    [['--fd', '3', '--socket-path', 'x.sock'], /--fd and --socket-path are incompatible/],
    [['--fd', '3', '--client'], /--fd and --client are incompatible/],
    [['--fd', '0'], /--fd \(fd 0\) is not a socket/],
    [['--fd', '97'], /--fd \(fd 97\) is not open/],
  ])('rejects %j with one line and exit 2', (args, re) => {
    const image = join(dir, 'fd.img');
    writeFileSync(image, '');
    truncateSync(image, 1 << 20);
    const r = run(process.execPath, [DAEMON, 'blk', '--file', image, ...args]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(re);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });
});
