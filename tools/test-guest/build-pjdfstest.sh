#!/usr/bin/env bash
# Builds pjdfstest 0.2.2 (crates.io; https://github.com/saidsay-so/pjdfstest) as a STATIC binary
# for the test guest (whose initramfs has no Rust-compatible libc beyond fio's closure, and
# whose users must not depend on one), into a per-machine cache, and prints its path on stdout:
#
#   ${STRATA_PJDFSTEST_DIR:-$HOME/.cache/strata/pjdfstest}/bin/pjdfstest
#
#   RUSTFLAGS='-C target-feature=+crt-static' \
#       cargo install pjdfstest --version 0.2.2 --locked --target x86_64-unknown-linux-gnu
#
# (--target keeps the flag off build scripts and proc macros, which must stay dynamic.)
# Idempotent: a cached binary that is statically linked is reused. Concurrent runs serialise on
# a lock file beside the cache. build-guest.sh --fs calls it.
#
# Environment:
#   STRATA_PJDFSTEST_DIR   cache directory (default $HOME/.cache/strata/pjdfstest)
#   CARGO_TARGET_DIR       cargo's build directory (default: a temporary one, removed after)
set -euo pipefail

VERSION=0.2.2
TARGET=x86_64-unknown-linux-gnu
DIR="${STRATA_PJDFSTEST_DIR:-${HOME:-/root}/.cache/strata/pjdfstest}"
BIN="$DIR/bin/pjdfstest"
STAMP="$DIR/version"

log() { printf 'build-pjdfstest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_static() {
    # ldd exits non-zero and says "not a dynamic executable" for static binaries (glibc's ldd),
    # or "statically linked" (static-pie).
    local out
    out=$(ldd "$1" 2>&1 || true)
    [[ "$out" == *"not a dynamic executable"* || "$out" == *"statically linked"* ]]
}
ready() { [[ -x "$BIN" && -f "$STAMP" ]] && grep -qx "pjdfstest=$VERSION static" "$STAMP" && is_static "$BIN"; }

if ready; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
if ready; then
    echo "$BIN"
    exit 0
fi

command -v cargo >/dev/null || die "cargo not found (install the Rust toolchain)"
if command -v rustup >/dev/null && ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    die "the Rust target $TARGET is not installed (rustup target add $TARGET)"
fi

TMP_TARGET=""
if [[ -z "${CARGO_TARGET_DIR:-}" ]]; then
    TMP_TARGET=$(mktemp -d "${DIR}.target.XXXXXX")
    export CARGO_TARGET_DIR="$TMP_TARGET"
    trap 'rm -rf "$TMP_TARGET"' EXIT
fi
log "cargo install pjdfstest $VERSION (static, $TARGET) into $DIR (target dir $CARGO_TARGET_DIR)"
rm -f "$STAMP"
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo install pjdfstest --version "$VERSION" --locked --target "$TARGET" --root "$DIR" \
    --force --quiet >&2
is_static "$BIN" || die "$BIN is not statically linked: $(ldd "$BIN" 2>&1 | head -3)"
echo "pjdfstest=$VERSION static" >"$STAMP"
log "built $BIN ($(stat -c %s "$BIN") bytes, static)"
echo "$BIN"
