#!/usr/bin/env bash
# Builds Strata's minimal test guest: a Debian 6.1 kernel and a busybox initramfs carrying fio
# and the virtio/virtiofs modules. The result is cached per machine:
#
#   ${STRATA_GUEST_DIR:-$HOME/.cache/strata/guest}/
#     vmlinuz      the kernel (from linux-image-6.1.0-NN-amd64)
#     initrd.img   the initramfs (uncompressed newc cpio: the fastest to unpack under TCG)
#     manifest     what was built, and from which packages; written last, so its presence with
#                  the current RECIPE line means the cache is complete
#
# A second run with a complete cache does nothing and exits 0 at once. Concurrent runs serialise
# on a lock file beside the cache. Runs as root on Debian 12; installs (apt-get) what is missing.
#
# Guest protocol (what tools/guest/src/lib.rs relies on):
#   - the per-boot script comes from QEMU's fw_cfg file opt/strata/script
#     (-fw_cfg name=opt/strata/script,file=SCRIPT) and runs under busybox sh;
#   - its stdout and stderr go to the second serial port (ttyS1), the kernel console is ttyS0;
#   - the init prints "STRATA-GUEST-READY" on ttyS0 before the script and
#     "STRATA-GUEST-EXIT=<code>" after it, then powers off;
#   - kernel parameter strata.disks=N makes the init wait until N virtio disks are present.
#
# Environment:
#   STRATA_GUEST_DIR          cache directory (default $HOME/.cache/strata/guest)
#   STRATA_GUEST_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#   STRATA_GUEST_REBUILD=1    rebuild even if the cache is complete
set -euo pipefail

# Bump when anything below changes what ends up in the guest: old caches are then rebuilt.
RECIPE="strata-guest-recipe-1"

GUEST_DIR="${STRATA_GUEST_DIR:-${HOME:-/root}/.cache/strata/guest}"

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cache_complete() {
    [[ -f "$GUEST_DIR/manifest" && -f "$GUEST_DIR/vmlinuz" && -f "$GUEST_DIR/initrd.img" ]] &&
        grep -qx "recipe=$RECIPE" "$GUEST_DIR/manifest"
}

if [[ "${STRATA_GUEST_REBUILD:-0}" != 1 ]] && cache_complete; then
    exit 0
fi

