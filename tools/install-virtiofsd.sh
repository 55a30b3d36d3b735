#!/usr/bin/env bash
# Installs virtiofsd 1.14.0 (the reference vhost-user-fs back-end the file-server tests compare
# stratad against) into a per-machine cache, and prints the binary's path on stdout:
#
#   ${STRATA_VIRTIOFSD_DIR:-$HOME/.cache/strata/virtiofsd}/bin/virtiofsd
#
# Built from crates.io with `cargo install virtiofsd --version 1.14.0 --locked`; needs
# libseccomp-dev and libcap-ng-dev (installed with apt-get when missing, as root or via sudo -n).
# Idempotent: when the cached binary exists and reports 1.14.0, it only prints the path.
# Concurrent runs serialise on a lock file beside the cache. Takes a few minutes on 2 cores.
#
# Environment:
#   STRATA_VIRTIOFSD_DIR      cache directory (default $HOME/.cache/strata/virtiofsd)
#   CARGO_TARGET_DIR          cargo's build directory (default: a temporary one, removed after)
set -euo pipefail

VERSION=1.14.0
DIR="${STRATA_VIRTIOFSD_DIR:-${HOME:-/root}/.cache/strata/virtiofsd}"
BIN="$DIR/bin/virtiofsd"

log() { printf 'install-virtiofsd: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

installed() { [[ -x "$BIN" ]] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; }

if installed; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
if installed; then
    echo "$BIN"
    exit 0
fi

SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo -n)
pkgs=()
for p in libseccomp-dev libcap-ng-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || pkgs+=("$p")
done
if [[ ${#pkgs[@]} -gt 0 ]]; then
    log "apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    }
fi
command -v cargo >/dev/null || die "cargo not found (install the Rust toolchain)"

TMP_TARGET=""
if [[ -z "${CARGO_TARGET_DIR:-}" ]]; then
    TMP_TARGET=$(mktemp -d "${DIR}.target.XXXXXX")
    export CARGO_TARGET_DIR="$TMP_TARGET"
    trap 'rm -rf "$TMP_TARGET"' EXIT
fi
log "cargo install virtiofsd $VERSION into $DIR (target dir $CARGO_TARGET_DIR)"
cargo install virtiofsd --version "$VERSION" --locked --root "$DIR" --force --quiet >&2
installed || die "$BIN does not report version $VERSION after the build"
log "installed $("$BIN" --version 2>&1 | head -1)"
echo "$BIN"
