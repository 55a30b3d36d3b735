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
# Guest protocol (what tools/test-guest/src/lib.rs relies on):
#   - the per-boot script comes from QEMU's fw_cfg file opt/strata/script
#     (-fw_cfg name=opt/strata/script,file=SCRIPT) and runs under busybox sh;
#   - its stdout and stderr go to the second serial port (ttyS1), the kernel console is ttyS0;
#   - the init prints "STRATA-GUEST-READY" on ttyS0 before the script and
#     "STRATA-GUEST-EXIT=<code>" after it, then powers off;
#   - kernel parameter strata.disks=N makes the init wait until N virtio disks are present.
#
# Variant `build-guest.sh --fs` (the file-server tests; also built on demand by the harness when a
# VM has vhost-user-fs devices): builds the base guest above, then $GUEST_DIR/fs/ holding
#     initrd.img   the base initramfs with a second newc archive appended (the kernel unpacks
#                  both; later entries win), which adds:
#                    /usr/bin/pjdfstest      pjdfstest 0.2.2, static (tools/test-guest/build-pjdfstest.sh)
#                    /etc/pjdfstest.toml     its config: posix_fallocate, utimensat, utime_now,
#                                            naptime 0.01, dummy users nobody/nobody, tests/tests
#                    /etc/passwd, /etc/group root; nobody 65534 (group nobody 65534); tests 1100;
#                                            alice 1000 and bob 1001 (own groups 1000/1001),
#                                            group team 2000 {alice}, group shared 2001 {alice,bob}
#                    /usr/bin/setfacl, getfacl   Debian's acl tools (package acl) with
#                                            libacl.so.1 (+ libc and ld-linux, as for fio): POSIX
#                                            ACLs by text, default ACLs and mask recalculation
#                                            included (busybox has no setfacl)
#                    /usr/bin/strata-fsutil  tools/test-guest/fsutil.rs, static (rustc, std only):
#                                            `now` (ns clock) and `meta DIR N` (metadata benchmark)
#     manifest     the fs recipe, the base manifest's and the inputs' checksums (cache key)
# The kernel is the base guest's vmlinuz. Needs cargo/rustc and crates.io (pjdfstest) once.
#
# Variant `build-guest.sh --iscsi` (the iSCSI tests: the Linux initiator against Strata's target;
# also built on demand by the harness for GuestVariant::Iscsi): builds the base guest, then
# $GUEST_DIR/iscsi/ holding
#     initrd.img   the base initramfs with a second newc archive appended, which adds:
#                    the modules virtio_net (QEMU user networking: the host is 10.0.2.2),
#                    iscsi_tcp, sd_mod and crc32c_generic with their dependencies, from the base guest's
#                    kernel package (downloaded again), a modules.dep covering base and new
#                    modules, and /etc/strata-modules listing both (the init loads them);
#                    /usr/sbin/iscsiadm, /usr/sbin/iscsid   open-iscsi's initiator (package
#                                            open-iscsi) with their shared libraries;
#                    /etc/iscsi/iscsid.conf  manual node start-up, short login retries and
#                                            replacement time-out (a refused login fails fast);
#                    /etc/iscsi/initiatorname.iscsi   a default name; scripts overwrite it;
#                    /etc/iscsi/{nodes,send_targets,isns}, /run/lock/iscsi   open-iscsi's
#                                            state directories
#     manifest     the iscsi recipe, the base manifest's checksum (cache key), open-iscsi's
#                  version and the added modules
#
# Environment:
#   STRATA_GUEST_DIR          cache directory (default $HOME/.cache/strata/guest)
#   STRATA_GUEST_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#   STRATA_GUEST_REBUILD=1    rebuild even if the cache is complete
set -euo pipefail

# Bump when anything below changes what ends up in the guest: old caches are then rebuilt.
RECIPE="test-guest-recipe-1"

GUEST_DIR="${STRATA_GUEST_DIR:-${HOME:-/root}/.cache/strata/guest}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- helpers of the base guest and the variants -------------------------------------------------

# copy_with_libs ROOT BIN DEST: copies the host program BIN to ROOT/DEST and the shared libraries
# it links to the same paths under ROOT.
copy_with_libs() {
    local root="$1" bin="$2" dest="$3" lib
    cp -L "$bin" "$root$dest"
    # ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
    { ldd "$bin" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
        while read -r lib; do
            if [[ ! -e "$root$lib" ]]; then
                mkdir -p "$root$(dirname "$lib")"
                cp -L "$lib" "$root$lib"
            fi
        done
}

# variant_install_package PKG: installs the Debian package PKG (as root) for a variant's host
# tools, refreshing the package lists only when the first try fails.
variant_install_package() {
    local pkg="$1"
    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install $pkg"
    log "installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
        >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
            >/dev/null
    }
}

