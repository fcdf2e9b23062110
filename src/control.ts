// The control socket: a local, owner-only Unix socket where `vhostd stats`
// asks for a snapshot. One request line in ("stats"), one JSON line out, then
// the daemon closes. Whoever connects is bounded like any peer: a short
// request, a few clients at once, a deadline.
import { chmodSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server as NetServer, type Socket } from 'node:net';
import type { Logger } from 'pino';

const MAX_REQUEST = 256;
const MAX_CLIENTS = 16;
const CLIENT_TIMEOUT_MS = 5000;

/** The control socket path for a vhost-user socket: `.ctl` in place of `.sock` (or added). */
export function defaultControlPath(socket: string): string {
  return socket.endsWith('.sock') ? `${socket.slice(0, -'.sock'.length)}.ctl` : `${socket}.ctl`;
}

export class ControlServer {
  private readonly server: NetServer;
  private clients = 0;

  private constructor(
    readonly path: string,
    server: NetServer,
  ) {
    this.server = server;
  }

  /** Listen on `path`, answering with `handle(command)`; a stale socket file from a dead daemon is replaced. */
  static async listen(path: string, handle: (command: string) => unknown | Promise<unknown>, log: Logger): Promise<ControlServer> {
    if (existsSync(path)) {
      if (!lstatSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
      if (await answers(path)) throw new Error(`${path} is in use by another daemon`);
      unlinkSync(path);
    }
    const server = createServer({ allowHalfOpen: false });
    const c = new ControlServer(path, server);
    server.on('connection', (sock) => c.serve(sock, handle, log));
    // Owner-only from the first moment: the umask covers the window before chmod.
    const mask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(mask);
    }
    chmodSync(path, 0o600);
    server.on('error', (e) => log.warn({ err: e.message }, 'control socket error'));
    return c;
  }

  private serve(sock: Socket, handle: (command: string) => unknown | Promise<unknown>, log: Logger): void {
    if (this.clients >= MAX_CLIENTS) {
      sock.destroy();
      return;
    }
    this.clients++;
    sock.once('close', () => this.clients--);
    sock.setTimeout(CLIENT_TIMEOUT_MS, () => sock.destroy());
    let got = '';
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('data', (d: string) => {
      got += d;
      const nl = got.indexOf('\n');
      if (nl < 0 && got.length <= MAX_REQUEST) return;
      sock.removeAllListeners('data');
      const command = (nl < 0 ? got : got.slice(0, nl)).trim();
      if (nl < 0) {
        sock.end(`${JSON.stringify({ error: `request longer than ${MAX_REQUEST} bytes` })}\n`);
        return;
      }
      Promise.resolve()
        .then(() => handle(command))
        .catch((e: Error) => {
          if (!/^unknown command/.test(e.message)) log.error({ err: e, command }, 'control request failed');
          return { error: e.message };
        })
        .then((reply) => sock.end(`${JSON.stringify(reply)}\n`));
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    try {
      unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}

/** Whether something answers on a Unix socket path. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Ask a daemon's control socket; rejects with a readable reason. */
export function request(path: string, command: string, timeoutMs = 5000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const s = createConnection(path);
    let got = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer from ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    s.setEncoding('utf8');
    s.on('connect', () => s.write(`${command}\n`));
    s.on('data', (d: string) => (got += d));
    s.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new Error(e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? `no vhostd control socket at ${path} (is the daemon running? see --control)` : `${path}: ${e.message}`));
    });
    s.on('end', () => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(got));
      } catch {
        reject(new Error(`${path} answered something that is not JSON: ${got.slice(0, 200)}`));
      }
    });
  });
}
