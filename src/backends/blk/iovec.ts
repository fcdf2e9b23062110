// struct iovec arrays written into a Uint32Array (base low, base high, length
// low, length high per entry), for the kernel (io_uring) and librbd alike.
import { native } from '../../native/index.js';
import { hostAddress } from '../../ring/guest-memory.js';

const TWO32 = 2 ** 32;

/** Entry i describes the bytes of `v` from `skip` on. */
export function putIovec(words: Uint32Array, i: number, v: Uint8Array, skip: number): void {
  const addr = (hostAddress(v) ?? Number(native.address(v))) + skip;
  const k = 4 * i;
  words[k] = addr % TWO32;
  words[k + 1] = Math.floor(addr / TWO32);
  words[k + 2] = v.byteLength - skip;
  words[k + 3] = 0;
}
