#!/usr/bin/env bash
# Strata's full check, as CI runs it (.ci/run) and as the README's test command:
#   1. installs what the tests need (tools/install-deps.sh: QEMU, fio, guest build tools),
#   2. builds the cached test guest and its fs and iscsi variants (tools/test-guest/build-guest.sh
#      --fs: the base guest, then pjdfstest via tools/test-guest/build-pjdfstest.sh, the test
#      users and the acl tools for the virtio-fs share tests; --iscsi: open-iscsi and the
#      iscsi_tcp/virtio_net modules for the Linux-initiator test; a no-op once built),
#   3. cargo fmt --check, clippy (-D warnings), the release stratad, and every test in release
#      mode (the guest and blkio tests drive the release stratad; the iSCSI target's peer
#      tests, tests/tests/iscsi_*.rs, run libiscsi's iscsi-test-cu (~20 s) and the Linux
#      initiator in the iscsi guest (~30 s) against stratad's target), the libraries' unit and
#      property tests again with overflow checks (profile checked), the DPDK-feature tests,
#   4. last, the fuzz smoke: every fuzz target (fuzz/README.md) for 30 s; a crash fails the run
#      and leaves its input in fuzz/artifacts/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing dependencies"
bash tools/install-deps.sh

step "building the test guest (base, fs and iscsi variants)"
bash tools/test-guest/build-guest.sh --fs
bash tools/test-guest/build-guest.sh --iscsi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --release -p stratad"
cargo build --release -p stratad

step "cargo test --workspace --release"
cargo test --workspace --release --no-fail-fast

step "unit and property tests with overflow checks (profile checked)"
cargo test --profile checked --lib --no-fail-fast -p vmfs -p vmfs-disk -p dataplane \
    -p file-server -p posix-perm -p fabric-nameserver -p san
cargo test --profile checked -p stratad --bin stratad spec::

step "layout: dataplane without vmfs; stratad without the packet path needs no clang"
if cargo tree -p dataplane -e normal,dev --prefix none | grep -q '^vmfs '; then
    echo "dataplane depends on vmfs (the vmfs disk backend belongs to vmfs-disk)" >&2
    exit 1
fi
BPF_CLANG=/nonexistent/clang cargo build --release -p stratad --no-default-features

step "cargo test -p net --features dpdk (DPDK backend: net_ring and net_null vdevs)"
cargo test --release -p net --features dpdk --lib dpdk::
cargo test --release -p net --features dpdk --test ports_dpdk

step "cargo test -p net --features dpdk (DPDK net_af_xdp PMD on a veth with the steering program)"
cargo test --release -p net --features dpdk --test dpdk_af_xdp

step "cargo test -p stratad --features dpdk (--port backend=dpdk: net_af_xdp and virtual devices)"
cargo test --release -p stratad --features dpdk -- --test-threads=1

step "fuzz smoke: every target for 30 s (tools/fuzz.sh; fails on a crash)"
bash tools/fuzz.sh all 30
