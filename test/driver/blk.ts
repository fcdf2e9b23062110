// virtio-blk requests (VIRTIO 1.x §5.2.6) on a SplitQueue: header, data and
// status buffers in guest memory, any split into descriptors, direct or
// indirect, and completions matched to their requests by head.
import type { GuestMemory } from './guest.js';
import type { Buf, SplitQueue, UsedElem } from './virtqueue.js';

export const T = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const;
export const S = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;
export const SECTOR = 512;
export const ID_BYTES = 20;
/** Written into status bytes and IN buffers before submission, to tell "untouched" from "written". */
export const POISON = 0xa5;

export interface BlkRequest {
  type: number;
  sector?: bigint | number;
  /** Bytes after the header (OUT data, discard/write-zeroes segments). */
  out?: Uint8Array;
  /** Bytes the device writes before the status byte (IN data, GET_ID). */
  inLen?: number;
  /** Descriptor lengths for the data part (must sum to its size). */
  split?: number[];
  indirect?: boolean;
  /** Place the data contiguously at this gpa (the test owns that memory). */
  dataGpa?: number;
  /** Allocate header, data, status (and indirect table) in this region. */
  region?: number;
  /** Header and OUT data in one descriptor; IN data and status in one descriptor. */
  merged?: boolean;
}

export interface BlkResult {
  status: number;
  /** The IN bytes as the device left them. */
  data: Uint8Array;
  usedLen: number;
  head: number;
  /** Where the status byte was (the device wrote it; a dirty log must show its page). */
  statusGpa: number;
}

export interface Segment {
  sector: bigint | number;
  sectors: number;
  flags?: number;
}

export function segments(list: Segment[]): Uint8Array {
  const b = new Uint8Array(16 * list.length);
  const dv = new DataView(b.buffer);
  list.forEach((s, i) => {
    dv.setBigUint64(i * 16, BigInt(s.sector), true);
    dv.setUint32(i * 16 + 8, s.sectors, true);
    dv.setUint32(i * 16 + 12, s.flags ?? 0, true);
  });
  return b;
}

export function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) crypto.getRandomValues(b.subarray(off, Math.min(n, off + 65536)));
  return b;
}

interface Pending {
  resolve: (r: BlkResult) => void;
  reject: (e: Error) => void;
  finish: (u: UsedElem) => BlkResult;
}

function splitLengths(total: number, split?: number[]): number[] {
  if (!split) return total ? [total] : [];
  if (split.reduce((a, b) => a + b, 0) !== total) throw new Error(`split ${split} does not add up to ${total}`);
  return split;
}

export class BlkQueue {
  timeoutMs = 10_000;
  private readonly pending = new Map<number, Pending>();
  private pumping = false;

  constructor(
    readonly q: SplitQueue,
    private readonly mem: GuestMemory,
  ) {}

  get inFlight(): number {
    return this.pending.size;
  }

  /** Build and publish a request without kicking. */
  submit(req: BlkRequest): Promise<BlkResult> {
    const mem = this.mem;
    const allocs: number[] = [];
    const alloc = (n: number, align = 8): number => {
      const g = mem.alloc(Math.max(n, 1), align, req.region);
      allocs.push(g);
      return g;
    };
    const out = req.out ?? new Uint8Array(0);
    const inLen = req.inLen ?? 0;
    const hdr = new Uint8Array(16);
    const hv = new DataView(hdr.buffer);
    hv.setUint32(0, req.type, true);
    hv.setBigUint64(8, BigInt(req.sector ?? 0), true);

    const bufs: Buf[] = [];
    const inPieces: { gpa: number; len: number }[] = [];
    let statusGpa: number;
    if (req.merged) {
      const h = alloc(16 + out.length);
      mem.write(h, hdr);
      mem.write(h + 16, out);
      bufs.push({ gpa: h, len: 16 + out.length, write: false });
      const w = alloc(inLen + 1);
      mem.fill(w, inLen + 1, POISON);
      inPieces.push({ gpa: w, len: inLen });
      bufs.push({ gpa: w, len: inLen + 1, write: true });
      statusGpa = w + inLen;
    } else {
      const h = alloc(16);
      mem.write(h, hdr);
      bufs.push({ gpa: h, len: 16, write: false });
      const dataLen = out.length || inLen;
      const base = dataLen ? (req.dataGpa ?? alloc(dataLen, 512)) : 0;
      if (out.length) mem.write(base, out);
      else if (inLen) mem.fill(base, inLen, POISON);
      let off = 0;
      for (const len of splitLengths(dataLen, req.split)) {
        bufs.push({ gpa: base + off, len, write: out.length === 0 });
        if (!out.length) inPieces.push({ gpa: base + off, len });
        off += len;
      }
      statusGpa = alloc(1, 1);
      mem.fill(statusGpa, 1, POISON);
      bufs.push({ gpa: statusGpa, len: 1, write: true });
    }

    let head: number;
    try {
      head = this.q.submit(bufs, { indirect: req.indirect, tableRegion: req.region });
    } catch (e) {
      for (const g of allocs) mem.free(g);
      throw e;
    }
    const p = new Promise<BlkResult>((resolve, reject) => {
      this.pending.set(head, {
        resolve,
        reject,
        finish: (u) => {
          const data = new Uint8Array(inLen);
          let o = 0;
          for (const piece of inPieces) {
            data.set(mem.read(piece.gpa, piece.len), o);
            o += piece.len;
          }
          const status = mem.read(statusGpa, 1)[0]!;
          for (const g of allocs) mem.free(g);
          return { status, data, usedLen: u.len, head: u.id, statusGpa };
        },
      });
    });
    void this.pump();
    return p;
  }

  kick(): void {
    this.q.kick();
  }

  run(req: BlkRequest): Promise<BlkResult> {
    const p = this.submit(req);
    this.kick();
    return p;
  }

  /** Submit all, kick once, wait for all. */
  runAll(reqs: BlkRequest[]): Promise<BlkResult[]> {
    const ps = reqs.map((r) => this.submit(r));
    this.kick();
    return Promise.all(ps);
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.pending.size) {
        const done = await this.q.waitUsed(1, this.timeoutMs);
        for (const u of done) {
          const p = this.pending.get(u.id)!;
          this.pending.delete(u.id);
          p.resolve(p.finish(u));
        }
      }
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    } finally {
      this.pumping = false;
    }
  }

  // ---- conveniences ----

  read(sector: bigint | number, len: number, opts: Partial<BlkRequest> = {}): Promise<BlkResult> {
    return this.run({ ...opts, type: T.IN, sector, inLen: len });
  }

  write(sector: bigint | number, data: Uint8Array, opts: Partial<BlkRequest> = {}): Promise<BlkResult> {
    return this.run({ ...opts, type: T.OUT, sector, out: data });
  }

  flush(): Promise<BlkResult> {
    return this.run({ type: T.FLUSH });
  }

  getId(opts: Partial<BlkRequest> = {}): Promise<BlkResult> {
    return this.run({ ...opts, type: T.GET_ID, inLen: ID_BYTES });
  }

  discard(segs: Segment[]): Promise<BlkResult> {
    return this.run({ type: T.DISCARD, out: segments(segs) });
  }

  writeZeroes(segs: Segment[]): Promise<BlkResult> {
    return this.run({ type: T.WRITE_ZEROES, out: segments(segs) });
  }
}
