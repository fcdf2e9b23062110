// Network namespaces for net tests: the tap, vhostd and the host-side peers
// live in a namespace the test creates and deletes, so no traffic leaves it.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const TCP_PEER = fileURLToPath(new URL('./tcp-peer.mjs', import.meta.url));

export class Netns {
  readonly name: string;
  private children: ChildProcess[] = [];

  constructor(tag: string) {
    this.name = `vhd-${tag}-${process.pid}`;
    spawnSync('ip', ['netns', 'del', this.name], { stdio: 'ignore' });
    this.sh(`ip netns add ${this.name}`, false);
    this.ip('link set lo up');
  }

  /** Run a command on the host (`inside` false) or in the namespace; throw on failure. */
  sh(cmd: string, inside = true): string {
    const argv = inside ? ['ip', 'netns', 'exec', this.name, 'sh', '-c', cmd] : ['sh', '-c', cmd];
    const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: 30_000 });
    if (r.status !== 0) throw new Error(`${cmd}: exit ${r.status}\n${r.stderr}`);
    return r.stdout;
  }

  ip(args: string): string {
    return this.sh(`ip ${args}`);
  }

  /** Start a long-running command in the namespace; killed by destroy(). */
  spawn(cmd: string, args: string[]): ChildProcess {
    const child = spawn('ip', ['netns', 'exec', this.name, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.push(child);
    return child;
  }

  /**
   * A TCP peer in the namespace: 'recv' reads `bytes` and reports their md5,
   * 'send' sends `bytes` of seeded data and reports the md5 it sent, at most
   * `rate` bytes a second when given.
   */
  tcpPeer(mode: 'recv' | 'send', port: number, bytes: number, rate?: number): Promise<string> {
    const child = this.spawn(process.execPath, [TCP_PEER, mode, String(port), String(bytes), ...(rate ? [String(rate)] : [])]);
    let out = '';
    let err = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
    return new Promise((resolve, reject) =>
      child.once('close', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`tcp peer ${mode}: exit ${code}: ${err}`)))),
    );
  }

  /** Wait until something listens on `port` in the namespace. */
  async waitListening(port: number, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.sh(`ss -Htln 'sport = :${port}'`).trim()) {
      if (Date.now() > deadline) throw new Error(`nothing listens on ${port} in ${this.name}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  destroy(): void {
    for (const c of this.children) if (c.exitCode === null) c.kill('SIGKILL');
    spawnSync('ip', ['netns', 'pids', this.name], { encoding: 'utf8' })
      .stdout?.split('\n')
      .filter(Boolean)
      .forEach((pid) => spawnSync('kill', ['-9', pid]));
    spawnSync('ip', ['netns', 'del', this.name], { stdio: 'ignore' });
  }
}
