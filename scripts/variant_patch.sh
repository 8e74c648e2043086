#!/usr/bin/env bash
# Keep a kernel variant an experiment timed, as a patch on the commit its copy of kernels/ was taken from:
#
#   bash scripts/variant_patch.sh BASE_COMMIT VARIANT_KERNEL_DIR "what it changes"
#
# writes data/experiments/variants/<the variant's kernel hash>.patch (the hash its experiment rows name in
# `kernels`). Rebuild the variant from it:
#
#   git worktree add /tmp/variant BASE_COMMIT && git -C /tmp/variant apply "$PWD/data/experiments/variants/HASH.patch"
#   Q4LAB_KERNELS=/tmp/variant/kernels .venv/bin/q4lab build
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 3 ] || { echo "usage: bash scripts/variant_patch.sh BASE_COMMIT VARIANT_KERNEL_DIR \"what it changes\"" >&2; exit 2; }
base=$(git rev-parse --verify --quiet "$1^{commit}") || { echo "no commit $1 in this repository" >&2; exit 2; }
dir=$2 what=$3
hash=$(.venv/bin/python -c "import sys; from pathlib import Path; from q4lab.kernels import source_hash; print(source_hash(Path(sys.argv[1])))" "$dir")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/a" "$work/b/kernels"
git archive "$base" kernels | tar -x -C "$work/a"
cp "$dir"/*.cu "$dir"/*.h "$work/b/kernels/"
status=0
(cd "$work" && diff -ruN a/kernels b/kernels) > "$work/diff" || status=$?
sed -i -E "s/^(---|\+\+\+) ([^\t]+)\t.*/\1 \2/" "$work/diff"  # no file times: the patch is the change alone
[ $status = 1 ] || { echo "$dir is kernels/ at ${base:0:12} itself (or diff failed): nothing to keep" >&2; exit 2; }
out=data/experiments/variants/$hash.patch
mkdir -p "$(dirname "$out")"
{ echo "kernel variant $hash: $what"; echo "base: $base"; echo; cat "$work/diff"; } > "$out"
echo "wrote $out ($(grep -c '^[-+][^-+]' "$out") changed lines against ${base:0:12})"
