// A descriptor chain resolved into views of guest memory, whatever the ring
// layout, and the one cursor devices read and write it through. The limits of
// src/limits.ts are enforced while the chain is resolved (split-ring.ts), so a
// device never sees more than MAX_CHAIN_SEGMENTS views.
import { MAX_CHAIN_SEGMENTS } from '../limits.js';

const NO_VIEW = new Uint8Array(0);

export class DescriptorChain {
  head = 0;
  /** Views of guest memory: readable ones first, then writable. Only [0, count) are valid. */
  readonly segs: Uint8Array[] = new Array<Uint8Array>(MAX_CHAIN_SEGMENTS).fill(NO_VIEW);
  /** The descriptor (its ordinal in the chain) each segment came from: for seg_max and size_max. */
  readonly descOf = new Uint16Array(MAX_CHAIN_SEGMENTS);
  /** The guest physical address each segment starts at: what the dirty log marks. */
  readonly gpaOf = new Float64Array(MAX_CHAIN_SEGMENTS);
  count = 0;
  readableSegs = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Descriptors walked, the indirect one included. */
  descriptors = 0;
  /**
   * Why the chain cannot be served as the driver meant it, or undefined. A
   * faulty chain's views may be incomplete and must not be used for I/O.
   */
  fault: string | undefined;
  /**
   * The last writable byte (virtio-blk's status), when the chain could be
   * walked to its end and that byte is in guest memory; else undefined.
   */
  statusBytes: Uint8Array | undefined;
  statusIndex = 0;
  /** Guest physical address of the status byte, and whether writeStatus() wrote it. */
  statusGpa = 0;
  statusWritten = false;

  reset(head: number): void {
    this.head = head;
    for (let i = 0; i < this.count; i++) this.segs[i] = NO_VIEW; // drop references into guest memory
    this.count = 0;
    this.readableSegs = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.descriptors = 0;
    this.fault = undefined;
    this.statusBytes = undefined;
    this.statusIndex = 0;
    this.statusWritten = false;
  }

  /** Room for another segment? */
  get full(): boolean {
    return this.count === MAX_CHAIN_SEGMENTS;
  }

  push(view: Uint8Array, desc: number, writable: boolean, gpa: number): void {
    const i = this.count++;
    this.segs[i] = view;
    this.descOf[i] = desc;
    this.gpaOf[i] = gpa;
    if (!writable) this.readableSegs = this.count;
  }

  /** Forget segments from index n on. */
  truncate(n: number): void {
    while (this.count > n) this.segs[--this.count] = NO_VIEW;
    if (this.readableSegs > n) this.readableSegs = n;
  }

  /** Take over another chain's contents (a peeked chain handed to its consumer). */
  copyFrom(o: DescriptorChain): void {
    this.reset(o.head);
    for (let i = 0; i < o.count; i++) {
      this.segs[i] = o.segs[i]!;
      this.descOf[i] = o.descOf[i]!;
      this.gpaOf[i] = o.gpaOf[i]!;
    }
    this.count = o.count;
    this.readableSegs = o.readableSegs;
    this.readableBytes = o.readableBytes;
    this.writableBytes = o.writableBytes;
    this.descriptors = o.descriptors;
    this.fault = o.fault;
    this.statusBytes = o.statusBytes;
    this.statusIndex = o.statusIndex;
    this.statusGpa = o.statusGpa;
    this.statusWritten = o.statusWritten;
  }

  /** Write the status byte; false when the chain has none. */
  writeStatus(value: number): boolean {
    if (!this.statusBytes) return false;
    this.statusBytes[this.statusIndex] = value;
    this.statusWritten = true;
    return true;
  }
}

/**
 * A cursor over one part of a chain (readable or writable): copy small
 * things out or in, skip, or take views of the next bytes for vectored I/O.
 * Reused across chains, so it allocates nothing per request.
 */
abstract class Cursor {
  protected chain: DescriptorChain | undefined;
  protected seg = 0;
  protected off = 0;
  protected end = 0;
  /** Bytes left after the cursor. */
  remaining = 0;
  /** Descriptors the last views() call spanned, and the most bytes it took from any one of them. */
  spanDescriptors = 0;
  spanLargest = 0;

