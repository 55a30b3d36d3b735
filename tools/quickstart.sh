#!/usr/bin/env bash
# Strata's quick start (the README's main-job command): installs what it needs, builds stratad
# and the test guest, starts `stratad` (no arguments: it creates ./strata-data/ with a sparse
# disk0.img and listens on strata-data/disk0.sock), boots a QEMU guest attached to it, runs a
# short fio job (4 KiB random read/write, ~10 s) in the guest, prints the guest's results, then
# stops stratad with SIGTERM and checks that it exited 0.
#
# Usage: tools/quickstart.sh [--data-dir DIR] [--fio-runtime SECS]
set -euo pipefail

DATA_DIR=""
FIO_RUNTIME=10
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data-dir) DATA_DIR="${2:?--data-dir needs a directory}"; shift 2 ;;
        --data-dir=*) DATA_DIR="${1#--data-dir=}"; shift ;;
        --fio-runtime) FIO_RUNTIME="${2:?--fio-runtime needs seconds}"; shift 2 ;;
        --fio-runtime=*) FIO_RUNTIME="${1#--fio-runtime=}"; shift ;;
        -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
# A relative --data-dir is relative to where the script was started.
[[ -z "$DATA_DIR" ]] || DATA_DIR=$(realpath -m "$DATA_DIR")

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

# How long stratad may take to create its socket, and to exit after SIGTERM (seconds).
SOCKET_WAIT_SECS=30
STOP_WAIT_SECS=30

step() { printf '\n==> %s\n' "$*"; }
# Whether process $1 is running (an exited child stays a zombie until waited for: not running).
alive() { [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

step "installing dependencies"
bash tools/install-deps.sh
step "building the test guest"
bash tools/test-guest/build-guest.sh
step "building stratad and strata-vm (release)"
cargo build --release -p stratad -p test-guest

stratad_args=()
if [[ -n "$DATA_DIR" ]]; then
    stratad_args=(--data-dir "$DATA_DIR")
else
    DATA_DIR="$PWD/strata-data"
fi
SOCK="$DATA_DIR/disk0.sock"

step "starting stratad ${stratad_args[*]}"
"$TARGET_DIR/release/stratad" "${stratad_args[@]}" &
STRATAD_PID=$!
cleanup() {
    if [[ -n "${STRATAD_PID:-}" ]] && alive "$STRATAD_PID"; then
        kill -KILL "$STRATAD_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

for ((i = 0; i < SOCKET_WAIT_SECS * 10; i++)); do
    [[ -S "$SOCK" ]] && break
    if ! alive "$STRATAD_PID"; then
        wait "$STRATAD_PID" || true
        echo "quickstart: stratad exited before creating $SOCK" >&2
        exit 1
    fi
    sleep 0.1
done
[[ -S "$SOCK" ]] || { echo "quickstart: $SOCK did not appear within ${SOCKET_WAIT_SECS}s" >&2; exit 1; }

step "booting the guest on $SOCK and running fio (randrw 4k, ${FIO_RUNTIME}s)"
vm_status=0
# The guest boots in ~10 s under TCG; the time-out bounds a hang (e.g. the daemon died).
"$TARGET_DIR/release/strata-vm" --disk "$SOCK" --fio-runtime "$FIO_RUNTIME" \
    --timeout $((FIO_RUNTIME + 170)) || vm_status=$?

step "stopping stratad (SIGTERM)"
kill -TERM "$STRATAD_PID"
stratad_status=""
for ((i = 0; i < STOP_WAIT_SECS * 10; i++)); do
    if ! alive "$STRATAD_PID"; then
        stratad_status=0
        wait "$STRATAD_PID" || stratad_status=$?
        break
    fi
    sleep 0.1
done
STRATAD_PID_DONE="$STRATAD_PID"
STRATAD_PID=""
if [[ -z "$stratad_status" ]]; then
    kill -KILL "$STRATAD_PID_DONE" 2>/dev/null || true
    echo "quickstart: stratad did not exit within ${STOP_WAIT_SECS}s of SIGTERM" >&2
    exit 1
fi

echo
echo "guest fio job: $([[ $vm_status -eq 0 ]] && echo ok || echo "FAILED (exit $vm_status)")"
echo "stratad exit status after SIGTERM: $stratad_status"
if [[ $vm_status -ne 0 || $stratad_status -ne 0 ]]; then
    exit 1
fi
echo "quickstart: ok (data in $DATA_DIR)"
