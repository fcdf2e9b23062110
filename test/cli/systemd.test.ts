// vhostd as systemd runs it, without systemd as PID 1: socket activation
// through systemd-socket-activate and through an inherited fd 3 (the same
// socket across restarts), --fd, and the sd_notify datagrams (READY, STATUS,
// WATCHDOG, STOPPING) caught on a socket this test listens on.
import { spawn } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../src/native/index.js';
import { S } from '../driver/blk.js';
import { Session } from '../driver/session.js';
import { DAEMON } from '../e2e/daemons.js';
import { listeningSocket, NotifySocket, runWithListenFd, waitForOutput } from '../support/systemd.js';

let dir: string;
let image: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vhostd-sd-'));
  image = join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 16 << 20);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** One write and read-back through a protocol-level front-end, then QEMU's stop order. */
async function blkRoundTrip(socket: string, sector: number): Promise<void> {
  const s = await Session.open(socket);
  try {
    await s.startDevice({ queues: 1 });
    const data = new Uint8Array(4096).map((_, i) => (i * 7 + sector) & 0xff);
    expect((await s.blk[0]!.write(sector, data)).status).toBe(S.OK);
    const r = await s.blk[0]!.read(sector, data.length);
    expect(r.status).toBe(S.OK);
    expect(Buffer.from(r.data).equals(Buffer.from(data))).toBe(true);
    await s.stopDevice();
  } finally {
    s.close();
  }
}

describe('socket activation', () => {
  it('systemd-socket-activate: serves blk I/O on the passed socket, notifies, and leaves the socket in place', async () => {
    const sock = join(dir, 'act.sock');
    const notify = await NotifySocket.open(`@vhostd-test-${process.pid}-act`);
    const child = spawn(
      'systemd-socket-activate',
      ['-l', sock, '-E', `NOTIFY_SOCKET=${notify.address}`, process.execPath, DAEMON, 'blk', '--blk-file', image, '--socket-path', sock],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = new Promise<number | null>((r) => child.once('close', r));
    try {
      await waitForOutput(() => out, /Listening on/);
      // The first connection makes systemd-socket-activate exec vhostd (as a .socket unit starts its service).
      await blkRoundTrip(sock, 8);
      expect(out).toMatch(/"msg":"serving on an inherited listening socket"/);
      const ready = notify.messages.find((m) => m.includes('READY=1'));
      expect(ready).toBeDefined();
      expect(ready).toMatch(/^STATUS=blk: waiting for a front-end on .*act\.sock; 1 queue offered$/m);
      expect(ready).toMatch(new RegExp(`^MAINPID=${child.pid}$`, 'm'));
      await notify.waitFor((l) => /^STATUS=blk: front-end connected \(connection 1\); queues: /.test(l), 5000, 'a connected STATUS');
      const waitingAgain = (): boolean => {
        const ls = notify.lines();
        return ls.slice(ls.findIndex((l) => l.includes('front-end connected'))).some((l) => l.startsWith('STATUS=blk: waiting'));
      };
      for (let i = 0; i < 250 && !waitingAgain(); i++) await new Promise((r) => setTimeout(r, 20));
      expect(waitingAgain(), notify.lines().join('\n')).toBe(true);
      // A second front-end after the first left, on the same socket.
      await blkRoundTrip(sock, 16);
      child.kill('SIGTERM');
      expect(await code).toBe(0);
      await notify.waitFor((l) => l === 'STOPPING=1', 5000, 'STOPPING=1');
      expect(notify.lines().filter((l) => l === 'READY=1')).toHaveLength(1);
      // The socket belongs to the service manager: still there after vhostd exits.
      expect(lstatSync(sock).isSocket()).toBe(true);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      notify.close();
    }
  }, 60_000);

  it('the same listening socket serves across a SIGKILL and a restart, and a front-end queued meanwhile is taken', async () => {
    const sock = join(dir, 'same.sock');
    const lfd = listeningSocket(sock);
    const notify = await NotifySocket.open(join(dir, 'notify-same'));
    const argv = [process.execPath, DAEMON, 'blk', '--blk-file', image, '--socket-path', sock];
    try {
      let d = runWithListenFd(lfd, argv, { NOTIFY_SOCKET: notify.address });
      await waitForOutput(d.output, /vhost-user-blk ready/);
      await blkRoundTrip(sock, 100);
      d.child.kill('SIGKILL');
      await d.exited;
      // Nobody accepts now, yet a connect succeeds: it waits in the socket's backlog.
      const pending = Session.open(sock);
      d = runWithListenFd(lfd, argv, { NOTIFY_SOCKET: notify.address });
      const s = await pending;
      try {
        await s.startDevice({ queues: 1 });
        expect((await s.blk[0]!.read(100, 512)).status).toBe(S.OK);
        await s.stopDevice();
      } finally {
        s.close();
      }
      expect(await d.stop()).toBe(0);
      expect(notify.lines().filter((l) => l === 'READY=1')).toHaveLength(2);
      expect(lstatSync(sock).isSocket()).toBe(true);
      expect(d.output()).toMatch(/"fd":3,"msg":"serving on an inherited listening socket"/);
    } finally {
      native.close(lfd);
      notify.close();
    }
  }, 60_000);

  it('LISTEN_PID naming another process is ignored: vhostd binds its own socket and removes it on exit', async () => {
    const sock = join(dir, 'own.sock');
    const child = spawn(process.execPath, [DAEMON, 'blk', '--blk-file', image, '--socket-path', sock], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LISTEN_FDS: '1', LISTEN_PID: '1' },
    });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    const code = new Promise<number | null>((r) => child.once('close', r));
    await waitForOutput(() => out, /vhost-user-blk ready/);
    expect(out).toMatch(/"inherited":false/);
    await blkRoundTrip(sock, 24);
    child.kill('SIGTERM');
    expect(await code).toBe(0);
    expect(existsSync(sock)).toBe(false);
  }, 60_000);

  it('--fd serves a listening socket the caller passes', async () => {
    const sock = join(dir, 'fd.sock');
    const lfd = listeningSocket(sock);
    try {
      const child = spawn(process.execPath, [DAEMON, 'blk', '--blk-file', image, '--fd', '3'], { stdio: ['ignore', 'pipe', 'pipe', lfd] });
      let out = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
      const code = new Promise<number | null>((r) => child.once('close', r));
      await waitForOutput(() => out, /vhost-user-blk ready/);
      await blkRoundTrip(sock, 32);
      child.kill('SIGTERM');
      expect(await code).toBe(0);
      expect(lstatSync(sock).isSocket()).toBe(true);
    } finally {
      native.close(lfd);
    }
  }, 60_000);

  it('refuses more than one socket, or a socket that is not listening', async () => {
    const run = (env: NodeJS.ProcessEnv, extra: (number | 'ignore')[]) =>
      new Promise<{ code: number | null; err: string }>((resolve) => {
        const c = spawn('sh', ['-c', `LISTEN_PID=$$ exec '${process.execPath}' '${DAEMON}' blk --blk-file '${image}'`], {
          stdio: ['ignore', 'ignore', 'pipe', ...extra],
          env: { ...process.env, ...env },
        });
        let err = '';
        c.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
        c.once('close', (code) => resolve({ code, err }));
      });
    const a = listeningSocket(join(dir, 'two-a.sock'));
    const b = listeningSocket(join(dir, 'two-b.sock'));
    try {
      const two = await run({ LISTEN_FDS: '2' }, [a, b]);
      expect(two.code).toBe(2);
      expect(two.err).toMatch(/passed 2 sockets \(LISTEN_FDS\); vhostd serves exactly one/);
      const conn = native.connect(join(dir, 'two-a.sock'));
      const notListening = await run({ LISTEN_FDS: '1' }, [conn]);
      native.close(conn);
      expect(notListening.code).toBe(2);
      expect(notListening.err).toMatch(/socket activation \(LISTEN_FDS\) \(fd 3\) is not listening/);
    } finally {
      native.close(a);
      native.close(b);
    }
  }, 60_000);
});

