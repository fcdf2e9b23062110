#!/usr/bin/env python3
# Helper for the socket fuzzer: sends one vhost-user message carrying more
# than 8 fds in a single sendmsg(), which vhostd's own native binding (and so
# the TypeScript driver) refuses to do. One JSON request per stdin line:
#   {"path": SOCKET, "nfds": N, "msg": HEX, "probe": HEX}
# It connects, sends a GET_FEATURES (so a refused connection can be told from
# a closed one), then MSG with N fds, then PROBE, and reports what came back:
#   {"replies": [[request, flags, size, fds, payload_hex], ...], "eof": bool, "timeout": bool}
import json
import os
import select
import socket
import struct
import sys
import time

GET_FEATURES = struct.pack('<III', 1, 1, 0)


def fds_for(n):
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif i % 3 == 1:
            out.append(os.open('/dev/null', os.O_RDONLY | os.O_CLOEXEC))
        else:
            out.append(os.memfd_create('fuzz-extra', os.MFD_CLOEXEC))
    return out


def one(req):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = fds_for(req['nfds'])
    try:
        s.connect(req['path'])
        try:
            # A connection the daemon refuses (it still serves another) can fail the very
            # first send; what was read back (nothing, then EOF) tells the caller.
            s.sendall(GET_FEATURES)
            socket.send_fds(s, [bytes.fromhex(req['msg'])], fds)
            s.sendall(bytes.fromhex(req['probe']))
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b''
        replies = []
        eof = False
        timeout = False
        deadline = time.monotonic() + req.get('timeout', 5.0)
        want = req.get('want', 2)
        while len(replies) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                timeout = True
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                continue
            try:
                data, anc, _flags, _addr = s.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
            except ConnectionResetError:
                data, anc = b'', []
            nfd = 0
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    got = len(cdata) // 4
                    nfd += got
                    for fd in struct.unpack('<%di' % got, cdata[: got * 4]):
                        os.close(fd)
            if not data:
                eof = True
                break
            buf += data
            while len(buf) >= 12:
                rq, fl, sz = struct.unpack('<III', buf[:12])
                if sz > 4096 or len(buf) < 12 + sz:
                    break
                replies.append([rq, fl, sz, nfd, buf[12:12 + sz].hex()])
                nfd = 0
                buf = buf[12 + sz:]
        return {'replies': replies, 'eof': eof, 'timeout': timeout}
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            out = one(json.loads(line))
        except Exception as e:  # report, keep serving
            out = {'error': repr(e)}
        sys.stdout.write(json.dumps(out) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
