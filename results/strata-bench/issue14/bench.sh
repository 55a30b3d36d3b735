#!/usr/bin/env bash
# Issue 14 performance: Strata's iSCSI target against tgtd, and against Strata's own vhost-user
# path on the same disk. Run from the repository root, as root (tgtd), on a quiet machine:
#   cargo build --release -p stratad -p strata-bench && bash results/strata-bench/issue14/bench.sh
#
# 1. iscsi.txt/.json: `strata-bench --scenario iscsi`: a LUN on a 1 GiB tmpfs raw image served by
#    stratad (--iscsi-target, reactor and all threads on CPU 1) and by tgtd (taskset CPU 1),
#    alternating, fresh target per run; strata-bench's own iSCSI initiator on CPU 0 (login
#    without authentication, ImmediateData, qd N READ(10)/WRITE(10) of 4 KiB at random aligned
#    LBAs); 4 KiB random read and write at qd 1 and 32; IOPS, p50/p99 latency, target CPU per
#    I/O (utime+stime of the target process); runs with more than --max-other % of the two CPUs
#    taken by other work are measured again.
# 2. vhost-user.txt/.json: the same image and workloads through stratad's vhost-user-blk path
#    (libblkio client sleeping on completions, as the iSCSI initiator blocks on its socket), with
#    qemu-storage-daemon as the usual reference: what the network protocol costs.
# 3. iscsi-perf.txt: libiscsi's iscsi-perf (reads only, unaligned 512-byte offsets) against each
#    target as a cross-check of the read figures from an initiator no one here wrote.
set -u
B=${B:-target/release/strata-bench}
S=${S:-target/release/stratad}
R=${R:-results/strata-bench/issue14}
IMG=${IMG:-/dev/shm/strata-issue14-lun.img}
ROUNDS=${ROUNDS:-5}
COMMON=(--qd 1,32 --rounds "$ROUNDS" --seconds 3 --warmup 1 --quiet-wait 20 --retries 2
        --image "$IMG" --image-mib 1024 --server-cpu 1 --client-cpu 0)
trap 'rm -f "$IMG"' EXIT

echo "== iSCSI: stratad vs tgtd, randread and randwrite, qd 1 and 32"
$B --scenario iscsi --iscsi-targets stratad,tgtd --stratad "$S" "${COMMON[@]}" \
   --json "$R/iscsi.json" >"$R/iscsi.txt" 2>&1
tail -12 "$R/iscsi.txt"

echo "== vhost-user on the same image: stratad vs qemu-storage-daemon"
$B --backend raw --client sleep --workload randread,randwrite --compare stratad,qsd \
   --stratad "$S" "${COMMON[@]}" --json "$R/vhost-user.json" >"$R/vhost-user.txt" 2>&1
tail -12 "$R/vhost-user.txt"

echo "== iscsi-perf cross-check (reads, 10 s each)"
{
    for target in stratad tgtd; do
        for qd in 1 32; do
            printf '%s qd %s: ' "$target" "$qd"
            # strata-bench's iSCSI scenario starts the targets; here a minimal copy of it.
            port=$((20000 + RANDOM % 20000))
            if [ "$target" = stratad ]; then
                taskset -c 1 "$S" --cpus 1 --disk "backend=raw,path=$IMG,name=lun0" \
                    --iscsi-portal "127.0.0.1:$port" --iscsi-state-dir "$IMG.state" \
                    --iscsi-target iqn=iqn.2026-12.org.strata.bench:lun,disk=lun0 \
                    >/dev/null 2>&1 &
                pid=$!; lun=0
            else
                ctl=$((1000 + RANDOM % 20000))
                taskset -c 1 tgtd -f -C "$ctl" --iscsi "portal=127.0.0.1:$port" >/dev/null 2>&1 &
                pid=$!; lun=1
                sleep 1
                tgtadm -C "$ctl" --lld iscsi --op new --mode target --tid 1 \
                    -T iqn.2026-12.org.strata.bench:lun
                tgtadm -C "$ctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$IMG"
                tgtadm -C "$ctl" --lld iscsi --op bind --mode target --tid 1 -I ALL
            fi
            sleep 1
            taskset -c 0 iscsi-perf -i iqn.2026-12.org.strata.bench:perf -m "$qd" -b 8 -t 10 -r \
                "iscsi://127.0.0.1:$port/iqn.2026-12.org.strata.bench:lun/$lun" 2>&1 |
                tr '\r' '\n' | grep '^iops average' | tail -1
            kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
            rm -rf "$IMG.state"
        done
    done
} | tee "$R/iscsi-perf.txt"
echo BENCH-DONE
