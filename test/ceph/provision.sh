#!/usr/bin/env bash
# Installs what the RBD tests need from Debian: a Ceph cluster's daemons
# (ceph-mon, ceph-mgr, ceph-osd), the client tools and librbd (ceph-common), and
# qemu-storage-daemon's rbd driver (qemu-block-extra). Idempotent; quick when
# everything is there. Logs go to stderr.
set -euo pipefail
PKGS=(ceph-mon ceph-mgr ceph-osd ceph-common librbd1 qemu-block-extra)

log() { echo "ceph-provision: $*" >&2; }
missing() {
    local p status
    for p in "${PKGS[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || echo "$p"
    done
}

mapfile -t MISSING < <(missing)
((${#MISSING[@]})) || exit 0
[[ $(id -u) == 0 ]] || { log "error: ${MISSING[*]} missing, and installing needs root"; exit 1; }
# Parallel test workers may call this at once: one installs, the others wait.
exec 9>/var/lock/vhostd-ceph-provision.lock
flock 9
mapfile -t MISSING < <(missing)
((${#MISSING[@]})) || exit 0
export DEBIAN_FRONTEND=noninteractive
started=$(date +%s)
log "installing ${MISSING[*]}"
apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >&2 || {
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >&2
}
log "installed in $(( $(date +%s) - started )) s"