# variant_cached NAME: no rebuild is asked for and $GUEST_DIR/NAME holds an initrd.img and a
# manifest carrying every line NAME_inputs_key prints (the variant's cache key).
variant_cached() {
    local dir="$GUEST_DIR/$1" line
    [[ "${STRATA_GUEST_REBUILD:-0}" != 1 ]] || return 1
    [[ -f "$dir/manifest" && -f "$dir/initrd.img" ]] || return 1
    while read -r line; do
        grep -qxF "$line" "$dir/manifest" || return 1
    done < <("$1_inputs_key")
}

# variant_pack ROOT WORK: WORK/initrd.img is the base initramfs with ROOT appended as a second
# newc archive (the kernel unpacks both; later entries win).
variant_pack() {
    local root="$1" work="$2"
    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
        >"$work/overlay.cpio"
    cat "$GUEST_DIR/initrd.img" "$work/overlay.cpio" >"$work/initrd.img"
}

# variant_install NAME WORK: moves WORK's initrd.img and manifest (last: it marks the cache
# complete) to $GUEST_DIR/NAME, removes WORK and drops the clean-up trap.
variant_install() {
    local dir="$GUEST_DIR/$1" work="$2"
    mkdir -p "$dir"
    rm -f "$dir/manifest"
    mv "$work/initrd.img" "$dir/initrd.img"
    mv "$work/manifest" "$dir/manifest"
    rm -rf "$work"
    trap - EXIT
    log "$1 variant done: $(tr '\n' ' ' <"$dir/manifest")"
}

# --- fs variant (--fs) --------------------------------------------------------------------------
FS_RECIPE="test-guest-fs-recipe-1"

fs_inputs_key() {
    echo "recipe=$FS_RECIPE"
    echo "base_manifest_sha256=$(sha256sum <"$GUEST_DIR/manifest" | cut -d' ' -f1)"
    echo "fsutil_sha256=$(sha256sum <"$HERE/fsutil.rs" | cut -d' ' -f1)"
    echo "pjdfstest_script_sha256=$(sha256sum <"$HERE/build-pjdfstest.sh" | cut -d' ' -f1)"
}

