// `vhostd blk ...`: argument parsing, logging, start-up checks and signals.
import { closeSync, existsSync, mkdirSync, openSync, ftruncateSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { pino, type Logger } from 'pino';
import yargs, { type Argv } from 'yargs';
import { BlkDevice, MAX_QUEUE_SIZE } from './backends/blk/blk-device.js';
import { Image, type Aio, type DiskImage } from './backends/blk/image.js';
import { RbdError, RbdImage } from './backends/blk/rbd.js';
import { NetDevice } from './backends/net/net-device.js';
import { Placement } from './ring/placement.js';
import { Tap } from './backends/net/tap.js';
import type { Device } from './device.js';
import { native } from './native/index.js';
import { Server } from './protocol/server.js';
import { listenFds, ListenFdError, Notifier, prepareListener } from './systemd.js';
import { ControlServer, defaultControlPath, request } from './control.js';
import type { Metrics } from './metrics.js';
import { formatStats, Stats, type StatsSnapshot } from './stats.js';

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

/** Operations options every device takes. */
interface OpsArgs {
  /** Control socket path, 'none', or undefined for the default next to the socket. */
  control: string | undefined;
  metrics: string | undefined;
  id: string | undefined;
  logLevel: string;
}

/**
 * pino JSON for journals and pipes; readable lines on a terminal. Every line
 * names the device. pino-pretty (like prom-client) is loaded only when used:
 * a daemon under systemd should not carry it in its idle memory.
 */
async function makeLogger(level: string, device: string): Promise<Logger> {
  const opts = { name: 'vhostd', level };
  if (!process.stdout.isTTY) return pino(opts).child({ device });
  const { default: pretty } = await import('pino-pretty');
  return pino(opts, pretty({ sync: true, colorize: true })).child({ device });
}

/** The id in logs and metrics: --id, else the socket's file name without .sock. */
function deviceId(args: OpsArgs, listener: Listener, kind: string): string {
  if (args.id) return args.id;
  if (listener.kind === 'fd' && listener.path.startsWith('fd ')) return `${kind}-${listener.path.slice(3)}`;
  return basename(listener.path).replace(/\.sock$/, '');
}

function addOpsOptions<T>(y: Argv<T>) {
  return y
    .option('control', { type: 'string', describe: 'Control socket for vhostd stats [default: the socket path with .ctl for .sock]; none turns it off' })
    .option('metrics', { type: 'string', describe: 'Serve Prometheus metrics on http://HOST:PORT/metrics (off by default)' })
    .option('id', { type: 'string', describe: 'Device id in logs and metrics [default: the socket file name]' })
    .option('log-level', { type: 'string', default: 'info', choices: LEVELS, describe: 'pino log level' });
}

/** How `vhostd stats` and `vhostd resize` find a running daemon: --control, else from its --socket. */
function addControlClientOptions<T>(y: Argv<T>) {
  return y
    .option('control', { type: 'string', describe: 'The daemon\'s control socket [default: from --socket]' })
    .option('socket', { type: 'string', alias: 'socket-path', describe: `The daemon's vhost-user socket, to find its control socket [default: ${DEFAULT_BLK_SOCKET}]` });
}

function controlPathOf(a: { control?: string; socket?: string }): string {
  return a.control ?? defaultControlPath(a.socket ?? DEFAULT_BLK_SOCKET);
}

interface BlkArgs extends OpsArgs {
  socket: string | undefined;
  fd: number | undefined;
  client: boolean;
  file: string;
  /** POOL/IMAGE on a Ceph cluster, instead of file. */
  rbd: string | undefined;
  cephConf: string | undefined;
  cephId: string | undefined;
  cephKeyring: string | undefined;
  cephTimeout: number;
  readonly: boolean;
  numQueues: number;
  direct: boolean;
  aio: Aio;
  pollUs: number;
  threads: number;
  serial: string;
  logicalBlockSize: number;
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
async function serve(device: Device, placement: Placement, listener: Listener, ops: OpsArgs, log: Logger, attach: string, release: () => void | Promise<void>): Promise<number> {
  // Signals are caught from the start: a stop that comes while we set up still drains and cleans up.
  const signalled = new Promise<string>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  // SIGHUP: the image may have grown (as `vhostd resize` asks over the control socket).
  const onHup = (): void => {
    if (!device.resize) return void log.info('SIGHUP: nothing to reload for this device');
    void device.resize().then((r) => log[r.ok ? 'info' : 'warn']({ bytes: r.bytes }, `SIGHUP: ${r.message}`));
  };
  process.on('SIGHUP', onHup);
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
  const stats = new Stats(log.bindings().device as string, socket, device, placement, server);
  let control: ControlServer | undefined;
  let metrics: Metrics | undefined;
  const controlPath = ops.control ?? (listener.kind === 'fd' && socket.startsWith('fd ') ? undefined : defaultControlPath(socket));
  try {
    if (controlPath && controlPath !== 'none') {
      control = await ControlServer.listen(controlPath, (cmd) => {
        if (cmd === 'stats') return stats.snapshot();
        if (cmd === 'resize' && device.resize) return device.resize();
        throw new Error(`unknown command ${JSON.stringify(cmd.slice(0, 40))}; the control socket knows: stats${device.resize ? ', resize' : ''}`);
      }, log);
    }
    if (ops.metrics) metrics = await (await import('./metrics.js')).Metrics.listen(ops.metrics, () => stats.snapshot(), log);
  } catch (e) {
    stats.close();
    await control?.close();
    await server.close();
    await placement.close();
    await release();
    throw new UsageError(`${metrics || !control ? '--metrics' : '--control'}: ${(e as Error).message}`);
  }
  log.info({ socket, client, inherited: listener.kind === 'fd', queues: device.queueNum, control: control?.path ?? null, metrics: metrics ? `${ops.metrics!.replace(/:\d+$/, '')}:${metrics.port}` : null }, `vhost-user-${device.kind} ready`);
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

  const signal = await signalled;
  if (refresh) clearInterval(refresh);
  notifier.stopping(`${device.kind}: stopping (${signal}), draining requests in flight`);
  log.info({ signal }, 'shutting down: draining requests in flight');
  await server.close();
  stats.close();
  await control?.close();
  await metrics?.close();
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
  const log = await makeLogger(args.logLevel, deviceId(args, listener, 'blk'));
  if (!args.rbd && args.file === DEFAULT_BLK_IMAGE) ensureDefaultImage(args.file, log);
  if (listener.kind === 'path' && listener.path === DEFAULT_BLK_SOCKET) mkdirSync(dirname(listener.path), { recursive: true });

  let image: DiskImage;
  if (args.rbd) {
    log.info({ rbd: args.rbd, conf: args.cephConf, id: args.cephId, timeoutS: args.cephTimeout }, 'connecting to the Ceph cluster');
    try {
      image = new RbdImage({ spec: args.rbd, conf: args.cephConf, id: args.cephId, keyring: args.cephKeyring, readonly: args.readonly, timeoutS: args.cephTimeout });
    } catch (e) {
      if (e instanceof RbdError) throw new UsageError(`cannot open RBD image ${args.rbd}: ${e.message}`);
      throw e;
    }
  } else {
    try {
      image = new Image({ path: args.file, readonly: args.readonly, direct: args.direct, aio: args.aio });
    } catch (e) {
      throw new UsageError(`cannot open image ${args.file}: ${(e as Error).message}`);
    }
  }
  if (image.size % args.logicalBlockSize) {
    log.warn({ bytes: image.size, logicalBlockSize: args.logicalBlockSize }, 'image size is not a multiple of the block size; the tail is not visible to the guest');
  }
  const device = new BlkDevice(
    { image, numQueues: args.numQueues, serial: args.serial, logicalBlockSize: args.logicalBlockSize },
    log,
  );
  log.info({ file: image.path, bytes: image.size, readonly: args.readonly, direct: image.direct, aio: image.aio }, 'image opened');
  // An RBD image tells us when its header changes (`rbd resize`): no signal needed.
  if (image instanceof RbdImage) {
    image.watch(() => void device.resize().then((r) => log[r.ok ? 'info' : 'warn']({ bytes: r.bytes }, `RBD image changed: ${r.message}`)));
  }
  if (image.aioNote && args.aio === 'auto') log.warn({ reason: image.aioNote }, 'io_uring unavailable: image I/O runs on the thread pool');
  // By default blk queues share the daemon's thread: the kernel (io_uring) does their file I/O.
  const placement = new Placement(device, { threads: args.threads, logLevel: args.logLevel, name: 'blk', pollUs: args.pollUs });
  return serve(device, placement, listener, args, log, qemuCommandLine(listener.path, args.numQueues), () => image.close());
}

interface NetArgs extends OpsArgs {
  socket: string | undefined;
  fd: number | undefined;
  client: boolean;
  tap: string;
  persist: boolean;
  numQueues: number;
  threads: number | undefined;
  mtu: number | undefined;
}

async function runNet(args: NetArgs): Promise<number> {
  const listener = chooseListener(args, DEFAULT_NET_SOCKET);
  const log = await makeLogger(args.logLevel, deviceId(args, listener, 'net'));
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
  return serve(device, placement, listener, args, log, qemuNetCommandLine(listener.path, args.numQueues, args.mtu), async () => {
    log.info({ stats: device.stats }, 'traffic totals');
    tap.close();
  });
}

async function printStats(path: string, json: boolean, watch: number | undefined): Promise<number> {
  const once = async (): Promise<void> => {
    const snap = (await request(path, 'stats')) as StatsSnapshot & { error?: string };
    if (snap.error) throw new UsageError(`${path}: ${snap.error}`);
    process.stdout.write(json ? `${JSON.stringify(snap)}\n` : `${formatStats(snap)}\n`);
  };
  try {
    await once();
    if (watch === undefined) return 0;
    const every = Number.isFinite(watch) && watch > 0 ? watch : 2;
    for (;;) {
      await new Promise((r) => setTimeout(r, every * 1000));
      if (!json && process.stdout.isTTY) process.stdout.write('\x1b[H\x1b[2J');
      await once();
    }
  } catch (e) {
    throw e instanceof UsageError ? e : new UsageError((e as Error).message);
  }
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
        'Serve a virtio-blk device backed by an image file or a Ceph RBD image',
        (y) =>
          addOpsOptions(y)
            .option('socket', { type: 'string', alias: 'socket-path', describe: `Unix socket path QEMU connects to [default: ${DEFAULT_BLK_SOCKET}]` })
            .option('fd', { type: 'number', describe: 'Serve on this already-listening socket fd instead of --socket-path' })
            .option('print-capabilities', { type: 'boolean', describe: 'Print the back-end capabilities (vhost-user.json) and exit' })
            .option('client', { type: 'boolean', default: false, describe: 'Connect to a front-end listening on --socket (QEMU server=on), reconnecting with backoff' })
            .option('file', { type: 'string', alias: 'blk-file', default: DEFAULT_BLK_IMAGE, describe: 'Disk image: a raw file or a block device (the default is created sparse, 1 GiB)' })
            .option('rbd', { type: 'string', describe: 'Serve a Ceph RBD image, POOL/IMAGE, instead of --file (needs librbd1)' })
            .option('ceph-conf', { type: 'string', describe: 'ceph.conf for --rbd [default: librados\' search, /etc/ceph/ceph.conf]' })
            .option('ceph-id', { type: 'string', describe: 'Ceph client name without "client." [default: admin]' })
            .option('ceph-keyring', { type: 'string', describe: 'Keyring for --ceph-id [default: from the conf]' })
            .option('ceph-timeout', { type: 'number', default: 30, describe: 'Seconds the Ceph monitors may take to answer at start-up' })
            .option('readonly', { type: 'boolean', alias: 'read-only', default: false, describe: 'Expose the disk read-only' })
            .option('num-queues', { type: 'number', default: 1, describe: `Request queues (1..64)` })
            .option('direct', { type: 'boolean', default: false, describe: 'Use O_DIRECT for aligned requests (bypasses the host page cache)' })
            .option('aio', { type: 'string', default: 'auto', choices: ['auto', 'io_uring', 'threads'], describe: 'Image I/O: io_uring, the thread pool, or io_uring where the kernel allows it' })
            .option('threads', { type: 'number', default: 0, describe: 'Queue threads the queues are spread over (each with its own io_uring); 0 serves them on the main thread' })
            .option('poll-us', { type: 'number', default: 0, describe: 'After a burst, busy-poll the queue this many µs (0..1000) before waiting for a kick: lower latency for more CPU' })
            .option('serial', { type: 'string', default: 'vhostd', describe: 'Serial number returned by GET_ID (at most 20 bytes)' })
            .option('logical-block-size', { type: 'number', default: 512, describe: 'Logical block size: 512 or 4096' })
            .example('$0 blk --socket /run/vhostd/disk0.sock --file /var/lib/images/disk0.img --num-queues 2', '')
            .example('$0 blk --socket /run/vhostd/disk1.sock --rbd rbd/vm1-disk --ceph-conf /etc/ceph/ceph.conf --ceph-id vhostd', '')
            .check((a) => {
              if (a.rbd !== undefined && a.file !== DEFAULT_BLK_IMAGE) throw new UsageError('--rbd and --file name two disks: give one');
              if (a.rbd !== undefined && a.direct) throw new UsageError('--direct is for files; RBD has no page cache to bypass');
              if (!(a['ceph-timeout'] > 0 && a['ceph-timeout'] <= 3600)) throw new UsageError('--ceph-timeout must be in (0, 3600] seconds');
              positiveInt('num-queues', a['num-queues'], 64);
              if (a['logical-block-size'] !== 512 && a['logical-block-size'] !== 4096) {
                throw new UsageError('--logical-block-size must be 512 or 4096');
              }
              if (new TextEncoder().encode(a.serial).length > 20) throw new UsageError('--serial must be at most 20 bytes');
              if (!Number.isInteger(a.threads) || a.threads < 0 || a.threads > a['num-queues']) {
                throw new UsageError(`--threads must be an integer in 0..${a['num-queues']} (the number of queues)`);
              }
              if (!Number.isInteger(a['poll-us']) || a['poll-us'] < 0 || a['poll-us'] > 1000) throw new UsageError('--poll-us must be an integer in 0..1000');
              return true;
            }),
        async (a) => {
          result = await runBlk({
            socket: a.socket,
            fd: a.fd,
            client: a.client,
            file: a.file,
            rbd: a.rbd,
            cephConf: a['ceph-conf'],
            cephId: a['ceph-id'],
            cephKeyring: a['ceph-keyring'],
            cephTimeout: a['ceph-timeout'],
            readonly: a.readonly,
            numQueues: a['num-queues'],
            direct: a.direct,
            aio: a.aio as Aio,
            pollUs: a['poll-us'],
            threads: a.threads,
            serial: a.serial,
            logicalBlockSize: a['logical-block-size'],
            logLevel: a['log-level'],
            control: a.control,
            metrics: a.metrics,
            id: a.id,
          });
        },
      )
      .command(
        'net',
        'Serve a virtio-net device backed by a tap interface',
        (y) =>
          addOpsOptions(y)
            .option('socket', { type: 'string', alias: 'socket-path', describe: `Unix socket path QEMU connects to [default: ${DEFAULT_NET_SOCKET}]` })
            .option('fd', { type: 'number', describe: 'Serve on this already-listening socket fd instead of --socket-path' })
            .option('print-capabilities', { type: 'boolean', describe: 'Print the back-end capabilities (vhost-user.json) and exit' })
            .option('client', { type: 'boolean', default: false, describe: 'Connect to a front-end listening on --socket (QEMU server=on), reconnecting with backoff' })
            .option('tap', { type: 'string', default: DEFAULT_TAP, describe: 'Tap interface: attached if it exists, else created (and brought up)' })
            .option('persist', { type: 'boolean', default: false, describe: 'Keep a tap that vhostd created after it exits' })
            .option('num-queues', { type: 'number', default: 1, describe: 'Queue pairs (1..16); more than one opens the tap multi-queue' })
            .option('threads', { type: 'number', describe: 'Threads the queue pairs are spread over (default: one per pair); 0 runs them on the main thread' })
            .option('mtu', { type: 'number', describe: 'Offer VIRTIO_NET_F_MTU with this maximum (68..65535); QEMU needs host_mtu=' })
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
            control: a.control,
            metrics: a.metrics,
            id: a.id,
          });
        },
      )
      .command(
        'stats',
        'Print a running daemon\'s counters (from its control socket)',
        (y) =>
          addControlClientOptions(y)
            .option('json', { type: 'boolean', default: false, describe: 'Print the snapshot as JSON' })
            .option('watch', { type: 'number', describe: 'Refresh every N seconds (default 2) until interrupted' })
            .example('$0 stats --control /run/vhostd/disk0.ctl', '')
            .example('$0 stats --socket /run/vhostd/net0.sock --watch 1', ''),
        async (a) => {
          const path = controlPathOf(a);
          result = await printStats(path, a.json, a.watch);
        },
      )
      .command(
        'resize',
        'Tell a running blk daemon that its image grew (as SIGHUP does): the guest sees the new size',
        (y) =>
          addControlClientOptions(y)
            .example('truncate -s +1G disk0.img && $0 resize --control /run/vhostd/disk0.ctl', ''),
        async (a) => {
          const path = controlPathOf(a);
          let r: { ok?: boolean; message?: string; error?: string };
          try {
            r = (await request(path, 'resize', 15_000)) as typeof r;
          } catch (e) {
            throw new UsageError((e as Error).message);
          }
          if (r.error) throw new UsageError(`${path}: ${r.error}`);
          process.stdout.write(`${r.message}\n`);
          result = r.ok ? 0 : 1;
        },
      )
      .demandCommand(1, 'name a command: vhostd blk --help, vhostd net --help, vhostd stats --help, vhostd resize --help')
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
