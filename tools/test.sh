#!/usr/bin/env bash
# Strata's full check, as CI runs it (.ci/run) and as the README's test command:
#   1. installs what the tests need (tools/install-deps.sh: QEMU, fio, guest build tools),
#   2. builds the cached test guest and its fs variant (tools/test-guest/build-guest.sh --fs: the
#      base guest, then pjdfstest via tools/test-guest/build-pjdfstest.sh, the test users and the
#      acl tools for the virtio-fs share tests; a no-op once built),
#   3. cargo fmt --check, clippy (-D warnings), the release stratad, and every test in release
#      mode (the guest and blkio tests drive the release stratad), the libraries' unit and
#      property tests again with overflow checks (profile checked), the DPDK-feature tests,
#   4. last, the fuzz smoke: every fuzz target (fuzz/README.md) for 30 s; a crash fails the run
#      and leaves its input in fuzz/artifacts/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing dependencies"
bash tools/install-deps.sh

step "building the test guest (base and fs variants)"
bash tools/test-guest/build-guest.sh --fs

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --release -p stratad"
cargo build --release -p stratad

step "cargo test --workspace --release"
cargo test --workspace --release --no-fail-fast

step "unit and property tests with overflow checks (profile checked)"
cargo test --profile checked --lib --no-fail-fast -p vmfs -p dataplane -p file-server \
    -p posix-perm -p fabric-nameserver
cargo test --profile checked -p stratad --bin stratad spec::

step "cargo test -p net --features dpdk (DPDK backend: net_ring and net_null vdevs)"
cargo test --release -p net --features dpdk --lib dpdk::
cargo test --release -p net --features dpdk --test ports_dpdk

step "cargo test -p net --features dpdk (DPDK net_af_xdp PMD on a veth with the steering program)"
cargo test --release -p net --features dpdk --test dpdk_af_xdp

step "cargo test -p stratad --features dpdk (--port backend=dpdk: net_af_xdp and virtual devices)"
cargo test --release -p stratad --features dpdk -- --test-threads=1

step "fuzz smoke: every target for 30 s (tools/fuzz.sh; fails on a crash)"
bash tools/fuzz.sh all 30
