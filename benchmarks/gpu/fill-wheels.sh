#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ with what run.sh installs on a GPU machine that has Python 3.12, torch and
# transformers but no diffusers, cache-dit, torchao or bitsandbytes, and no network. Run it where PyPI is reachable:
#
#   benchmarks/gpu/fill-wheels.sh [PYTHON_VERSION]      (default 3.12; the folder is ignored by git)
#
# The versions are the project's own pins, read from pyproject.toml.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
version=${1:-3.12}
dest=${K5_WHEELS:-$here/wheels}
mkdir -p "$dest"
py=${PYTHON:-python3}
mapfile -t pins < <("$py" - "$root/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
pins = project["dependencies"] + project["optional-dependencies"]["quant"]
wanted = {"diffusers", "cache-dit", "torchao", "bitsandbytes"}
for pin in pins:
    name = re.split(r"[=<>\[ ]", pin, maxsplit=1)[0]
    if name in wanted:
        print(pin)
PY
)
pins+=("importlib_metadata")  # diffusers' one requirement a bare torch image may lack
echo "downloading for Python $version: ${pins[*]}"
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "${pins[@]}"
ls -l "$dest"
