// The listening socket. One front-end is served at a time (a device has one
// driver); when it goes away the device is reset and the next one is accepted.
import { lstatSync, unlinkSync } from 'node:fs';
import type { Logger } from 'pino';
import type { Device } from '../device.js';
import { native, EAGAIN, POLL_READABLE, type WatchHandle } from '../native/index.js';
import { Connection } from './connection.js';
import type { Placement } from '../ring/placement.js';

export class SocketInUseError extends Error {}

/**
 * Remove a stale socket left by a crashed process; refuse a live one or
 * anything that is not a socket.
 */
export function claimSocketPath(path: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new SocketInUseError(`${path} exists and is not a socket; refusing to replace it`);
  const fd = native.connect(path);
  if (fd >= 0) {
    native.close(fd);
    throw new SocketInUseError(`${path} is in use: another process is listening on it`);
  }
  unlinkSync(path);
}

/** First and largest wait between connection attempts in client mode. */
export const BACKOFF_MIN_MS = 50;
export const BACKOFF_MAX_MS = 2000;

export class Server {
  private listenFd = -1;
  private watch: WatchHandle | undefined;
  private ino = 0;
  private conn: Connection | undefined;
  private connections = 0;
  private closing = false;
  /** A front-end that connected while the last one was being torn down: adopted once that is done. */
  private next: number | undefined;

  /** The listening socket was handed to us (systemd, --fd): never unlink its path. */
  private adopted = false;
  /** Called after a front-end connects (with its id) and after it goes away (undefined). */
  onChange: ((conn: number | undefined) => void) | undefined;

  private retry: NodeJS.Timeout | undefined;
  private backoff = BACKOFF_MIN_MS;
  private failures = 0;

  constructor(
    readonly path: string,
    private readonly device: Device,
    private readonly placement: Placement,
    private readonly log: Logger,
  ) {}

  /**
   * Client mode: connect to a front-end listening on the path (QEMU with
   * server=on), and connect again, with backoff, whenever it goes away.
   */
  connect(): void {
    this.retry = undefined;
    if (this.closing) return;
    const fd = native.connect(this.path);
    if (fd < 0) {
      // Say it once, then quietly keep trying: the front-end may simply not be up yet.
      if (this.failures++ === 0) this.log.info({ socket: this.path, errno: -fd }, 'front-end not reachable yet; retrying with backoff');
      this.retry = setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
      return;
    }
    this.failures = 0;
    this.backoff = BACKOFF_MIN_MS;
    const conn = this.adopt(fd);
    void conn.done.then(() => {
      if (!this.closing) this.retry = setTimeout(() => this.connect(), BACKOFF_MIN_MS);
    });
  }

  listen(): void {
    claimSocketPath(this.path);
    this.listenFd = native.listen(this.path, 16);
    this.ino = lstatSync(this.path).ino;
    this.watch = native.watch(this.listenFd, POLL_READABLE, () => this.onAccept());
    this.log.info({ socket: this.path }, 'listening');
  }

  /**
   * Serve on a socket that is already bound and listening (socket activation,
   * --fd). It belongs to whoever passed it: on close only our fd is closed,
   * the path stays, so the next instance (or QEMU's reconnect) finds it.
   */
  adoptListener(fd: number): void {
    this.listenFd = fd;
    this.adopted = true;
    this.watch = native.watch(this.listenFd, POLL_READABLE, () => this.onAccept());
    this.log.info({ socket: this.path, fd }, 'serving on an inherited listening socket');
  }

  /** Front-ends accepted so far; the id of the latest. */
  get connectionCount(): number {
    return this.connections;
  }

  get inherited(): boolean {
    return this.adopted;
  }

  get active(): Connection | undefined {
    return this.conn;
  }

  private onAccept(): void {
    for (;;) {
      const fd = native.accept(this.listenFd);
      if (fd === -EAGAIN) return;
      if (fd < 0) {
        this.log.warn({ errno: -fd }, 'accept failed');
        return;
      }
      if (this.conn?.closed && !this.next && !this.closing) {
        // The last front-end left and its queues are still draining (queue threads answer
        // asynchronously): take the new one as soon as the device is reset, as QEMU would on retry.
        this.next = fd;
        continue;
      }
      if (this.conn || this.closing) {
        this.log.warn('refusing a second front-end: the device already has one');
        native.close(fd);
        continue;
      }
      this.adopt(fd);
    }
  }

  private adopt(fd: number): Connection {
    const id = ++this.connections;
    const conn = new Connection(fd, this.device, this.placement, this.log.child({ conn: id }));
    this.conn = conn;
    this.log.info({ conn: id }, 'front-end connected');
    this.onChange?.(id);
    void conn.done.then(() => {
      if (this.conn === conn) this.conn = undefined;
      this.log.info({ conn: id }, 'connection closed; device reset, waiting for the next front-end');
      const next = this.next;
      this.next = undefined;
      if (next !== undefined) {
        if (this.closing) native.close(next);
        else return void this.adopt(next);
      }
      if (!this.closing) this.onChange?.(undefined);
    });
    return conn;
  }

  /** Stop accepting, drain and close the active connection, remove the socket. */
  async close(): Promise<void> {
    this.closing = true;
    if (this.retry) clearTimeout(this.retry);
    if (this.watch) native.unwatch(this.watch);
    this.watch = undefined;
    if (this.listenFd >= 0) native.close(this.listenFd);
    this.listenFd = -1;
    this.unlinkOwnSocket();
    if (this.conn) await this.conn.close();
  }

  private unlinkOwnSocket(): void {
    try {
      // Only our own socket: another instance may have replaced it since.
      if (this.adopted) return;
      if (this.ino && lstatSync(this.path).ino === this.ino) unlinkSync(this.path);
    } catch {
      /* already gone */
    }
  }
}