  protected place(chain: DescriptorChain, first: number, end: number, bytes: number): void {
    this.chain = chain;
    this.seg = first;
    this.off = 0;
    this.end = end;
    this.remaining = bytes;
  }

  /** Leave the last n bytes out of what the cursor hands out (blk's status byte); false if there are fewer. */
  reserveTail(n: number): boolean {
    if (n > this.remaining) return false;
    this.remaining -= n;
    return true;
  }

  /** Move past n bytes; false (cursor unchanged) when fewer remain. */
  skip(n: number): boolean {
    if (n > this.remaining) return false;
    this.walk(n, undefined, undefined);
    return true;
  }

  /** Append views of the next n bytes to `out` (no copy) and move past them; false when fewer remain. */
  views(n: number, out: Uint8Array[]): boolean {
    if (n > this.remaining) return false;
    this.walk(n, out, undefined);
    return true;
  }

  protected walk(n: number, out: Uint8Array[] | undefined, copy: { buf: Uint8Array; toGuest: boolean } | undefined): void {
    const c = this.chain!;
    let left = n;
    let done = 0;
    let descs = 0;
    let largest = 0;
    let curDesc = -1;
    let curBytes = 0;
    this.remaining -= n;
    while (left > 0) {
      const s = c.segs[this.seg]!;
      const take = Math.min(left, s.byteLength - this.off);
      if (take === 0 && this.seg >= this.end - 1) break; // cannot happen while remaining is right; never spin
      if (take > 0) {
        if (out) out.push(this.off === 0 && take === s.byteLength ? s : s.subarray(this.off, this.off + take));
        if (copy) {
          if (copy.toGuest) s.set(copy.buf.subarray(done, done + take), this.off);
          else copy.buf.set(s.subarray(this.off, this.off + take), done);
        }
        const d = c.descOf[this.seg]!;
        if (d !== curDesc) {
          curDesc = d;
          curBytes = 0;
          descs++;
        }
        curBytes += take;
        if (curBytes > largest) largest = curBytes;
        done += take;
        left -= take;
        this.off += take;
      }
      if (this.off === s.byteLength && this.seg < this.end - 1) {
        this.seg++;
        this.off = 0;
      }
    }
    this.spanDescriptors = descs;
    this.spanLargest = largest;
  }
}

/** The driver-to-device part of a chain. */
export class ChainReader extends Cursor {
  reset(chain: DescriptorChain): this {
    this.place(chain, 0, chain.readableSegs, chain.readableBytes);
    return this;
  }

  /** Copy the next dst.length bytes into dst; false (cursor unchanged) when fewer remain. */
  read(dst: Uint8Array): boolean {
    if (dst.length > this.remaining) return false;
    this.walk(dst.length, undefined, { buf: dst, toGuest: false });
    return true;
  }
}

/** The device-to-driver part of a chain; counts what was written for the used length. */
export class ChainWriter extends Cursor {
  /** Bytes written (or handed out as views to be filled) so far. */
  written = 0;

  reset(chain: DescriptorChain): this {
    this.place(chain, chain.readableSegs, chain.count, chain.writableBytes);
    this.written = 0;
    return this;
  }

  /** Copy src in at the cursor; false (nothing written) when it does not fit. */
  write(src: Uint8Array): boolean {
    if (src.length > this.remaining) return false;
    this.walk(src.length, undefined, { buf: src, toGuest: true });
    this.written += src.length;
    return true;
  }

  /** Views of the next n bytes, to be filled by I/O; they count as written. */
  override views(n: number, out: Uint8Array[]): boolean {
    if (!super.views(n, out)) return false;
    this.written += n;
    return true;
  }

  /** Little-endian u16 at byte `at` of the writable part, without moving the cursor (net's num_buffers). */
  pokeU16(at: number, value: number): boolean {
    const c = this.chain!;
    if (at + 2 > c.writableBytes) return false;
    let off = at;
    let byte = 0;
    for (let i = c.readableSegs; i < c.count && byte < 2; i++) {
      const s = c.segs[i]!;
      while (off < s.byteLength && byte < 2) {
        s[off++] = byte === 0 ? value & 0xff : (value >> 8) & 0xff;
        byte++;
      }
      off -= s.byteLength;
      if (off < 0) off = 0;
    }
    return true;
  }
}
