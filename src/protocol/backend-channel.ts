// The BACKEND_REQ channel: the socket the front-end hands over with
// SET_BACKEND_REQ_FD, on which the back-end sends requests of its own
// (CONFIG_CHANGE_MSG for an online resize). One request at a time, each
// answered within a deadline when REPLY_ACK asks for an answer: a front-end
// that never answers costs a timeout and a log line, never a stuck daemon.
import { native, EAGAIN, F_GETFL, F_SETFL, O_NONBLOCK, POLL_READABLE, type WatchHandle } from '../native/index.js';
import { encodeMessage, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE } from './messages.js';

const VERSION = 1;
const REPLY_TIMEOUT_MS = 5000;

export class BackendChannel {
  private busy = false;
  private closed = false;
  private readonly reply = new Uint8Array(HEADER_SIZE + 8);
  private readonly fdsOut = new Int32Array(8);

  constructor(
    private readonly fd: number,
    /** REPLY_ACK was negotiated: ask for, and wait for, an answer. */
    private readonly ack: boolean,
  ) {
    const fl = native.fcntl(fd, F_GETFL, 0);
    if (fl >= 0) native.fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  }

  /** Send a request without payload; resolves to undefined, or why it failed. */
  async request(request: number): Promise<string | undefined> {
    if (this.closed) return 'the channel is closed';
    if (this.busy) return 'another request is still waiting for its answer';
    this.busy = true;
    try {
      const msg = encodeMessage(request, VERSION | (this.ack ? FLAG_NEED_REPLY : 0));
      const n = native.sendmsg(this.fd, msg, []);
      if (n !== msg.length) return n < 0 ? `send failed: errno ${-n}` : `short send (${n} of ${msg.length} bytes)`;
      if (!this.ack) return undefined;
      return await this.awaitReply(request);
    } finally {
      this.busy = false;
    }
  }

  private awaitReply(request: number): Promise<string | undefined> {
    return new Promise((resolve) => {
      let watch: WatchHandle | undefined;
      const done = (why: string | undefined): void => {
        clearTimeout(timer);
        if (watch) native.unwatch(watch);
        watch = undefined;
        resolve(why);
      };
      const timer = setTimeout(() => done(`no answer within ${REPLY_TIMEOUT_MS} ms`), REPLY_TIMEOUT_MS);
      watch = native.watch(this.fd, POLL_READABLE, (status) => {
        if (status < 0) return done(`the channel failed: errno ${-status}`);
        const [n, nfds] = native.recvmsg(this.fd, this.reply, this.fdsOut);
        for (let i = 0; i < nfds; i++) native.close(this.fdsOut[i]!);
        if (n === -EAGAIN) return;
        if (n === 0) return done('the front-end closed the channel');
        if (n < 0) return done(`receive failed: errno ${-n}`);
        if (n !== HEADER_SIZE + 8) return done(`an answer of ${n} bytes (expected ${HEADER_SIZE + 8})`);
        const dv = new DataView(this.reply.buffer);
        const req = dv.getUint32(0, true);
        const flags = dv.getUint32(4, true);
        if (req !== request || !(flags & FLAG_REPLY)) return done(`an answer to request ${req} with flags 0x${flags.toString(16)}`);
        const rc = dv.getBigUint64(HEADER_SIZE, true);
        done(rc === 0n ? undefined : `the front-end answered ${rc}`);
      });
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.close(this.fd);
  }
}
