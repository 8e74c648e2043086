# One resumable piece of a `q4lab sweep`, run through the `device` tool (no GPU here):
#
#   Q4LAB_GIT_COMMIT=<sha of the tree sent> bash scripts/device_sweep.sh SECONDS NAME <q4lab sweep args>
#
# e.g. ... 500 g16 grid --dtypes bf16,fp16 --impls simt,dequant_blas,dense,bnb, with carry [".whl", ".bnb",
# ".runs"]. The sweep runs at most SECONDS, logging to .runs/NAME.jsonl (resumed from .runs/NAME.jsonl.gz
# when carried back in), and returns the log as $OUT/NAME.jsonl.gz: copy it into .runs/ here and run the
# same line again until it reports the dataset's rows, then `q4lab sweep compact .runs/*.jsonl --out ...`.
# Only the log comes back ($OUT returns at most 8 files a call: several sweeps fit in one command).
set -o pipefail
secs=$1 name=$2
shift 2
[ -n "$Q4LAB_GIT_COMMIT" ] || { echo "set Q4LAB_GIT_COMMIT to the commit whose tree is sent"; exit 2; }
source scripts/device_env.sh > /tmp/build_$name.log 2>&1 || { cat /tmp/build_$name.log; exit 1; }
mkdir -p .runs
[ -f .runs/$name.jsonl.gz ] && gunzip -f .runs/$name.jsonl.gz
timeout $secs python -m q4lab sweep "$@" --out /tmp/$name.parquet --log .runs/$name.jsonl --no-progress > /tmp/$name.txt 2>&1
rc=$?
state=$([ $rc = 124 ] && echo "time is up: run it again to resume" || echo "exit $rc")
echo "$name: $state, $(wc -l < .runs/$name.jsonl) log lines"
tail -2 /tmp/$name.txt
gzip -c .runs/$name.jsonl > $OUT/$name.jsonl.gz
