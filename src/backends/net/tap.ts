// A Linux tap interface opened with a virtio-net header: one fd per queue.
import { closeSync, constants, existsSync, openSync } from 'node:fs';
import { DeviceError } from '../../device.js';
import { native } from '../../native/index.js';

const TUNSETIFF = 0x400454ca;
const TUNSETPERSIST = 0x400454cb;
const TUNSETOFFLOAD = 0x400454d0;
const TUNSETVNETHDRSZ = 0x400454d8;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
const SIOCGIFMTU = 0x8921;
const SIOCSIFMTU = 0x8922;
const IFF_UP = 0x1;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const IFF_MULTI_QUEUE = 0x0100;
const IFNAMSIZ = 16;
const IFREQ_SIZE = 40;
const AF_INET = 2;
const SOCK_DGRAM = 2;

export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;

/** A device error, so a failing tap ioctl during negotiation closes the connection with its reason. */
export class TapError extends DeviceError {}

function ifreq(name: string): Uint8Array {
  const req = new Uint8Array(IFREQ_SIZE);
  const bytes = new TextEncoder().encode(name);
  req.set(bytes);
  return req;
}

function explain(what: string, name: string, errno: number): TapError {
  const why: Record<number, string> = {
    1: 'operation not permitted: vhostd needs CAP_NET_ADMIN (run as root)',
    13: 'permission denied: vhostd needs CAP_NET_ADMIN (run as root)',
    16: 'device busy: the tap exists with different flags (single-queue vs multi-queue) or is in use',
    19: 'no such device',
    22: 'invalid argument: is it a tap (not a tun) interface?',
  };
  return new TapError(`tap ${name}: ${what} failed: ${why[errno] ?? `errno ${errno}`}`);
}

export interface TapOptions {
  name: string;
  queues: number;
  /** Keep a tap we created after exit. */
  persist: boolean;
}

export class Tap {
  readonly name: string;
  readonly fds: number[] = [];
  /** True if the interface did not exist and vhostd created it. */
  readonly created: boolean;

  constructor(opts: TapOptions) {
    if (!opts.name || new TextEncoder().encode(opts.name).length >= IFNAMSIZ || /[/\s:]/.test(opts.name)) {
      throw new TapError(`tap name "${opts.name}" is not a valid interface name (1-15 bytes, no '/', ':' or spaces)`);
    }
    this.name = opts.name;
    this.created = !existsSync(`/sys/class/net/${opts.name}`);
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (opts.queues > 1) flags |= IFF_MULTI_QUEUE;
    try {
      for (let i = 0; i < opts.queues; i++) {
        let fd: number;
        try {
          fd = openSync('/dev/net/tun', constants.O_RDWR | constants.O_NONBLOCK);
        } catch (e) {
          const hint = (e as NodeJS.ErrnoException).code === 'EACCES'
            ? 'udev normally makes it mode 0666; without udev: chmod 0666 /dev/net/tun'
            : 'is the tun module loaded?';
          throw new TapError(`cannot open /dev/net/tun: ${(e as Error).message} (${hint})`);
        }
        this.fds.push(fd);
        const req = ifreq(opts.name);
        new DataView(req.buffer).setUint16(IFNAMSIZ, flags, true);
        const rc = native.ioctl(fd, TUNSETIFF, req);
        if (rc < 0) throw explain('TUNSETIFF', opts.name, -rc);
      }
      if (this.created && opts.persist) {
        const rc = native.ioctl(this.fds[0]!, TUNSETPERSIST, 1);
        if (rc < 0) throw explain('TUNSETPERSIST', opts.name, -rc);
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  get queues(): number {
    return this.fds.length;
  }

  setVnetHdrSize(bytes: number): void {
    const v = new Int32Array([bytes]);
    for (const fd of this.fds) {
      const rc = native.ioctl(fd, TUNSETVNETHDRSZ, v);
      if (rc < 0) throw explain('TUNSETVNETHDRSZ', this.name, -rc);
    }
  }

  /**
   * TUNSETOFFLOAD on every queue. The kernel refuses (EINVAL) any flag it does
   * not know or that lacks its prerequisite: everything needs TUN_F_CSUM, and
   * TUN_F_TSO_ECN needs TUN_F_TSO4 or TUN_F_TSO6.
   */
  setOffload(flags: number): void {
    for (const fd of this.fds) {
      const rc = native.ioctl(fd, TUNSETOFFLOAD, flags);
      if (rc < 0) throw explain('TUNSETOFFLOAD', this.name, -rc);
    }
  }

  /** Interface-level ioctls go through an ordinary socket. */
  private withSocket<T>(fn: (fd: number) => T): T {
    const fd = native.socket(AF_INET, SOCK_DGRAM, 0);
    try {
      return fn(fd);
    } finally {
      native.close(fd);
    }
  }

  /** The interface's MTU now (SIOCGIFMTU): an admin may change it at any time. */
  mtu(): number {
    return this.withSocket((s) => {
      const req = ifreq(this.name);
      const rc = native.ioctl(s, SIOCGIFMTU, req);
      if (rc < 0) throw explain('SIOCGIFMTU', this.name, -rc);
      return new DataView(req.buffer).getInt32(IFNAMSIZ, true);
    });
  }

  setMtu(mtu: number): void {
    this.withSocket((s) => {
      const req = ifreq(this.name);
      new DataView(req.buffer).setInt32(IFNAMSIZ, mtu, true);
      const rc = native.ioctl(s, SIOCSIFMTU, req);
      if (rc < 0) throw explain('SIOCSIFMTU', this.name, -rc);
    });
  }

  /** Bring the interface up (a tap vhostd created starts down). */
  up(): void {
    this.withSocket((s) => {
      const req = ifreq(this.name);
      if (native.ioctl(s, SIOCGIFFLAGS, req) < 0) return;
      const dv = new DataView(req.buffer);
      dv.setUint16(IFNAMSIZ, dv.getUint16(IFNAMSIZ, true) | IFF_UP, true);
      const rc = native.ioctl(s, SIOCSIFFLAGS, req);
      if (rc < 0) throw explain('SIOCSIFFLAGS', this.name, -rc);
    });
  }

  /** Close every queue; a non-persistent tap we created disappears with its last fd. */
  close(): void {
    for (const fd of this.fds.splice(0)) closeSync(fd);
  }
}
