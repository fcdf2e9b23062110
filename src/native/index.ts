// Typed entry to the N-API module. See vhostd_native.c: syscalls only.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface Native {
  /** Bind and listen on an AF_UNIX stream socket; throws Error with .code. */
  listen(path: string, backlog: number): number;
  /** Accept one connection: fd, or -errno (-EAGAIN when none is pending). */
  accept(fd: number): number;
  /** Connect to an AF_UNIX stream socket: fd, or -errno. */
  connect(path: string): number;
  /** [bytes or -errno, fd count written to fdsOut, MSG_CTRUNC|MSG_TRUNC bits]. */
  recvmsg(fd: number, buf: Uint8Array, fdsOut: Int32Array): [number, number, number];
  /** Bytes sent, or -errno. */
  sendmsg(fd: number, buf: Uint8Array, fds: number[]): number;
  /** Call cb on the calling thread's loop whenever fd is ready (1 readable, 2 writable). */
  watch(fd: number, events: number, cb: (status: number, events: number) => void): WatchHandle;
  unwatch(handle: WatchHandle): void;
  /** Change what a watcher waits for (POLL_READABLE | POLL_WRITABLE); 0 pauses it. */
  setEvents(handle: WatchHandle, events: number): void;
  eventfd(initval: number, flags: number): number;
  memfdCreate(name: string, flags: number): number;
  read(fd: number, buf: ArrayBufferView): number;
  write(fd: number, buf: ArrayBufferView): number;
  close(fd: number): number;
  /** dup(2), close-on-exec: the new fd, or -errno. */
  dup(fd: number): number;
  ioctl(fd: number, request: number | bigint, arg: number | ArrayBufferView): number;
  mmap(fd: number, length: number | bigint, offset: number | bigint, prot: number): bigint;
  munmap(address: bigint, length: number | bigint): void;
  /** ArrayBuffer over [address, address+length); detach() it before munmap(). */
  view(address: bigint, length: number): ArrayBuffer;
  detach(buffer: ArrayBuffer): void;
  address(view: ArrayBufferView): bigint;
  pageSize(): number;
  /** fallocate(2): 0 or -errno. */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  /**
   * fallocate(2) on libuv's thread pool; cb runs on the calling thread's loop
   * (main thread or worker) with 0 or -errno. For anything that may zero-fill:
   * the synchronous one blocks the loop for as long as the kernel takes.
   */
  fallocateAsync(fd: number, mode: number, offset: number, length: number, cb: (rc: number) => void): void;
  /** Synchronous vectored I/O for non-blocking fds: bytes, or -errno. */
  readv(fd: number, views: ArrayBufferView[]): number;
  writev(fd: number, views: ArrayBufferView[]): number;
  /** socket(2), close-on-exec; throws on failure. */
  socket(domain: number, type: number, protocol: number): number;
  /** fcntl(2) with an integer argument: the result, or -errno. */
  fcntl(fd: number, cmd: number, arg: number): number;
  /** getsockopt(2) for an int-valued option: its value, or -errno. */
  getsockoptInt(fd: number, level: number, name: number): number;
  /**
   * One datagram to an AF_UNIX SOCK_DGRAM socket at path ('@name' is the
   * abstract namespace) from a fresh socket: bytes sent, or -errno.
   */
  sendDatagram(path: string, data: Uint8Array): number;
  /** io_uring_setup(2): params is struct io_uring_params (120 bytes, filled in); the ring fd, or -errno. */
  ioUringSetup(entries: number, params: Uint8Array): number;
  /** io_uring_enter(2) without a signal mask: the number submitted, or -errno. */
  ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number;
  /** io_uring_register(2): the result, or -errno. */
  ioUringRegister(fd: number, opcode: number, arg: ArrayBufferView | null, nrArgs: number): number;
  /** pipe2(2): [read end, write end]; throws on failure. */
  pipe2(flags: number): [number, number];

  // librados/librbd (rbd.c), opened with dlopen at first use. Each throws
  // (code ENOLIBRBD) when the libraries cannot be loaded; handles are BigInts.
  /** Why librbd cannot be used, or '' when it can. */
  rbdLoadError(): string;
  radosCreate(id: string | null): bigint | number;
  radosConfReadFile(cluster: bigint, path: string | null): number;
  radosConfSet(cluster: bigint, option: string, value: string): number;
  /** Blocks up to client_mount_timeout: 0 or -errno. */
  radosConnect(cluster: bigint): number;
  radosShutdown(cluster: bigint): void;
  radosIoctxCreate(cluster: bigint, pool: string): bigint | number;
  radosIoctxDestroy(ioctx: bigint): void;
  rbdOpen(ioctx: bigint, name: string): bigint | number;
  rbdClose(image: bigint): number;
  rbdGetSize(image: bigint): number;
  /**
   * Start one asynchronous request (RBD_OP_*): 0, or -errno. When it completes,
   * the completion is released and {tag (u32), result (i32: bytes or -errno)} is
   * written (8 bytes) to fd. `iov` is the address of `iovcnt` struct iovec
   * (readv, writev); `length` is for discard and write-zeroes.
   */
  rbdAio(op: number, image: bigint, fd: number, tag: number, iov: number, iovcnt: number, offset: number, length: number): number;
  /** Write the eventfd whenever the image header changes: a watch handle, or -errno. */
  rbdUpdateWatch(image: bigint, eventfd: number): bigint | number;
  rbdUpdateUnwatch(image: bigint, watch: bigint): number;
}

export const RBD_OP_READV = 0;
export const RBD_OP_WRITEV = 1;
export const RBD_OP_FLUSH = 2;
export const RBD_OP_DISCARD = 3;
export const RBD_OP_WRITE_ZEROES = 4;
export const O_CLOEXEC = 0o2000000;

export type WatchHandle = { readonly __brand: 'WatchHandle' };

export const POLL_READABLE = 1;
export const POLL_WRITABLE = 2;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
export const MFD_CLOEXEC = 1;
export const EAGAIN = 11;
export const EINTR = 4;
export const EOPNOTSUPP = 95;
export const F_GETFD = 1;
export const F_SETFD = 2;
export const F_GETFL = 3;
export const F_SETFL = 4;
/** Pipe capacity in bytes (Linux): set rounds up to a power-of-two number of pages; get returns it. */
export const F_SETPIPE_SZ = 1031;
export const F_GETPIPE_SZ = 1032;
export const FD_CLOEXEC = 1;
export const O_NONBLOCK = 0o4000;
export const SOL_SOCKET = 1;
export const SO_TYPE = 3;
export const SO_ACCEPTCONN = 30;
export const SO_DOMAIN = 39;
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const ENOTSOCK = 88;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

function locate(): string {
  // Works from src/ (tests, tsx) and from dist/ (installed), both two levels below the root.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    const candidate = join(dir, 'build', 'Release', 'vhostd_native.node');
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  throw new Error('vhostd native module not built: run `npm ci` (it runs node-gyp) in the vhostd directory');
}

export const native: Native = createRequire(import.meta.url)(locate()) as Native;

/** Throw a Node-style error for a negative errno returned by a native call. */
export function errnoError(what: string, negErrno: number): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`${what} failed: errno ${-negErrno}`);
  err.errno = -negErrno;
  return err;
}
