#!/bin/bash
# usage: compare.sh A B -- cmp every CSV, prediction, metrics, ablation jsonl, gate shard and PNG of the run folders under A and B
a=$1; b=$2; n=0; bad=0
for run in $(cd $a && ls -d */); do
  for f in $(cd $a/$run && find . \( -name '*.csv' -o -name 'predictions*.jsonl' -o -name '*metrics*.json' -o -name '*.npz' -o -name '*.png' -o -path './ablation/*.jsonl' \) | sort); do
    n=$((n+1)); if ! cmp -s "$a/$run/$f" "$b/$run/$f"; then echo "DIFFER: $run$f"; bad=$((bad+1)); fi
  done
  for f in $(cd $b/$run && find . \( -name '*.csv' -o -name '*.npz' -o -name '*.png' \) | sort); do [ -e "$a/$run/$f" ] || { echo "ONLY IN B: $run$f"; bad=$((bad+1)); }; done
done
echo "$n files compared, $bad differ"
