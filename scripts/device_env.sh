# Sourced at the start of every `device` call: puts the carried wheels and bitsandbytes on the path and
# builds the kernel library for the device's GPU into /tmp. Carry `.whl` (polars, polars-runtime-32 and
# tqdm wheels from `pip download`, which the device lacks) and `.bnb` (the bitsandbytes 0.50.2 wheel
# unpacked, keeping only libbitsandbytes_cuda130.so); both are git-ignored.
set -e
export PYTHONUNBUFFERED=1 Q4LAB_CACHE=/tmp/q4lab-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
[ -d .bnb ] && export PYTHONPATH=$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m q4lab build
set +e