describe('sd_notify watchdog', () => {
  it('sends WATCHDOG=1 every half of WATCHDOG_USEC, and none when WATCHDOG_PID names another process', async () => {
    for (const [watchdogPid, expectPings] of [[undefined, true], ['1', false]] as const) {
      const sock = join(dir, `wd-${expectPings}.sock`);
      const lfd = listeningSocket(sock);
      const notify = await NotifySocket.open(`@vhostd-test-${process.pid}-wd-${expectPings}`);
      const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: notify.address, WATCHDOG_USEC: '400000' };
      if (watchdogPid) env.WATCHDOG_PID = watchdogPid;
      const d = runWithListenFd(lfd, [process.execPath, DAEMON, 'blk', '--blk-file', image, '--socket-path', sock], env);
      try {
        await notify.waitFor((l) => l === 'READY=1', 20_000, 'READY=1');
        const before = notify.lines().filter((l) => l === 'WATCHDOG=1').length;
        await new Promise((r) => setTimeout(r, 1500));
        const pings = notify.lines().filter((l) => l === 'WATCHDOG=1').length - before;
        // 200 ms apart: about 7 in 1.5 s; a loaded machine may delay a few.
        if (expectPings) expect(pings).toBeGreaterThanOrEqual(4);
        else expect(pings).toBe(0);
        if (expectPings) expect(pings).toBeLessThanOrEqual(9);
        expect(await d.stop()).toBe(0);
        await notify.waitFor((l) => l === 'STOPPING=1', 5000, 'STOPPING=1');
        expect(notify.lines().at(-1)).toMatch(/^STATUS=blk: stopping \(SIGTERM\)/);
      } finally {
        if (d.child.exitCode === null) d.child.kill('SIGKILL');
        native.close(lfd);
        notify.close();
      }
    }
  }, 60_000);
});
