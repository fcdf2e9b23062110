#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for the RBD tests and benchmarks: one
# monitor, one manager and one bluestore OSD on a sparse file, bound to
# 127.0.0.1, everything (config, keys, data, logs, sockets) inside DIR.
#
#   cluster.sh start DIR [PORT]   create and start it; prints CONF=, KEYRING=, POOL=
#   cluster.sh stop DIR           stop its daemons and remove DIR
#
# Needs Debian's ceph-mon, ceph-mgr, ceph-osd and ceph-common (provisioned by
# test/ceph/provision.sh). Logs go to stderr.
set -euo pipefail

log() { echo "ceph-cluster: $*" >&2; }
die() { echo "ceph-cluster: error: $*" >&2; exit 1; }

cmd=${1:-}
DIR=${2:-}
[[ -n $cmd && -n $DIR ]] || die "usage: $0 start|stop DIR [PORT]"

# Daemons inherit every fd of whoever starts them; a pipe left open keeps the
# caller waiting for an EOF that never comes. Close all but stdio first.
close_fds() {
    local fd
    for fd in /proc/$$/fd/*; do
        fd=${fd##*/}
        [[ $fd -gt 2 ]] && eval "exec $fd>&-" 2>/dev/null || true
    done
}

# Running, not a zombie: where PID 1 does not reap, a daemon that exited stays
# one, and kill -0 would keep the wait below going for its full 5 s.
running() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st%% *} != Z ]]
}

stop() {
    local pid f
    [[ -d $DIR/run ]] || { rm -rf "$DIR"; return 0; }
    # The OSD first: it tells the monitor it is going down, and with no monitor
    # left it waits osd_mon_shutdown_timeout (5 s) for the answer.
    for f in "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid "$DIR"/run/mon.*.pid; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        [[ $f == */osd.* ]] || continue
        for _ in $(seq 30); do running "$pid" || break; sleep 0.1; done
    done
    for _ in $(seq 50); do
        local alive=0
        for f in "$DIR"/run/*.pid; do
            [[ -f $f ]] && running "$(cat "$f")" && alive=1
        done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for f in "$DIR"/run/*.pid; do
        [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

if [[ $cmd == stop ]]; then
    stop
    exit 0
fi
[[ $cmd == start ]] || die "unknown command $cmd"

PORT=${3:-$((20000 + RANDOM % 20000))}
for b in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd; do
    command -v "$b" >/dev/null || die "$b is missing: run test/ceph/provision.sh"
done
[[ -e $DIR ]] && die "$DIR exists"
mkdir -p "$DIR"/{run,log,mon.a,mgr.x,osd.0}
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
KEYRING=$DIR/keyring
FSID=$(cat /proc/sys/kernel/random/uuid)
trap 'log "start failed; logs in $DIR/log"; tail -n 20 "$DIR"/log/*.log >&2 2>/dev/null || true; stop' ERR

cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$PORT
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth allow insecure global id reclaim = false
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
paxos propose interval = 0.1
# HEALTH_WARN below 30% free by default: a host's disk that full says nothing about this cluster.
mon data avail warn = 2
# A killed client's exclusive lock is broken once its watch lapses: 5 s, not 30.
osd client watch timeout = 5
keyring = $KEYRING
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
mon data = $DIR/mon.\$id
mgr data = $DIR/mgr.\$id
osd data = $DIR/osd.\$id
# One small OSD on a sparse file, with the least memory bluestore accepts.
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 939524096
[mgr]
keyring = $DIR/mgr.\$id/keyring
[osd]
keyring = $DIR/osd.\$id/keyring
[client]
rbd cache = false
EOF

started=$(date +%s%N)
ceph-authtool --create-keyring "$KEYRING" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$KEYRING" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$KEYRING"
close_fds
ceph-mon -c "$CONF" -i a </dev/null >/dev/null 2>&1

c() { timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"; }
c auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' -o "$DIR/mgr.x/keyring"
ceph-mgr -c "$CONF" -i x </dev/null >/dev/null 2>&1

OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_ID=$(c osd create "$OSD_UUID")
[[ $OSD_ID == 0 ]] || die "the OSD got id $OSD_ID"
# mkfs runs before the OSD has a key to fetch the monitors' config with.
ceph-osd -c "$CONF" -i 0 --mkfs --mkkey --osd-uuid "$OSD_UUID" --no-mon-config >"$DIR/log/osd-mkfs.out" 2>&1
c auth add osd.0 mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' -i "$DIR/osd.0/keyring" >/dev/null
ceph-osd -c "$CONF" -i 0 </dev/null >/dev/null 2>&1

# Client I/O before the OSD is up waits for a 5 s retry: wait for it.
for _ in $(seq 300); do
    c osd dump 2>/dev/null | grep -q '^osd.0 up' && break
    sleep 0.1
done
c osd dump | grep -q '^osd.0 up' || die "osd.0 did not come up"
c osd pool create rbd 8 >/dev/null 2>&1
rbd -c "$CONF" pool init rbd
for _ in $(seq 300); do
    [[ $(c health 2>/dev/null) == HEALTH_OK ]] && break
    sleep 0.1
done
health=$(c health)
[[ $health == HEALTH_OK ]] || die "cluster is not healthy: $health"
trap - ERR
log "HEALTH_OK in $(( ($(date +%s%N) - started) / 1000000 )) ms on 127.0.0.1:$PORT"
echo "CONF=$CONF"
echo "KEYRING=$KEYRING"
echo "POOL=rbd"