mkdir -p "$(dirname "$GUEST_DIR")"
exec 9>"$GUEST_DIR.lock"
flock 9
# Another run may have finished the build while we waited for the lock.
if [[ "${STRATA_GUEST_REBUILD:-0}" != 1 ]] && cache_complete; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_install() {
    [[ $# -gt 0 ]] || return 0
    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install $*"
    if [[ $APT_UPDATED -eq 0 ]]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Host tools: command -> Debian package.
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v cpio >/dev/null || missing+=(cpio)
command -v depmod >/dev/null || missing+=(kmod)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
[[ -x /bin/busybox ]] && /bin/busybox --list 2>/dev/null | grep -qx poweroff || missing+=(busybox-static)
apt_install "${missing[@]}"

KERNEL_PKG="${STRATA_GUEST_KERNEL_PKG:-}"
if [[ -z "$KERNEL_PKG" ]]; then
    KERNEL_PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}')
    if [[ -z "$KERNEL_PKG" && $APT_UPDATED -eq 0 ]]; then
        apt-get update -qq
        APT_UPDATED=1
        KERNEL_PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2; exit}')
    fi
    [[ -n "$KERNEL_PKG" ]] || die "cannot find the linux-image-6.1.0-NN-amd64 package (apt-cache)"
fi
KVER="${KERNEL_PKG#linux-image-}"

WORK=$(mktemp -d "${GUEST_DIR}.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building the guest in $GUEST_DIR (kernel $KERNEL_PKG)"

# --- kernel and modules -------------------------------------------------------------------------
(cd "$WORK" && apt-get download -q "$KERNEL_PKG" >/dev/null 2>&1) ||
    { apt-get update -qq && (cd "$WORK" && apt-get download -q "$KERNEL_PKG" >/dev/null); }
KDEB=$(ls "$WORK"/linux-image-*.deb)
KPKG_VERSION=$(dpkg-deb -f "$KDEB" Version)
dpkg-deb -x "$KDEB" "$WORK/kernel"
rm -f "$KDEB"
[[ -f "$WORK/kernel/boot/vmlinuz-$KVER" ]] || die "no vmlinuz-$KVER in $KERNEL_PKG"
depmod -b "$WORK/kernel" "$KVER"

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,root,usr/bin,usr/sbin}
MODDIR="lib/modules/$KVER"
mkdir -p "$ROOT/$MODDIR"

# Modules, dependencies first. Anything built into this kernel shows up as "builtin" and is skipped.
: >"$ROOT/etc/strata-modules"
for mod in qemu_fw_cfg virtio_pci virtio_blk fuse virtiofs; do
    modprobe --show-depends -d "$WORK/kernel" -S "$KVER" "$mod" |
        awk '$1 == "insmod" {print $2}' |
        while read -r ko; do
            rel="${ko#"$WORK"/kernel/}"
            if ! grep -qx "/$rel" "$ROOT/etc/strata-modules"; then
                mkdir -p "$ROOT/$(dirname "$rel")"
                cp "$ko" "$ROOT/$rel"
                echo "/$rel" >>"$ROOT/etc/strata-modules"
            fi
        done
done
cp "$WORK/kernel/$MODDIR"/modules.{order,builtin} "$ROOT/$MODDIR/"
[[ -f "$WORK/kernel/$MODDIR/modules.builtin.modinfo" ]] &&
    cp "$WORK/kernel/$MODDIR/modules.builtin.modinfo" "$ROOT/$MODDIR/"
depmod -b "$ROOT" "$KVER"
grep -q virtio_blk "$ROOT/etc/strata-modules" || die "virtio_blk module not found"

# --- busybox and fio (with its shared-library closure) ----------------------------------------
copy_with_libs() {
    local bin="$1" dest="$2" lib
    cp -L "$bin" "$ROOT$dest"
    # ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
    { ldd "$bin" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
        while read -r lib; do
            if [[ ! -e "$ROOT$lib" ]]; then
                mkdir -p "$ROOT$(dirname "$lib")"
                cp -L "$lib" "$ROOT$lib"
            fi
        done
}
copy_with_libs /bin/busybox /bin/busybox
copy_with_libs "$(command -v fio)" /usr/bin/fio
FIO_VERSION=$(fio --version)

# --- init -------------------------------------------------------------------------------------
cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
# Strata test-guest init: see tools/guest/build-guest.sh for the protocol.
/bin/busybox --install -s
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 >/proc/sys/kernel/printk

say() { echo "$*" >/dev/ttyS0; }
finish() {
    sync
    say "STRATA-GUEST-EXIT=$1"
    poweroff -f
    sleep 5
}

while read -r ko; do
    insmod "$ko" || say "strata-init: insmod $ko failed"
done </etc/strata-modules

disks=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        strata.disks=*) disks="${arg#strata.disks=}" ;;
    esac
done
n=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "$disks" ]; do
    n=$((n + 1))
    if [ "$n" -gt 200 ]; then
        say "strata-init: only $(ls -d /sys/block/vd* 2>/dev/null | wc -l) of $disks disks appeared"
        break
    fi
    sleep 0.05
done

script=/sys/firmware/qemu_fw_cfg/by_name/opt/strata/script/raw
if [ ! -r "$script" ]; then
    say "strata-init: no script (fw_cfg opt/strata/script)"
    finish 127
fi
cat "$script" >/run/strata-script
say "STRATA-GUEST-READY"
cd /root
sh /run/strata-script </dev/null >/dev/ttyS1 2>&1
finish $?
EOF
chmod 755 "$ROOT/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"

# --- pack ---------------------------------------------------------------------------------------
OUT="$WORK/out"
mkdir -p "$OUT"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    >"$OUT/initrd.img"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
{
    echo "kernel_package=$KERNEL_PKG"
    echo "kernel_package_version=$KPKG_VERSION"
    echo "kernel_release=$KVER"
    echo "fio=$FIO_VERSION"
    echo "busybox=$(/bin/busybox | head -1)"
    echo "initrd_bytes=$(stat -c %s "$OUT/initrd.img")"
    echo "recipe=$RECIPE"
} >"$OUT/manifest.tmp"

mkdir -p "$GUEST_DIR"
rm -f "$GUEST_DIR/manifest"
mv "$OUT/vmlinuz" "$GUEST_DIR/vmlinuz"
mv "$OUT/initrd.img" "$GUEST_DIR/initrd.img"
mv "$OUT/manifest.tmp" "$GUEST_DIR/manifest"
log "done: $(tr '\n' ' ' <"$GUEST_DIR/manifest")"
