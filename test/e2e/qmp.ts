// A minimal QMP client (QEMU's JSON monitor) over a Unix socket: the greeting,
// qmp_capabilities, then one command at a time; events are ignored.
import { createConnection, type Socket } from 'node:net';

export class QmpError extends Error {}

export class Qmp {
  private buf = '';
  private readonly waiting: ((msg: Record<string, unknown>) => void)[] = [];
  private closedWith: Error | undefined;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) continue;
        this.waiting.shift()?.(msg);
      }
    });
    const fail = (e: Error): void => {
      this.closedWith ??= e;
      for (const w of this.waiting.splice(0)) w({ error: { desc: e.message } });
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new QmpError('QMP socket closed')));
  }

  /** Connect (retrying until the socket accepts, for a QEMU still starting), and leave capabilities negotiation. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path, () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        await q.next(); // the greeting
        await q.execute('qmp_capabilities');
        return q;
      } catch (e) {
        if (Date.now() > deadline) throw new QmpError(`no QMP on ${path}: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  private next(): Promise<Record<string, unknown>> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.sock.write(JSON.stringify({ execute: command, ...(args && { arguments: args }) }) + '\n');
    const msg = await reply;
    if ('error' in msg) throw new QmpError(`${command}: ${JSON.stringify(msg.error)}`);
    return msg.return;
  }

  close(): void {
    this.sock.destroy();
  }
}
