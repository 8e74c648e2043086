# One `device` call for a kernel edit: check each variant of kernels/ (the GPU tests on its kernels: every
# impl against the float64 reference, compute-sanitizer), then time it beside the shipped kernels in the
# same rounds (`q4lab bench --kernels`):
#
#   bash scripts/device_ab.sh DIR[,DIR] [q4lab bench arguments]
#
# e.g. ... .exp/k_try --shapes 28672x8192,4096x4096 --m 1,8,16 --dtypes bf16 --impls mma,dense, with carry
# [".whl", ".exp/k_try"]. The dataset comes back as $OUT/ab.parquet; the A/B table is printed last. A variant
# that fails a test stops the call before anything is timed.
set -o pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/device_ab.sh DIR[,DIR] [q4lab bench arguments]" >&2; exit 2; }
variants=$1
shift
source scripts/device_env.sh > /tmp/build.log 2>&1 || { cat /tmp/build.log; exit 1; }
for variant in ${variants//,/ }; do
  echo "== $variant: the GPU tests on its kernels"
  Q4LAB_KERNELS=$(realpath "$variant") python -m pytest -q -x -m gpu tests/test_gpu.py tests/test_mma.py || exit 1
done
python -m q4lab bench --kernels "$variants" "$@" --out "${OUT:-/tmp}/ab.parquet" --no-progress
