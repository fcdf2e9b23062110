// Test stand-ins for the two sides of systemd a service talks to: a
// NOTIFY_SOCKET that records sd_notify datagrams, and a listening socket
// handed to the daemon as fd 3 with LISTEN_FDS/LISTEN_PID, the way the
// service manager passes it (and passes the same one again after a restart).
import { spawn, type ChildProcess } from 'node:child_process';
import { native } from '../../src/native/index.js';

/** Node has no AF_UNIX datagram sockets; python3 (provisioned) listens and prints each datagram as JSON. */
const LISTENER = `
import json, socket, sys
addr = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\\0" + addr[1:] if addr.startswith("@") else addr)
print(json.dumps({"bound": True}), flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps({"msg": data.decode()}), flush=True)
`;

export class NotifySocket {
  readonly messages: string[] = [];
  private constructor(
    readonly address: string,
    private readonly child: ChildProcess,
  ) {}

  /** address: a path, or '@name' for the abstract namespace. */
  static async open(address: string): Promise<NotifySocket> {
    const child = spawn('python3', ['-u', '-c', LISTENER, address], { stdio: ['ignore', 'pipe', 'inherit'] });
    const n = new NotifySocket(address, child);
    let buf = '';
    let bound!: () => void;
    const up = new Promise<void>((r) => (bound = r));
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = JSON.parse(buf.slice(0, nl)) as { bound?: boolean; msg?: string };
        buf = buf.slice(nl + 1);
        if (line.bound) bound();
        if (line.msg !== undefined) n.messages.push(line.msg);
      }
    });
    const failed = new Promise<never>((_, rej) => child.once('exit', (c) => rej(new Error(`notify listener exited ${c}`))));
    await Promise.race([up, failed]);
    return n;
  }

  /** Every KEY=value line received so far, in order. */
  lines(): string[] {
    return this.messages.flatMap((m) => m.split('\n'));
  }

  async waitFor(pred: (line: string) => boolean, timeoutMs = 20_000, what = 'a notification'): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.lines().find(pred);
      if (hit !== undefined) return hit;
      if (Date.now() > deadline) throw new Error(`no ${what} within ${timeoutMs} ms; got:\n${this.lines().join('\n')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  close(): void {
    this.child.kill('SIGKILL');
  }
}

export interface Activated {
  child: ChildProcess;
  pid: number;
  output(): string;
  exited: Promise<number | null>;
  /** SIGTERM; resolves to the exit code. */
  stop(): Promise<number | null>;
}

/**
 * Run argv with listenFd as its fd 3, LISTEN_FDS=1 and LISTEN_PID set to the
 * pid of the process that ends up running argv (sh execs it, so $$ is that pid).
 */
export function runWithListenFd(listenFd: number, argv: string[], env: NodeJS.ProcessEnv = {}): Activated {
  const quoted = argv.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const child = spawn('sh', ['-c', `LISTEN_PID=$$ exec ${quoted}`], {
    stdio: ['ignore', 'pipe', 'pipe', listenFd],
    env: { ...process.env, LISTEN_FDS: '1', LISTEN_FDNAMES: 'vhost-user', ...env },
  });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | null>((r) => child.once('close', (code) => r(code)));
  return {
    child,
    pid: child.pid!,
    output: () => out,
    exited,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      return exited;
    },
  };
}

/** A listening AF_UNIX socket owned by the test, as a .socket unit would own it. */
export function listeningSocket(path: string): number {
  return native.listen(path, 16);
}

export async function waitForOutput(out: () => string, re: RegExp, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(out())) {
    if (Date.now() > deadline) throw new Error(`no ${re} within ${timeoutMs} ms:\n${out()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
