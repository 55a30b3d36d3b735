#!/usr/bin/env bash
# Coverage-guided fuzzing of Strata's hostile-input paths (fuzz/README.md), on the stable
# toolchain: libfuzzer-sys's libFuzzer driver, with LLVM's SanitizerCoverage enabled through
# stable -C flags (no sanitizer runtime, which would need nightly).
#
#   tools/fuzz.sh TARGET SECONDS   build (if needed) and fuzz TARGET for SECONDS
#   tools/fuzz.sh all SECONDS      every target in turn, SECONDS each
#   tools/fuzz.sh list             the targets
#   tools/fuzz.sh build            build every target only
#
# The working corpus grows in target/fuzz/corpus/TARGET, seeded read-only from the checked-in
# fuzz/corpus/TARGET. A crash leaves its input in fuzz/artifacts/TARGET/ and exits non-zero:
# replay it with `target/fuzz/x86_64-unknown-linux-gnu/release/TARGET FILE`, then move it to
# fuzz/regressions/TARGET/ so `cargo test -p fuzz` replays it from then on.
# Extra libFuzzer flags: FUZZ_ARGS="-jobs=2 -workers=2" tools/fuzz.sh TARGET SECONDS.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

targets=(blk_chain fuse iscsi_login iscsi_pdu iscsi_session isns jsonrpc scsi vmfs_image vmfs_journal vhost_user)
triple=$(rustc -vV | sed -n 's/^host: //p')
# A separate target dir: the instrumented build's RUSTFLAGS differ from every other build's.
fuzz_dir=${FUZZ_TARGET_DIR:-$root/target/fuzz}
bin_dir=$fuzz_dir/$triple/release

usage() {
    sed -n '5,9p' "$0" >&2
    exit 2
}

build() {
    # libfuzzer-sys compiles libFuzzer (C++): any C++ compiler will do.
    if [ -z "${CXX:-}" ] && ! command -v c++ >/dev/null; then
        export CXX=clang++
    fi
    # --target makes RUSTFLAGS apply to the fuzzed code only, not to build scripts and proc
    # macros (which would then need libFuzzer's coverage callbacks to link).
    # Coverage: edge counters (inline 8-bit), PC table for libFuzzer's feature tracking,
    # comparison tracing (lets it solve magic numbers and checksummed lengths); overflow and
    # debug assertions on, as the "never panics" tests need.
    RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks -Ccodegen-units=16" \
    CARGO_TARGET_DIR=$fuzz_dir \
        cargo build --release --locked -p fuzz --features libfuzzer \
        --target "$triple" --bins
}

run_one() {
    local t=$1 secs=$2
    local corpus=$fuzz_dir/corpus/$t seeds=$root/fuzz/corpus/$t artifacts=$root/fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    printf '\n==> fuzzing %s for %s s\n' "$t" "$secs"
    local rc=0
    # -rss_limit_mb: the FUSE target maps 4 MiB of guest memory and a datastore overlay per
    # run; 2 GiB leaves room while still catching runaway growth.
    # Regression inputs run first, here with overflow checks (cargo test replays them too,
    # in release mode, where an overflow wraps instead of panicking).
    local extra=()
    [ -d "$root/fuzz/regressions/$t" ] && extra+=("$root/fuzz/regressions/$t")
    # shellcheck disable=SC2086
    "$bin_dir/$t" "$corpus" "$seeds" "${extra[@]}" \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "fuzz: $t FAILED (exit $rc); inputs in $artifacts/:" >&2
        ls -l "$artifacts" >&2 || true
        return "$rc"
    fi
    echo "fuzz: $t: corpus $(find "$corpus" -type f | wc -l) inputs"
}

[ $# -ge 1 ] || usage
case $1 in
list)
    printf '%s\n' "${targets[@]}"
    exit 0
    ;;
build)
    build
    exit 0
    ;;
esac
[ $# -eq 2 ] || usage
target=$1 secs=$2
[[ $secs =~ ^[0-9]+$ ]] || usage
build
if [ "$target" = all ]; then
    failed=()
    for t in "${targets[@]}"; do
        run_one "$t" "$secs" || failed+=("$t")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "fuzz: crashes in: ${failed[*]}" >&2
        exit 1
    fi
else
    printf '%s\n' "${targets[@]}" | grep -qx "$target" || {
        echo "fuzz: unknown target $target (tools/fuzz.sh list)" >&2
        exit 2
    }
    run_one "$target" "$secs"
fi
