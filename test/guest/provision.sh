#!/usr/bin/env bash
# Builds the guest kit for vhostd end-to-end tests: a Debian kernel plus a
# busybox initramfs with fio, e2fsprogs and iperf3. Idempotent; the result is
# cached and a warm run only checks a stamp.
#
#   VHOSTD_GUEST_CACHE          output directory (default /var/cache/vhostd-guest)
#   VHOSTD_GUEST_EXTRA_MODULES  extra kernel modules to load at boot (space separated)
#   VHOSTD_GUEST_REBUILD=1      rebuild even if the stamp matches (e.g. new kernel)
#
# On success prints KEY=path lines on stdout (KERNEL, INITRAMFS, KVER and, when
# available, the faster-booting KERNEL_FAST=vmlinux and INITRAMFS_FAST=initramfs.cpio);
# logs go to stderr.
set -euo pipefail

CACHE=${VHOSTD_GUEST_CACHE:-/var/cache/vhostd-guest}
# Guest kit, plus host-side peers the tests drive: iproute2 (netns), python3
# (raw packet injection), dpdk-dev (dpdk-testpmd), strace (durability tests) and
# systemd (systemd-analyze checks the units), libvirt (a domain served by vhostd).
PKGS=(qemu-system-x86 qemu-utils busybox-static fio cpio e2fsprogs kmod iperf3 xz-utils iproute2 python3 dpdk-dev strace systemd libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils)
# Load order matters: /init insmods these (plus dependencies) in this order.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         virtio_blk failover net_failover virtio_net
         crc32c_generic crc16 mbcache jbd2 ext4)
read -r -a EXTRA_MODULES <<<"${VHOSTD_GUEST_EXTRA_MODULES:-}"
MODULES+=("${EXTRA_MODULES[@]}")

BINARIES=(/usr/bin/fio /usr/bin/iperf3
          /sbin/mke2fs /sbin/mkfs.ext2 /sbin/mkfs.ext3 /sbin/mkfs.ext4
          /sbin/e2fsck /sbin/fsck.ext2 /sbin/fsck.ext3 /sbin/fsck.ext4
          /sbin/tune2fs /sbin/dumpe2fs /sbin/debugfs /sbin/resize2fs /sbin/e2label)

log() { echo "provision: $*" >&2; }
die() { echo "provision: error: $*" >&2; exit 1; }

SELF=$(readlink -f "${BASH_SOURCE[0]}")
# The stamp changes whenever this script or the module list changes.
STAMP_KEY="$(sha256sum "$SELF" | cut -d' ' -f1) modules=${MODULES[*]}"

missing_pkgs() {
    local p status
    for p in "${PKGS[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || echo "$p"
    done
}

report() {
    echo "KERNEL=$CACHE/vmlinuz"
    echo "INITRAMFS=$CACHE/initramfs.cpio.gz"
    [[ -e $CACHE/vmlinux ]] && echo "KERNEL_FAST=$CACHE/vmlinux"
    [[ -e $CACHE/initramfs.cpio ]] && echo "INITRAMFS_FAST=$CACHE/initramfs.cpio"
    echo "KVER=$(cat "$CACHE/kernel-release")"
}

is_fresh() {
    [[ ${VHOSTD_GUEST_REBUILD:-0} != 1 ]] &&
    [[ -f $CACHE/stamp && -f $CACHE/vmlinuz && -f $CACHE/initramfs.cpio.gz && -f $CACHE/kernel-release ]] &&
    [[ $(cat "$CACHE/stamp") == "$STAMP_KEY" ]] &&
    [[ -z $(missing_pkgs) ]]
}

# Fast path without the lock: nothing to do.
if is_fresh; then report; exit 0; fi

[[ $(id -u) == 0 ]] || die "guest kit in $CACHE is missing or stale and building it needs root"
mkdir -p "$CACHE"
# Parallel test workers may all call this at once; one builds, the rest wait.
exec 9>"$CACHE/.lock"
flock 9
if is_fresh; then report; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