build_fs_variant() {
    variant_cached fs && return 0
    exec 8>"$GUEST_DIR.fs.lock"
    flock 8
    # Another run may have built it while we waited for the lock.
    variant_cached fs && return 0
    log "building the fs variant in $GUEST_DIR/fs"
    local pjd
    pjd=$(bash "$HERE/build-pjdfstest.sh") || die "build-pjdfstest.sh failed"
    if ! command -v setfacl >/dev/null || ! command -v getfacl >/dev/null; then
        variant_install_package acl
    fi
    command -v rustc >/dev/null || die "rustc not found (install the Rust toolchain)"

    local work
    work=$(mktemp -d "${GUEST_DIR}.fsbuild.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    local root="$work/root"
    mkdir -p "$root"/{etc,usr/bin,mnt}
    cp "$pjd" "$root/usr/bin/pjdfstest"
    rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols \
        -o "$root/usr/bin/strata-fsutil" "$HERE/fsutil.rs" ||
        die "rustc fsutil.rs failed"
    local bin
    for bin in setfacl getfacl; do
        copy_with_libs "$root" "$(command -v "$bin")" "/usr/bin/$bin"
    done
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:alice:/tmp:/bin/sh
bob:x:1001:1001:bob:/tmp:/bin/sh
tests:x:1100:1100:pjdfstest:/tmp:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
alice:x:1000:
bob:x:1001:
tests:x:1100:
team:x:2000:alice
shared:x:2001:alice,bob
nobody:x:65534:
EOF
    printf 'passwd: files\ngroup: files\nshadow: files\n' >"$root/etc/nsswitch.conf"
    cat >"$root/etc/pjdfstest.toml" <<'EOF'
# pjdfstest 0.2.2 configuration for Strata's fs guest (schema: src/config.rs of the crate).
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [
    ["nobody", "nobody"],
    ["tests", "tests"],
]
EOF
    variant_pack "$root" "$work"
    {
        fs_inputs_key
        echo "pjdfstest=$("$pjd" --version 2>/dev/null | head -1)"
        echo "acl=$(dpkg-query -W -f='${Version}' acl 2>/dev/null || echo unknown)"
        echo "initrd_bytes=$(stat -c %s "$work/initrd.img")"
    } >"$work/manifest"
    variant_install fs "$work"
}

# --- iscsi variant (--iscsi) --------------------------------------------------------------------
ISCSI_RECIPE="test-guest-iscsi-recipe-2"
# Modules the iSCSI guest adds to the base set (dependencies follow from modprobe); iscsi_tcp
# allocates a crc32c hash per connection (for digests) and fails with ENOMEM without one.
ISCSI_MODULES="virtio_net iscsi_tcp sd_mod crc32c_generic"

iscsi_inputs_key() {
    echo "recipe=$ISCSI_RECIPE"
    echo "base_manifest_sha256=$(sha256sum <"$GUEST_DIR/manifest" | cut -d' ' -f1)"
}

build_iscsi_variant() {
    variant_cached iscsi && return 0
    exec 7>"$GUEST_DIR.iscsi.lock"
    flock 7
    # Another run may have built it while we waited for the lock.
    variant_cached iscsi && return 0
    log "building the iscsi variant in $GUEST_DIR/iscsi"
    if ! command -v iscsiadm >/dev/null || ! command -v iscsid >/dev/null; then
        variant_install_package open-iscsi
    fi
    local kpkg kver
    kpkg=$(sed -n 's/^kernel_package=//p' "$GUEST_DIR/manifest")
    kver=$(sed -n 's/^kernel_release=//p' "$GUEST_DIR/manifest")
    [[ -n "$kpkg" && -n "$kver" ]] || die "no kernel in $GUEST_DIR/manifest"

    local work
    work=$(mktemp -d "${GUEST_DIR}.iscsibuild.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    (cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) ||
        { apt-get update -qq && (cd "$work" && apt-get download -q "$kpkg" >/dev/null); }
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
    rm -f "$work"/linux-image-*.deb
    depmod -b "$work/kernel" "$kver"

    # The base guest's modules and their list, so the new list extends it and one depmod
    # covers both.
    local root="$work/root" moddir="lib/modules/$kver"
    mkdir -p "$root"
    (cd "$root" && cpio -id --quiet 'lib/modules/*' 'etc/strata-modules' <"$GUEST_DIR/initrd.img")
    [[ -f "$root/etc/strata-modules" ]] || die "no etc/strata-modules in the base initramfs"
    local mod ko rel added=()
    for mod in $ISCSI_MODULES; do
        while read -r ko; do
            rel="${ko#"$work"/kernel/}"
            if ! grep -qx "/$rel" "$root/etc/strata-modules"; then
                mkdir -p "$root/$(dirname "$rel")"
                cp "$ko" "$root/$rel"
                echo "/$rel" >>"$root/etc/strata-modules"
                added+=("$(basename "$rel")")
            fi
        done < <(modprobe --show-depends -d "$work/kernel" -S "$kver" "$mod" |
            awk '$1 == "insmod" {print $2}')
    done
    grep -q iscsi_tcp "$root/etc/strata-modules" || die "iscsi_tcp module not found"
    depmod -b "$root" "$kver"

    mkdir -p "$root"/{usr/sbin,etc/iscsi/nodes,etc/iscsi/send_targets,etc/iscsi/isns,run/lock/iscsi}
    local bin
    for bin in iscsiadm iscsid; do
        copy_with_libs "$root" "$(command -v "$bin")" "/usr/sbin/$bin"
    done
    cat >"$root/etc/iscsi/iscsid.conf" <<'EOF'
# Strata's iSCSI test guest: the test script starts iscsid itself; nodes log in only when
# asked; a refused or lost login fails within seconds instead of retrying for minutes.
iscsid.startup = /usr/sbin/iscsid
node.startup = manual
node.session.timeo.replacement_timeout = 5
node.conn[0].timeo.login_timeout = 10
node.conn[0].timeo.logout_timeout = 10
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.initial_login_retry_max = 1
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
discovery.sendtargets.iscsi.MaxRecvDataSegmentLength = 32768
node.session.scan = auto
EOF
    echo "InitiatorName=iqn.2026-12.org.strata:test-guest" >"$root/etc/iscsi/initiatorname.iscsi"

    variant_pack "$root" "$work"
    {
        iscsi_inputs_key
        echo "open-iscsi=$(dpkg-query -W -f='${Version}' open-iscsi 2>/dev/null || echo unknown)"
        echo "modules_added=${added[*]}"
        echo "initrd_bytes=$(stat -c %s "$work/initrd.img")"
    } >"$work/manifest"
    variant_install iscsi "$work"
}

case "${1:-}" in
    "") ;;
    --fs)
        bash "${BASH_SOURCE[0]}" # the base guest first (a no-op when cached)
        build_fs_variant
        exit 0
        ;;
    --iscsi)
        bash "${BASH_SOURCE[0]}" # the base guest first (a no-op when cached)
        build_iscsi_variant
        exit 0
        ;;
    *) die "unknown argument $1 (usage: build-guest.sh [--fs|--iscsi])" ;;
esac

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
copy_with_libs "$ROOT" /bin/busybox /bin/busybox
copy_with_libs "$ROOT" "$(command -v fio)" /usr/bin/fio
FIO_VERSION=$(fio --version)

# --- init -------------------------------------------------------------------------------------
cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
# Strata test-guest init: see tools/test-guest/build-guest.sh for the protocol.
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
