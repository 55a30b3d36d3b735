#!/usr/bin/env bash
# Issue 13 before/after, run from the repository root:
#   OLD=/path/to/older/stratad bash results/strata-bench/issue13/bench.sh
# NEW = this checkout's release stratad (cargo build --release -p stratad -p strata-bench),
# OLD = a stratad built from main at 35ee81c (before the re-layout).
set -u
B=${B:-target/release/strata-bench}
NEW=${NEW:-target/release/stratad}
OLD=${OLD:?OLD=path of the older stratad build}
R=${R:-results/strata-bench/issue13}
echo "== null qd 1,32 polling, A=new B=old" 
$B --backend null --client poll --qd 1,32 --rounds 3 --seconds 1.5 --warmup 0.5 \
   --compare stratad,stratad-b --stratad $NEW --stratad-b $OLD --quiet-wait 5 --retries 1 \
   --json $R/null.json > $R/null.txt 2>&1; tail -30 $R/null.txt
echo "== raw randread,randwrite qd 1,32 polling, A=new B=old"
$B --backend raw --client poll --workload randread,randwrite --qd 1,32 --rounds 3 --seconds 1.5 --warmup 0.5 \
   --compare stratad,stratad-b --stratad $NEW --stratad-b $OLD --quiet-wait 5 --retries 1 \
   --json $R/raw.json > $R/raw.txt 2>&1; tail -30 $R/raw.txt
for i in 1 2; do
 for v in new old; do
  S=$NEW; [ $v = old ] && S=$OLD
  echo "== vmfs (written space) vs raw, stratad=$v, alternation $i"
  $B --compare vmfs,stratad --stratad $S --backend raw --vmfs-prefill --image-mib 256 --client poll \
     --workload randread,randwrite --qd 1,32 --rounds 1 --seconds 1.5 --warmup 0.5 --quiet-wait 5 --retries 1 \
     --json $R/vmfs-$v-$i.json > $R/vmfs-$v-$i.txt 2>&1; tail -14 $R/vmfs-$v-$i.txt
 done
done
echo "== isolation A=new B=old"
$B --scenario isolation --compare stratad,stratad-b --stratad $NEW --stratad-b $OLD --rounds 3 \
   --seconds 1.5 --warmup 0.5 --quiet-wait 5 --json $R/isolation.json > $R/isolation.txt 2>&1; tail -30 $R/isolation.txt
echo BENCH-DONE
