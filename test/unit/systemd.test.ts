// The sd_listen_fds and sd_watchdog_enabled rules, on a fake environment.
import { describe, expect, it } from 'vitest';
import { listenFds, Notifier } from '../../src/systemd.js';

describe('listenFds', () => {
  it('ignores and removes variables meant for another process', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_FDS: '1', LISTEN_PID: String(process.pid + 1), LISTEN_FDNAMES: 'x', OTHER: 'kept' };
    expect(listenFds(env)).toEqual([]);
    expect(env).toEqual({ OTHER: 'kept' });
  });

  it('returns nothing without LISTEN_PID, and nothing for LISTEN_FDS=0', () => {
    expect(listenFds({ LISTEN_FDS: '1' })).toEqual([]);
    const env: NodeJS.ProcessEnv = { LISTEN_FDS: '0', LISTEN_PID: String(process.pid) };
    expect(listenFds(env)).toEqual([]);
    expect(env).toEqual({});
  });

  it('refuses a malformed count, and fds that are not open', () => {
    expect(() => listenFds({ LISTEN_FDS: 'two', LISTEN_PID: String(process.pid) })).toThrow(/LISTEN_FDS=two is not a number/);
    expect(() => listenFds({ LISTEN_FDS: '1000', LISTEN_PID: String(process.pid) })).toThrow(/is not open/);
  });
});

describe('Notifier', () => {
  it('is a no-op without NOTIFY_SOCKET, and ignores a relative one', () => {
    expect(new Notifier({}).enabled).toBe(false);
    expect(new Notifier({ NOTIFY_SOCKET: 'relative' }).enabled).toBe(false);
    expect(new Notifier({}).notify('READY=1')).toBe(false);
  });

  it('reports a send failure as an errno, never throws', () => {
    const n = new Notifier({ NOTIFY_SOCKET: '@vhostd-unit-nobody-listens' });
    expect(n.notify('READY=1')).toBe(false);
    expect(n.lastError).toBe(111); // ECONNREFUSED
  });

  it('enables the watchdog as sd_watchdog_enabled does', () => {
    const pid = process.pid;
    expect(new Notifier({ WATCHDOG_USEC: '2000000' }).watchdogUsec(pid)).toBe(2_000_000);
    expect(new Notifier({ WATCHDOG_USEC: '2000000', WATCHDOG_PID: String(pid) }).watchdogUsec(pid)).toBe(2_000_000);
    expect(new Notifier({ WATCHDOG_USEC: '2000000', WATCHDOG_PID: String(pid + 1) }).watchdogUsec(pid)).toBeUndefined();
    expect(new Notifier({ WATCHDOG_USEC: '0' }).watchdogUsec(pid)).toBeUndefined();
    expect(new Notifier({ WATCHDOG_USEC: 'soon' }).watchdogUsec(pid)).toBeUndefined();
    expect(new Notifier({}).watchdogUsec(pid)).toBeUndefined();
  });
});
