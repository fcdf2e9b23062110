// `vhostd blk ...`: argument parsing, logging, start-up checks and signals.
import { closeSync, existsSync, mkdirSync, openSync, ftruncateSync } from 'node:fs';
import { dirname } from 'node:path';
import { pino, type Logger } from 'pino';
import yargs from 'yargs';
import { BlkDevice, MAX_QUEUE_SIZE } from './backends/blk/blk-device.js';
import { Image, type Aio } from './backends/blk/image.js';
import { NetDevice } from './backends/net/net-device.js';
import { Placement } from './ring/placement.js';
import { Tap } from './backends/net/tap.js';
import type { Device } from './device.js';
import { native } from './native/index.js';
import { Server } from './protocol/server.js';
import { listenFds, ListenFdError, Notifier, prepareListener } from './systemd.js';

export const DEFAULT_BLK_SOCKET = '/run/vhostd/blk0.sock';
export const DEFAULT_BLK_IMAGE = '/var/lib/vhostd/default.img';
export const DEFAULT_IMAGE_SIZE = 1 << 30;
export const DEFAULT_NET_SOCKET = '/run/vhostd/net0.sock';
export const DEFAULT_TAP = 'vhostd0';
const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

class UsageError extends Error {}

/**
 * What `--print-capabilities` prints: a VHostUserBackendCapabilities object
 * of QEMU's docs/interop/vhost-user.json ("Backend program conventions").
 */
export const CAPABILITIES = {
  blk: { type: 'block', features: ['read-only', 'blk-file'] },
  net: { type: 'net' },
} as const;

/** Where the vhost-user socket comes from. */
type Listener =
  | { kind: 'path'; path: string } // bind and listen ourselves
  | { kind: 'fd'; fd: number; path: string; from: string } // inherited, already listening
  | { kind: 'client'; path: string }; // connect to a listening front-end

/**
 * Decide the socket: --fd, then systemd's LISTEN_FDS, then --socket-path (or
 * the default). The LISTEN_* variables are consumed (and unset) here, before
 * anything else runs.
 */
