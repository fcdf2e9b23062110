// Host end of a TCP integrity check: `recv PORT BYTES` hashes what it receives,
// `send PORT BYTES [RATE]` sends seeded pseudo-random bytes (at most RATE bytes
// a second when given); both print the md5 and exit.
import { createHash } from 'node:crypto';
import { createServer } from 'node:net';

const [mode, port, total, rate] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4]), Number(process.argv[5] ?? 0)];
const hash = createHash('md5');
const server = createServer({ allowHalfOpen: true }, (sock) => {
  server.close();
  if (mode === 'recv') {
    let got = 0;
    sock.on('data', (d) => {
      const take = d.subarray(0, Math.max(0, total - got));
      hash.update(take);
      got += take.length;
      if (got >= total) {
        console.log(hash.digest('hex'));
        sock.end();
        sock.destroy();
        process.exit(0);
      }
    });
    sock.on('end', () => {
      console.error(`connection ended after ${got} of ${total} bytes`);
      process.exit(1);
    });
  } else {
    let x = 0x12345678;
    const chunk = Buffer.alloc(64 * 1024);
    let sent = 0;
    const started = Date.now();
    const pump = () => {
      while (sent < total) {
        const ahead = rate > 0 ? sent - (rate * (Date.now() - started)) / 1000 : 0;
        if (ahead > 0) return setTimeout(pump, Math.ceil((1000 * ahead) / rate));
        const n = Math.min(chunk.length, total - sent);
        for (let i = 0; i < n; i += 4) {
          x = (x * 1103515245 + 12345) >>> 0;
          chunk.writeUInt32LE(x, i);
        }
        const piece = Buffer.from(chunk.subarray(0, n));
        hash.update(piece);
        sent += n;
        if (!sock.write(piece)) return sock.once('drain', pump);
      }
      console.log(hash.digest('hex'));
      sock.end(() => process.exit(0));
    };
    pump();
  }
});
server.listen(port, '0.0.0.0');
setTimeout(() => {
  console.error('tcp peer timed out');
  process.exit(2);
}, 300_000).unref();
