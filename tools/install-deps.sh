#!/usr/bin/env bash
# Installs, on Debian 12 (as root or through sudo, non-interactively), what Strata's tests and
# quick start need beyond the Rust toolchain, and only what is missing:
#
#   qemu-system-x86_64        the test guest's VMM            (qemu-system-x86)
#   qemu-storage-daemon, qemu-img   reference vhost-user back-end and image tool (qemu-utils)
#   fio                       copied into the guest           (fio)
#   busybox (static), cpio, depmod/modprobe   guest build     (busybox-static, cpio, kmod)
#   isnsadm, tgtd/tgtadm, iscsi-inq   name server's real clients (open-isns-utils, tgt,
#                             libiscsi-bin; isnsd from open-isns-server as reference server)
#   iscsi-test-cu, iscsiadm/iscsid   the iSCSI target's peers: libiscsi's conformance suite
#                             (libiscsi-bin) and open-iscsi, copied into the iscsi test guest
#                             (build-guest.sh --iscsi); tgtd is the reference target
#   clang, linux/bpf.h + bpf/bpf_helpers.h   the XDP programs of ebpf/ (clang, libbpf-dev; not
#                             needed by a stratad built without its `packet` feature)
#   ip, ping                  namespaces and veth pairs of the steering tests (iproute2,
#                             iputils-ping)
#   libdpdk (pkg-config), libclang   net's `dpdk` feature: DPDK 22.11 headers, PMDs and
#                             bindgen (libdpdk-dev, dpdk, libclang-dev, pkg-config)
#   libcap-ng, libseccomp     the file server (virtiofsd crate: capng) and the reference
#                             virtiofsd 1.14 of tools/install-virtiofsd.sh (libcap-ng-dev,
#                             libseccomp-dev)
#   setfacl, getfacl          copied into the fs test guest, build-guest.sh --fs (acl)
#
# QEMU's packages must come from one release: this project's machines ship qemu-utils from
# bookworm-backports, and bookworm's own qemu-system-x86 would replace it with an older
# qemu-utils-less set. So when the installed qemu-utils is a backport, QEMU is installed from
# bookworm-backports too (the suite is added to apt's sources if no source names it).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo -n)
fi

log() { printf 'install-deps: %s\n' "$*" >&2; }

APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
}

# apt_install [-t SUITE] PKG...
apt_install() {
    local opts=()
    if [[ "${1:-}" == -t ]]; then
        opts=(-t "$2")
        shift 2
    fi
    [[ $# -gt 0 ]] || return 0
    apt_update
    log "apt-get install ${opts[*]} $*"
    local out
    out=$(mktemp)
    if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
        "${opts[@]}" "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        log "error: apt-get install $* failed"
        exit 1
    fi
    rm -f "$out"
}

have() { command -v "$1" >/dev/null 2>&1; }

# --- QEMU ---------------------------------------------------------------------------------------
qemu_pkgs=()
have qemu-system-x86_64 || qemu_pkgs+=(qemu-system-x86)
{ have qemu-storage-daemon && have qemu-img; } || qemu_pkgs+=(qemu-utils)
if [[ ${#qemu_pkgs[@]} -gt 0 ]]; then
    utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$utils_version" == *bpo12* ]]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            log "adding bookworm-backports to apt's sources (installed qemu-utils is $utils_version)"
            echo "deb http://deb.debian.org/debian bookworm-backports main" |
                "${SUDO[@]}" tee /etc/apt/sources.list.d/strata-backports.list >/dev/null
            APT_UPDATED=0
        fi
        # Both packages, so that apt keeps them at the same (backports) version.
        apt_install -t bookworm-backports qemu-system-x86 qemu-utils
    else
        apt_install "${qemu_pkgs[@]}"
    fi
fi

# --- guest build --------------------------------------------------------------------------------
pkgs=()
have fio || pkgs+=(fio)
have cpio || pkgs+=(cpio)
{ have depmod && have modprobe; } || pkgs+=(kmod)
have flock || pkgs+=(util-linux)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
    pkgs+=(busybox-static)
apt_install "${pkgs[@]}"

# --- name server clients (fabric-nameserver's tests) -------------------------------------------
pkgs=()
have isnsadm || pkgs+=(open-isns-utils)
have isnsd || pkgs+=(open-isns-server)
{ have tgtd && have tgtadm; } || pkgs+=(tgt)
{ have iscsi-inq && have iscsi-test-cu; } || pkgs+=(libiscsi-bin)
{ have iscsiadm && have iscsid; } || pkgs+=(open-iscsi)
apt_install "${pkgs[@]}"

# --- packet path (ebpf/ build, steering tests, pps benchmark) ----------------------------------
pkgs=()
have clang || pkgs+=(clang)
[[ -f /usr/include/bpf/bpf_helpers.h ]] || pkgs+=(libbpf-dev)
have ip || pkgs+=(iproute2)
have ping || pkgs+=(iputils-ping)
have pkg-config || pkgs+=(pkg-config)
pkg-config --exists libdpdk 2>/dev/null || pkgs+=(libdpdk-dev dpdk)
compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || pkgs+=(libclang-dev)
apt_install "${pkgs[@]}"

# --- file server (libcap-ng for the workspace, libseccomp for virtiofsd, acl for the fs guest) --
pkgs=()
for p in libcap-ng-dev libseccomp-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || pkgs+=("$p")
done
{ have setfacl && have getfacl; } || pkgs+=(acl)
apt_install "${pkgs[@]}"

for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img fio cpio depmod \
    isnsadm isnsd tgtd tgtadm iscsi-inq iscsi-test-cu iscsiadm iscsid clang ip ping setfacl getfacl; do
    have "$tool" || { log "error: $tool still missing"; exit 1; }
done