function chooseListener(a: { socket: string | undefined; fd: number | undefined; client: boolean }, defaultPath: string): Listener {
  let inherited: number[];
  try {
    inherited = listenFds();
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (a.fd !== undefined) {
    if (a.socket !== undefined) throw new UsageError('--fd and --socket-path are incompatible: pass one of them');
    if (a.client) throw new UsageError('--fd and --client are incompatible: --fd is a listening socket');
    if (!Number.isInteger(a.fd) || a.fd < 0) throw new UsageError(`--fd must be a file descriptor number, got ${a.fd}`);
    for (const fd of inherited) native.close(fd);
    return { kind: 'fd', fd: a.fd, path: `fd ${a.fd}`, from: '--fd' };
  }
  const path = a.socket ?? defaultPath;
  if (inherited.length) {
    if (a.client) throw new UsageError('socket activation (LISTEN_FDS) and --client are incompatible');
    if (inherited.length > 1) throw new UsageError(`the service manager passed ${inherited.length} sockets (LISTEN_FDS); vhostd serves exactly one`);
    return { kind: 'fd', fd: inherited[0]!, path, from: 'socket activation (LISTEN_FDS)' };
  }
  return a.client ? { kind: 'client', path } : { kind: 'path', path };
}

/** The STATUS= line: the front-end and a short summary of the queues. */
function statusLine(kind: string, server: Server, socket: string, queues: number): string {
  const conn = server.active;
  if (!conn) return `${kind}: waiting for a front-end on ${socket}; ${queues} queue${queues === 1 ? '' : 's'} offered`;
  const counts = new Map<string, number>();
  for (const st of conn.queueStates()) counts.set(st, (counts.get(st) ?? 0) + 1);
  const summary = [...counts].map(([st, n]) => `${n} ${st}`).join(', ');
  return `${kind}: front-end connected (connection ${server.connectionCount}); queues: ${summary}`;
}

interface BlkArgs {
  socket: string | undefined;
  fd: number | undefined;
  client: boolean;
  file: string;
  readonly: boolean;
  numQueues: number;
  direct: boolean;
  aio: Aio;
  serial: string;
  logicalBlockSize: number;
  logLevel: string;
}

export function qemuCommandLine(socket: string, numQueues: number): string {
  return [
    'qemu-system-x86_64 -m 1G',
    '-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem',
    `-chardev socket,id=c0,path=${socket}`,
    `-device vhost-user-blk-pci,chardev=c0,num-queues=${numQueues}`,
  ].join(' ');
}

export function qemuNetCommandLine(socket: string, pairs: number, mtu?: number): string {
  const dev = ['virtio-net-pci,netdev=n0'];
  if (pairs > 1) dev.push(`mq=on,vectors=${2 * pairs + 2}`);
  if (mtu) dev.push(`host_mtu=${mtu}`);
  return [
    'qemu-system-x86_64 -m 1G',
    '-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem',
    `-chardev socket,id=c0,path=${socket}`,
    `-netdev vhost-user,id=n0,chardev=c0,queues=${pairs}`,
    `-device ${dev.join(',')}`,
  ].join(' ');
}

/** Listen, print how to attach, serve until SIGTERM/SIGINT, then drain and release. */
async function serve(device: Device, placement: Placement, listener: Listener, log: Logger, attach: string, release: () => void | Promise<void>): Promise<number> {
  const socket = listener.path;
  const server = new Server(socket, device, placement, log);
  const notifier = new Notifier();
  const client = listener.kind === 'client';
  if (listener.kind === 'client') {
    server.connect();
  } else {
    try {
      if (listener.kind === 'fd') {
        prepareListener(listener.fd, listener.from);
        server.adoptListener(listener.fd);
      } else {
        server.listen();
      }
    } catch (e) {
      await placement.close();
      await release();
      if (e instanceof ListenFdError) throw new UsageError(e.message);
      throw new UsageError(`cannot listen on ${socket}: ${(e as Error).message}`);
    }
  }
  log.info({ socket, client, inherited: listener.kind === 'fd', queues: device.queueNum }, `vhost-user-${device.kind} ready`);
  const how = client ? attach.replace(/-chardev socket,id=c0,path=(\S+)/, '-chardev socket,id=c0,path=$1,server=on,wait=off') : attach;
  process.stdout.write(`# attach with:\n${how}\n`);

  const status = (): string => statusLine(device.kind, server, socket, device.numQueues);
  notifier.ready(status());
  server.onChange = () => notifier.status(status());
  // Queue states change between connects too (rings start, stop, fail): refresh
  // the line now and then; an unchanged line is not sent again.
  const refresh = notifier.enabled ? setInterval(() => notifier.status(status()), 2000).unref() : undefined;
  const watchdogMs = notifier.startWatchdog();
  if (watchdogMs !== undefined) log.info({ intervalMs: watchdogMs }, 'systemd watchdog enabled');

  const signal = await new Promise<string>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  if (refresh) clearInterval(refresh);
  notifier.stopping(`${device.kind}: stopping (${signal}), draining requests in flight`);
  log.info({ signal }, 'shutting down: draining requests in flight');
  await server.close();
  await placement.close();
  await release();
  log.info('stopped');
  log.flush();
  return 0;
}

/** Create the built-in default image (sparse) the first time it is used. */
function ensureDefaultImage(path: string, log: Logger): void {
  if (existsSync(path)) return;
  mkdirSync(dirname(path), { recursive: true });
  const fd = openSync(path, 'wx', 0o600);
  ftruncateSync(fd, DEFAULT_IMAGE_SIZE);
  closeSync(fd);
  log.info({ file: path, bytes: DEFAULT_IMAGE_SIZE }, 'created sparse default image');
}

async function runBlk(args: BlkArgs): Promise<number> {
  const listener = chooseListener(args, DEFAULT_BLK_SOCKET);
  const log = pino({ name: 'vhostd', level: args.logLevel });
  if (args.file === DEFAULT_BLK_IMAGE) ensureDefaultImage(args.file, log);
  if (listener.kind === 'path' && listener.path === DEFAULT_BLK_SOCKET) mkdirSync(dirname(listener.path), { recursive: true });

  let image: Image;
  try {
    image = new Image({ path: args.file, readonly: args.readonly, direct: args.direct, aio: args.aio });
  } catch (e) {
    throw new UsageError(`cannot open image ${args.file}: ${(e as Error).message}`);
  }
  if (image.size % args.logicalBlockSize) {
    log.warn({ bytes: image.size, logicalBlockSize: args.logicalBlockSize }, 'image size is not a multiple of the block size; the tail is not visible to the guest');
  }
  const device = new BlkDevice(
    { image, numQueues: args.numQueues, serial: args.serial, logicalBlockSize: args.logicalBlockSize },
    log,
  );
  log.info({ file: args.file, bytes: image.size, readonly: args.readonly, direct: image.direct, aio: image.aio }, 'image opened');
  if (image.aioNote && args.aio === 'auto') log.warn({ reason: image.aioNote }, 'io_uring unavailable: image I/O runs on the thread pool');
  // blk queues share the daemon's thread: the kernel (io_uring) or libuv's pool does the file I/O.
  const placement = new Placement(device, { threads: 0, logLevel: args.logLevel, name: 'blk' });
  return serve(device, placement, listener, log, qemuCommandLine(listener.path, args.numQueues), () => image.close());
}

interface NetArgs {
  socket: string | undefined;
  fd: number | undefined;
  client: boolean;
  tap: string;
  persist: boolean;
  numQueues: number;
  threads: number | undefined;
  mtu: number | undefined;
  logLevel: string;
}

async function runNet(args: NetArgs): Promise<number> {
  const listener = chooseListener(args, DEFAULT_NET_SOCKET);
  const log = pino({ name: 'vhostd', level: args.logLevel });
  if (listener.kind === 'path' && listener.path === DEFAULT_NET_SOCKET) mkdirSync(dirname(listener.path), { recursive: true });
  let tap: Tap;
  try {
    tap = new Tap({ name: args.tap, queues: args.numQueues, persist: args.persist });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (tap.created) {
    try {
      tap.up();
      if (args.mtu) tap.setMtu(args.mtu);
    } catch (e) {
      tap.close();
      throw new UsageError((e as Error).message);
    }
  }
  log.info({ tap: tap.name, created: tap.created, persist: args.persist, queuePairs: args.numQueues, threads: args.threads ?? args.numQueues }, 'tap opened');
  const device = new NetDevice({ tap, queuePairs: args.numQueues, mtu: args.mtu }, log);
  const placement = new Placement(device, { threads: args.threads ?? args.numQueues, logLevel: args.logLevel, name: 'net' });
  return serve(device, placement, listener, log, qemuNetCommandLine(listener.path, args.numQueues, args.mtu), async () => {
    log.info({ stats: device.stats }, 'traffic totals');
    tap.close();
  });
}

function positiveInt(name: string, v: number, max: number): number {
  if (!Number.isInteger(v) || v < 1 || v > max) throw new UsageError(`--${name} must be an integer in 1..${max}, got ${v}`);
  return v;
}

export async function main(argv: string[]): Promise<number> {
  // vhost-user.rst: with --print-capabilities, other options and arguments are
  // ignored and the back-end does nothing else. So this comes before parsing.
  if (argv.includes('--print-capabilities')) {
    const kind = argv[0];
    if (kind === 'blk' || kind === 'net') {
      process.stdout.write(`${JSON.stringify(CAPABILITIES[kind], null, 2)}\n`);
      return 0;
    }
    process.stderr.write('vhostd: --print-capabilities needs a device: vhostd blk --print-capabilities, vhostd net --print-capabilities\n');
    return 2;
  }
  let result = 0;
  try {
    await yargs(argv)
      .scriptName('vhostd')
      .usage('$0 <command> [options]\n\nvhost-user back-end daemon: QEMU attaches over a Unix socket.')
      .command(
        'blk',
        'Serve a virtio-blk device backed by an image file',
        (y) =>
          y
            .option('socket', { type: 'string', alias: 'socket-path', describe: `Unix socket path QEMU connects to [default: ${DEFAULT_BLK_SOCKET}]` })
            .option('fd', { type: 'number', describe: 'Serve on this already-listening socket fd instead of --socket-path' })
            .option('print-capabilities', { type: 'boolean', describe: 'Print the back-end capabilities (vhost-user.json) and exit' })
            .option('client', { type: 'boolean', default: false, describe: 'Connect to a front-end listening on --socket (QEMU server=on), reconnecting with backoff' })
            .option('file', { type: 'string', alias: 'blk-file', default: DEFAULT_BLK_IMAGE, describe: 'Disk image: a raw file or a block device (the default is created sparse, 1 GiB)' })
            .option('readonly', { type: 'boolean', alias: 'read-only', default: false, describe: 'Expose the disk read-only' })
            .option('num-queues', { type: 'number', default: 1, describe: `Request queues (1..64)` })
            .option('direct', { type: 'boolean', default: false, describe: 'Use O_DIRECT for aligned requests (bypasses the host page cache)' })
            .option('aio', { type: 'string', default: 'auto', choices: ['auto', 'io_uring', 'threads'], describe: 'Image I/O: io_uring, the thread pool, or io_uring where the kernel allows it' })
            .option('serial', { type: 'string', default: 'vhostd', describe: 'Serial number returned by GET_ID (at most 20 bytes)' })
            .option('logical-block-size', { type: 'number', default: 512, describe: 'Logical block size: 512 or 4096' })
            .option('log-level', { type: 'string', default: 'info', choices: LEVELS, describe: 'pino log level' })
            .example('$0 blk --socket /run/vhostd/disk0.sock --file /var/lib/images/disk0.img --num-queues 2', '')
            .check((a) => {
              positiveInt('num-queues', a['num-queues'], 64);
              if (a['logical-block-size'] !== 512 && a['logical-block-size'] !== 4096) {
                throw new UsageError('--logical-block-size must be 512 or 4096');
              }
              if (new TextEncoder().encode(a.serial).length > 20) throw new UsageError('--serial must be at most 20 bytes');
              return true;
            }),
        async (a) => {
          result = await runBlk({
            socket: a.socket,
            fd: a.fd,
            client: a.client,
            file: a.file,
            readonly: a.readonly,
            numQueues: a['num-queues'],
            direct: a.direct,
            aio: a.aio as Aio,
            serial: a.serial,
            logicalBlockSize: a['logical-block-size'],
            logLevel: a['log-level'],
          });
        },
      )
      .command(
        'net',
        'Serve a virtio-net device backed by a tap interface',
        (y) =>
          y
            .option('socket', { type: 'string', alias: 'socket-path', describe: `Unix socket path QEMU connects to [default: ${DEFAULT_NET_SOCKET}]` })
            .option('fd', { type: 'number', describe: 'Serve on this already-listening socket fd instead of --socket-path' })
            .option('print-capabilities', { type: 'boolean', describe: 'Print the back-end capabilities (vhost-user.json) and exit' })
            .option('client', { type: 'boolean', default: false, describe: 'Connect to a front-end listening on --socket (QEMU server=on), reconnecting with backoff' })
            .option('tap', { type: 'string', default: DEFAULT_TAP, describe: 'Tap interface: attached if it exists, else created (and brought up)' })
            .option('persist', { type: 'boolean', default: false, describe: 'Keep a tap that vhostd created after it exits' })
            .option('num-queues', { type: 'number', default: 1, describe: 'Queue pairs (1..16); more than one opens the tap multi-queue' })
            .option('threads', { type: 'number', describe: 'Threads the queue pairs are spread over (default: one per pair); 0 runs them on the main thread' })
            .option('mtu', { type: 'number', describe: 'Offer VIRTIO_NET_F_MTU with this maximum (68..65535); QEMU needs host_mtu=' })
            .option('log-level', { type: 'string', default: 'info', choices: LEVELS, describe: 'pino log level' })
            .example('$0 net --socket /run/vhostd/net0.sock --tap tap0 --num-queues 2', '')
            .check((a) => {
              positiveInt('num-queues', a['num-queues'], 16);
              if (a.threads !== undefined && (!Number.isInteger(a.threads) || a.threads < 0 || a.threads > a['num-queues'])) {
                throw new UsageError(`--threads must be an integer in 0..${a['num-queues']} (the number of queue pairs)`);
              }
              if (a.mtu !== undefined && (!Number.isInteger(a.mtu) || a.mtu < 68 || a.mtu > 65535)) {
                throw new UsageError('--mtu must be an integer in 68..65535');
              }
              return true;
            }),
        async (a) => {
          result = await runNet({
            socket: a.socket,
            fd: a.fd,
            client: a.client,
            tap: a.tap,
            persist: a.persist,
            numQueues: a['num-queues'],
            threads: a.threads,
            mtu: a.mtu,
            logLevel: a['log-level'],
          });
        },
      )
      .demandCommand(1, 'name a device: vhostd blk --help, vhostd net --help')
      .strict()
      .fail((msg, err) => {
        throw err ?? new UsageError(msg);
      })
      .help()
      .version()
      .parseAsync();
  } catch (e) {
    process.stderr.write(`vhostd: ${(e as Error).message}\n`);
    return 2;
  }
  return result;
}

export { MAX_QUEUE_SIZE };