mapfile -t MISSING < <(missing_pkgs)
if ((${#MISSING[@]})); then
    apt_update_once
    log "installing ${MISSING[*]}"
    apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >&2
    if is_fresh; then report; exit 0; fi
fi

# linux-image-amd64 is a metapackage; resolve it to the one versioned image.
resolve_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9][^ ]*-amd64$/ { print $2 }' | sort -u
}
KPKG=$(resolve_kernel_pkg || true)
if [[ -z $KPKG ]]; then
    apt_update_once
    KPKG=$(resolve_kernel_pkg || true)
fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64 to a kernel package"
[[ $(wc -l <<<"$KPKG") == 1 ]] || die "linux-image-amd64 depends on several kernels: $KPKG"

DEBS=$CACHE/debs
mkdir -p "$DEBS"
shopt -s nullglob
debs=("$DEBS/${KPKG}"_*.deb)
if ((${#debs[@]} == 0)); then
    log "downloading $KPKG"
    # Sandbox user root: _apt cannot write into a root-owned cache dir.
    (cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" >&2)
    debs=("$DEBS/${KPKG}"_*.deb)
    ((${#debs[@]} == 1)) || die "apt-get download $KPKG produced no single .deb"
    # Older kernels are no longer needed.
    for f in "$DEBS"/linux-image-*.deb; do [[ $f == "${debs[0]}" ]] || rm -f "$f"; done
fi
DEB=${debs[-1]}
shopt -u nullglob

WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "extracting $(basename "$DEB")"
dpkg -x "$DEB" "$WORK/kernel"
KVER=$(ls "$WORK/kernel/lib/modules")
[[ $(wc -w <<<"$KVER") == 1 ]] || die "expected one kernel release in $DEB, got: $KVER"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
# Under TCG, decompressing bzImage takes ~3 s per boot. A PVH-capable vmlinux
# lets QEMU jump straight into the kernel, so extract it once here.
if grep -q '^CONFIG_PVH=y' "$WORK/kernel/boot/config-$KVER"; then
    xz_at=$(LC_ALL=C grep -obUa $'\xfd7zXZ' "$WORK/vmlinuz" | head -1 | cut -d: -f1 || true)
    # No pipefail here: xz stops at the end of its stream, so tail may get SIGPIPE.
    if [[ -n $xz_at ]] && (set +o pipefail; tail -c +$((xz_at + 1)) "$WORK/vmlinuz" |
            xz -dc --single-stream >"$WORK/vmlinux" 2>/dev/null) &&
        [[ $(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
        :
    else
        log "warning: could not extract vmlinux; guests will boot the slower vmlinuz"
        rm -f "$WORK/vmlinux"
    fi
fi

ROOT=$WORK/root
# Merged /usr, so every command name has exactly one home and the real tools
# below can never be shadowed by a busybox applet of the same name.
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib64,usr/lib/x86_64-linux-gnu,etc,dev,proc,sys,tmp,run,mnt,root}
ln -s usr/bin "$ROOT/bin"
ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"
chmod 1777 "$ROOT/tmp"

# Copies a file to the same path inside the initramfs, dereferencing symlinks.
put() {
    local dst=$ROOT$1
    mkdir -p "$(dirname "$dst")"
    cp -L --preserve=mode "$1" "$dst"
}

declare -A SEEN_LIB=()
put_with_libs() {
    local bin=$1 line lib
    [[ -e $bin ]] || die "$bin not found on the host"
    put "$bin"
    while read -r line; do
        [[ $line == *"not found"* ]] && die "$bin: unresolved library: $line"
        lib=
        if [[ $line == *"=> /"* ]]; then
            lib=$(awk '{print $3}' <<<"$line")
        elif [[ $line == /* ]]; then
            lib=$(awk '{print $1}' <<<"$line") # the dynamic loader
        fi
        [[ -n $lib && -z ${SEEN_LIB[$lib]:-} ]] || continue
        SEEN_LIB[$lib]=1
        put "$lib"
    done < <(ldd "$bin")
}

log "collecting binaries and libraries"
for b in "${BINARIES[@]}"; do put_with_libs "$b"; done
ls "$ROOT"/usr/lib/x86_64-linux-gnu/libaio.so.* >/dev/null 2>&1 || die "libaio missing from the initramfs"
[[ -e /etc/mke2fs.conf ]] && put /etc/mke2fs.conf

cp /bin/busybox "$ROOT/usr/bin/busybox"
file_is_static() { ! ldd "$1" >/dev/null 2>&1; }
file_is_static "$ROOT/usr/bin/busybox" || die "/bin/busybox is not static (is busybox-static installed?)"
# Applet links only where no real binary already lives.
while read -r applet; do
    case $applet in
        bin/*) target=usr/$applet ;;
        sbin/*) target=usr/$applet ;;
        usr/*) target=$applet ;;
        *) continue ;; # linuxrc
    esac
    [[ -e $ROOT/$target || -L $ROOT/$target ]] || ln -s /usr/bin/busybox "$ROOT/$target"
done < <(/bin/busybox --list-full)

printf '%s\n' /usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/ceph >"$ROOT/etc/ld.so.conf"
ldconfig -r "$ROOT" 2>/dev/null || log "warning: ldconfig -r failed; relying on the loader's default paths"
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"
ln -s /proc/mounts "$ROOT/etc/mtab"
# The kernel opens /dev/console before /init runs, so it must be in the archive.
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

log "collecting kernel modules for $KVER"
depmod -b "$WORK/kernel" "$KVER"
MODDIR=lib/modules/$KVER
mkdir -p "$ROOT/usr/$MODDIR"
declare -A SEEN_MOD=()
LOAD_ORDER=()
for m in "${MODULES[@]}"; do
    if ! deps=$(modprobe -d "$WORK/kernel" -S "$KVER" --show-depends "$m" 2>/dev/null); then
        log "module $m not available in $KVER, skipping"
        continue
    fi
    while read -r kind path _; do
        [[ $kind == insmod ]] || continue # "builtin <name>"
        rel=${path#"$WORK/kernel/$MODDIR/"}
        # busybox insmod cannot decompress, so store plain .ko files.
        plain=${rel%.xz}; plain=${plain%.zst}; plain=${plain%.gz}
        [[ -z ${SEEN_MOD[$plain]:-} ]] || continue
        SEEN_MOD[$plain]=1
        dst=$ROOT/usr/$MODDIR/$plain
        mkdir -p "$(dirname "$dst")"
        case $rel in
            *.ko.xz) xz -dc "$path" >"$dst" ;;
            *.ko.zst) zstd -qdc "$path" >"$dst" ;;
            *.ko.gz) gzip -dc "$path" >"$dst" ;;
            *) cp "$path" "$dst" ;;
        esac
        LOAD_ORDER+=("/$MODDIR/$plain")
    done <<<"$deps"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    [[ -e $WORK/kernel/$MODDIR/$f ]] && cp "$WORK/kernel/$MODDIR/$f" "$ROOT/usr/$MODDIR/"
done
# Lets `modprobe` work inside the guest for the modules that are included.
depmod -b "$ROOT" "$KVER"
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/etc/modules.load"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# PID 1 of the vhostd test guest. Runs /test.sh (appended by the harness),
# reports its status as @@EXIT=<n> and powers off.
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run

failed=
while read -r mod; do
    # crc32c-intel, for one, refuses CPUs without SSE4.2; that is fine.
    insmod "$mod" 2>/dev/null || failed="$failed ${mod##*/}"
done </etc/modules.load
[ -z "$failed" ] || echo "init: modules not loaded:$failed"
ip link set lo up 2>/dev/null

# Bounds the guest's life even if the harness that started QEMU died.
wd=$(sed -n 's/.*vhostd\.watchdog=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$wd" ]; then
    (sleep "$wd"; echo "@@WATCHDOG=expired"; poweroff -f) &
fi

# Waits until the console has transmitted everything, so nothing is lost at power off.
drain() { stty -F /dev/console "$(stty -F /dev/console -g)" 2>/dev/null; }

if [ -f /test.sh ]; then
    cd /root
    echo "@@BOOTED=$(cut -d' ' -f1 /proc/uptime)"
    /bin/sh /test.sh </dev/null
    rc=$?
    sync
    echo "@@EXIT=$rc"
    drain
    poweroff -f
else
    echo "init: no /test.sh, starting a shell"
    setsid cttyhack sh
    poweroff -f
fi
EOF
chmod 755 "$ROOT/init"

log "packing initramfs"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible) >"$WORK/initramfs.cpio"
gzip -6 -n -c "$WORK/initramfs.cpio" >"$WORK/initramfs.cpio.gz"

# The uncompressed copies are optional speed-ups (gunzip costs ~2 s per TCG boot).
# rename() keeps each file valid for guests starting concurrently.
rm -f "$CACHE/stamp"
for f in vmlinuz vmlinux initramfs.cpio.gz initramfs.cpio; do
    if [[ -e $WORK/$f ]]; then mv -f "$WORK/$f" "$CACHE/$f"; else rm -f "$CACHE/$f"; fi
done
echo "$KVER" >"$CACHE/kernel-release"
echo "$STAMP_KEY" >"$CACHE/stamp"
log "done: kernel $KVER, initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1)"
report
