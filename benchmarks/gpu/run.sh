#!/usr/bin/env bash
# The GPU benchmark on a bare machine with no network: its own Python 3.12 and torch, no diffusers.
#
#   benchmarks/gpu/run.sh OUT [bench_gpu.py options]     e.g.  run.sh /tmp/gpu
#                                                             run.sh /tmp/cpu --tiny --steps 4  (the CPU check)
#
# 1. installs the wheels in benchmarks/gpu/wheels/ (or $K5_WHEELS) into a private folder, without an index;
#    fill that folder beforehand, where there is a network, with benchmarks/gpu/fill-wheels.sh;
# 2. assembles the k5serve package from this checkout (no build step, no pip install of k5serve);
# 3. runs benchmarks/bench_gpu.py with a time budget, writing OUT/table.md, OUT/results.json, OUT/log.txt.
# $PYTHON picks the interpreter (default python3). The row budget is meant to end it within 8 minutes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: run.sh OUT [bench_gpu.py options]}
shift
py=${PYTHON:-python3}
wheels=${K5_WHEELS:-$here/wheels}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
site=$work/site
mkdir -p "$site"
started=$(date +%s)

shopt -s nullglob
found=("$wheels"/*.whl)
if ((${#found[@]})); then
    echo "installing ${#found[@]} wheels from $wheels"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "${found[@]}"
else
    echo "no wheels in $wheels: using what $py has"
fi
# The package as pyproject.toml maps it: k5serve/ plus the server, pipelines, accel and weights folders.
cp -r "$root/k5serve" "$site/k5serve"
for sub in server pipelines accel weights; do
    cp -r "$root/$sub" "$site/k5serve/$sub"
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$work/inductor}

cd "$work"  # not the checkout: its k5serve/ folder alone (no sub-packages) would shadow the assembled one
"$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "huggingface_hub", "cache_dit", "torchao", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - a missing optional one is reported, the benchmark decides
        print(name, "missing:", type(exc).__name__, exc)
try:  # fail here, not after minutes of building
    import k5serve.pipelines.k5, k5serve.accel.dbcache  # noqa: E401,F401
except ImportError as exc:
    raise SystemExit(f"run.sh: {exc}; put the missing wheel in benchmarks/gpu/wheels "
                     "(benchmarks/gpu/fill-wheels.sh fetches diffusers, cache-dit and torchao)")
PY

budget=${K5_BUDGET_SECONDS:-360}  # counted from the start of bench_gpu.py (the build included); rows
                                  # start only inside it, the last one may run a minute or two past it
status=0
"$py" "$root/benchmarks/bench_gpu.py" --out "$out" --budget-seconds "$budget" "$@" 2>&1 | tee "$out/log.txt" \
    || status=$?
echo "run.sh: exit $status after $(( $(date +%s) - started )) s; results in $out"
exit "$status"
