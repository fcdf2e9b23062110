// DPDK's testpmd with a virtio-user port as a vhost-user net front-end, driven
// at its interactive prompt: the testpmd interop test and the net benchmarks use it.
import { spawn, spawnSync } from 'node:child_process';
import { dirname } from 'node:path';
import { forget, remember } from './children.js';
import { waitFor as pollFor } from './wait.js';
import { hasCommand } from '../e2e/guest.js';

/** Polls that run commands (ip netns exec, testpmd's prompt): every 100 ms, not every millisecond. */
export const waitFor = (what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> =>
  pollFor(cond, what, timeoutMs, 100);

export const testpmdAvailable = (): boolean =>
  hasCommand('dpdk-testpmd', ['--help']) || spawnSync('which', ['dpdk-testpmd']).status === 0;

/** testpmd at its interactive prompt, driven through stdin. */
export interface Testpmd {
  /** `stop`: its lcores stop sending and receiving; resolves to the forward statistics it then prints. */
  stopForwarding(): Promise<{ rx: number; tx: number }>;
  /** `show port stats 0`: what its port has received and sent so far. */
  portStats(): Promise<{ rx: number; tx: number }>;
  /** `quit`: it stops and closes its port (GET_VRING_BASE) and exits. */
  quit(): Promise<void>;
  /** Cleanup after a failed test. */
  kill(): Promise<void>;
}

/** Starts testpmd and, once its prompt is up, forwarding in `mode`. */
export async function startTestpmd(socket: string, mode: 'txonly' | 'rxonly'): Promise<Testpmd> {
  // stdbuf: its printf output to a pipe would otherwise sit in a buffer until exit.
  const child = spawn(
    'stdbuf',
    [
      '-o0', 'dpdk-testpmd', '-l', '0,1', '--no-pci', '--no-huge', '-m', '1024', '--file-prefix', `vhostd${process.pid}`,
      '--vdev', `net_virtio_user0,path=${socket},queues=1`,
      '--', '-i', `--forward-mode=${mode}`, '--total-num-mbufs=16384',
    ],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  const record = remember(child, dirname(socket));
  // Prompts and statistics are matched on stdout alone: its warnings on stderr can land in the middle of a prompt.
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  let exited = false;
  const closed = new Promise<void>((r) =>
    child.once('close', () => {
      exited = true;
      forget(record);
      r();
    }),
  );
  const until = async (what: string, re: RegExp, from: number): Promise<RegExpMatchArray> => {
    await waitFor(`testpmd: ${what}`, () => re.test(out.slice(from)) || exited, 60_000).catch((e: Error) => {
      throw new Error(`${e.message}; its output:\n${out.slice(-3000)}\nits stderr:\n${err.slice(-2000)}`);
    });
    const m = out.slice(from).match(re);
    if (!m) throw new Error(`testpmd exited before ${what}:\n${out.slice(-3000)}\nits stderr:\n${err.slice(-2000)}`);
    return m;
  };
  const command = (line: string): number => {
    const from = out.length;
    child.stdin.write(`${line}\n`);
    return from;
  };
  try {
    await until('its prompt', /testpmd> /, 0);
    await until('forwarding started', /packet forwarding - ports=1/, command('start'));
  } catch (e) {
    child.kill('SIGKILL');
    await closed;
    throw e;
  }
  return {
    async stopForwarding() {
      // The per-port block comes first; with one port it is the whole story.
      const m = await until('forward statistics', /RX-packets:\s+(\d+)[\s\S]*?TX-packets:\s+(\d+)[\s\S]*?Done\./, command('stop'));
      return { rx: Number(m[1]), tx: Number(m[2]) };
    },
    async portStats() {
      const m = await until('port statistics', /NIC statistics for port 0[\s\S]*?RX-packets:\s+(\d+)[\s\S]*?TX-packets:\s+(\d+)\s/, command('show port stats 0'));
      return { rx: Number(m[1]), tx: Number(m[2]) };
    },
    async quit() {
      command('quit');
      const t = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await closed;
      clearTimeout(t);
    },
    async kill() {
      if (!exited) child.kill('SIGKILL');
      await closed;
    },
  };
}

