# Sourced at the start of every `device` call (see docs/PERF.md): puts the carried wheels and
# bitsandbytes on the path and builds the kernel library for the device's GPU into /tmp.
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
