// The two systemd interfaces a service uses, in TypeScript over three
// syscall wrappers: socket activation (sd_listen_fds) and readiness,
// status and watchdog notification (sd_notify). No libsystemd, no npm package.
import {
  native,
  AF_UNIX,
  FD_CLOEXEC,
  F_GETFD,
  F_GETFL,
  F_SETFD,
  F_SETFL,
  O_NONBLOCK,
  SOCK_STREAM,
  SOL_SOCKET,
  SO_ACCEPTCONN,
  SO_DOMAIN,
  SO_TYPE,
  ENOTSOCK,
} from './native/index.js';

/** The first fd the service manager passes (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;
const EBADF = 9;

export class ListenFdError extends Error {}

/**
 * sd_listen_fds(unset_environment = 1): the fds passed with LISTEN_FDS when
 * LISTEN_PID names this process, each made close-on-exec. The variables are
 * removed from the environment whether or not they were meant for us, so no
 * child or later call sees them again.
 */
export function listenFds(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number[] {
  const fdsVar = env.LISTEN_FDS;
  const pidVar = env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDNAMES;
  if (fdsVar === undefined || pidVar === undefined) return [];
  if (!/^\d+$/.test(pidVar) || Number(pidVar) !== pid) return [];
  if (!/^\d+$/.test(fdsVar)) throw new ListenFdError(`LISTEN_FDS=${fdsVar} is not a number`);
  const n = Number(fdsVar);
  const fds: number[] = [];
  for (let fd = LISTEN_FDS_START; fd < LISTEN_FDS_START + n; fd++) {
    const flags = native.fcntl(fd, F_GETFD, 0);
    if (flags < 0) throw new ListenFdError(`LISTEN_FDS=${n}, but fd ${fd} is not open (errno ${-flags})`);
    if (!(flags & FD_CLOEXEC)) native.fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    fds.push(fd);
  }
  return fds;
}

/**
 * Check that fd is a listening AF_UNIX stream socket (what QEMU connects to)
 * and make it non-blocking, as vhostd's accept loop expects.
 */
export function prepareListener(fd: number, what: string): void {
  const fail = (why: string): never => {
    throw new ListenFdError(`${what} (fd ${fd}) ${why}`);
  };
  const domain = native.getsockoptInt(fd, SOL_SOCKET, SO_DOMAIN);
  if (domain < 0) fail(domain === -ENOTSOCK ? 'is not a socket' : domain === -EBADF ? 'is not open' : `cannot be inspected (errno ${-domain})`);
  if (domain !== AF_UNIX) fail(`is not an AF_UNIX socket (domain ${domain})`);
  if (native.getsockoptInt(fd, SOL_SOCKET, SO_TYPE) !== SOCK_STREAM) fail('is not a stream socket');
  if (native.getsockoptInt(fd, SOL_SOCKET, SO_ACCEPTCONN) !== 1) fail('is not listening');
  const fl = native.fcntl(fd, F_GETFL, 0);
  if (fl < 0 || native.fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) fail('cannot be made non-blocking');
  const fdf = native.fcntl(fd, F_GETFD, 0);
  if (fdf >= 0 && !(fdf & FD_CLOEXEC)) native.fcntl(fd, F_SETFD, fdf | FD_CLOEXEC);
}

/**
 * sd_notify: state lines as one datagram to NOTIFY_SOCKET (a path, or '@'
 * for the abstract namespace). Without NOTIFY_SOCKET every call is a no-op.
 */
export class Notifier {
  private readonly socket: string | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private lastStatus = '';
  /** The last errno a send failed with (0: none), for tests and logs. */
  lastError = 0;

  constructor(private readonly env: NodeJS.ProcessEnv = process.env) {
    const s = env.NOTIFY_SOCKET;
    this.socket = s && (s.startsWith('/') || s.startsWith('@')) ? s : undefined;
  }

  get enabled(): boolean {
    return this.socket !== undefined;
  }

  /** Send "KEY=value" lines; returns false if there is no socket or the send failed. */
  notify(...lines: string[]): boolean {
    if (!this.socket) return false;
    const rc = native.sendDatagram(this.socket, new TextEncoder().encode(lines.join('\n')));
    this.lastError = rc < 0 ? -rc : 0;
    return rc >= 0;
  }

  ready(status: string): void {
    this.lastStatus = status;
    this.notify('READY=1', `STATUS=${status}`, `MAINPID=${process.pid}`);
  }

  status(status: string): void {
    if (status === this.lastStatus) return;
    this.lastStatus = status;
    this.notify(`STATUS=${status}`);
  }

  stopping(status: string): void {
    this.stopWatchdog();
    this.lastStatus = status;
    this.notify('STOPPING=1', `STATUS=${status}`);
  }

  /**
   * The watchdog interval sd_watchdog_enabled() reports, in microseconds:
   * WATCHDOG_USEC when set and WATCHDOG_PID is unset or names this process.
   */
  watchdogUsec(pid = process.pid): number | undefined {
    const usec = this.env.WATCHDOG_USEC;
    const wpid = this.env.WATCHDOG_PID;
    if (!usec || !/^\d+$/.test(usec) || Number(usec) === 0) return undefined;
    if (wpid !== undefined && wpid !== '' && Number(wpid) !== pid) return undefined;
    return Number(usec);
  }

  /**
   * WATCHDOG=1 every half interval, from a timer on this (the main) event
   * loop: if the loop stops turning, the pings stop and systemd acts.
   */
  startWatchdog(): number | undefined {
    const usec = this.watchdogUsec();
    if (!this.socket || usec === undefined) return undefined;
    const ms = Math.max(1, Math.floor(usec / 2000));
    this.notify('WATCHDOG=1');
    this.watchdog = setInterval(() => this.notify('WATCHDOG=1'), ms);
    this.watchdog.unref();
    return ms;
  }

  stopWatchdog(): void {
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = undefined;
  }
}
