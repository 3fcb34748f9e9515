#!/usr/bin/env bash
# The second GPU call: why the capture fails, then the fast recipe with the first fix that captures.
cd "$(dirname "$0")/.."
mkdir -p /tmp/logs
for t in ":32:96" "nobench:32:96" "relaxed:32:96" ":8:64" "nobench_all:32:96"; do
  IFS=: read fix b px <<< "$t"
  timeout 60 python3 gpu/debug.py --try "$fix" "$b" "$px" 2>&1 | tail -n 40
done > $OUT/tries.log
grep '^ROW' $OUT/tries.log | cut -c1-400
fix=$(grep '^ROW' $OUT/tries.log | python3 -c '
import json,sys
rows=[json.loads(l[4:]) for l in sys.stdin]
ok=[r["fix"] for r in rows if r["ok"] and r["batch"]==32]
print(ok[0] if ok else "none")')
echo "fix: $fix"
if [ "$fix" != none ]; then
  GRAPH_FIX=$fix GPU_LOGS=/tmp/logs python3 gpu/check.py --out $OUT --only fast,fast_seed1,fixed,rates 2>&1 | cut -c1-1200
  tail -n 25 /tmp/logs/fast.log > $OUT/fast_tail.log
fi
