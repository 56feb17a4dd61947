#!/usr/bin/env bash
# Checks k5serve on another Python: a fresh virtualenv with that Python, the package installed in it with the test
# tools (`pip install -e ".[test]"`: pytest, websockets, the runware SDK; not the ray/postgres/s3 extras), then a
# smoke subset of the suite against it: the install itself (tests/test_install.py, tests/test_python_smoke.py's
# test_the_install), `k5serve serve --tiny`, one request over HTTP, one over the WebSocket, one through the
# official runware SDK (tests/test_python_smoke.py). Prints the Python and torch versions, what pip downloaded,
# the venv's size and pytest's summary; exits non-zero when anything fails.
#
#   scripts/check-python.sh [--rm] VERSION [VENV]
#
# VERSION: 3.11, 3.12 or 3.13 (python3.X on PATH, else pyenv's newest 3.X), or the path of a Python executable.
# VENV: the virtualenv's folder, replaced when it is one already (default: ${TMPDIR:-/tmp}/k5serve-py3.X).
# --rm: remove the virtualenv at the end (it is a few GB: torch from PyPI is a CUDA build).
# TORCH_INDEX=cpu (or an index URL): torch and torchvision from PyTorch's CPU-only index first, as in the Makefile.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
remove=0
if [ "${1:-}" = "--rm" ]; then remove=1; shift; fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
want=$1
root=$(cd "$(dirname "$0")/.." && pwd)

runs() { "$1" -c '' >/dev/null 2>&1; }
python=
case $want in
    */*) python=$want ;;
    3.*)
        if runs "python$want"; then
            python=python$want
        elif command -v pyenv >/dev/null 2>&1; then
            # A pyenv shim for a version pyenv has not selected is on PATH but does not run: take the version's own.
            for candidate in $(find "$(pyenv root)/versions" -mindepth 1 -maxdepth 1 -name "$want.*" | sort -V -r); do
                if runs "$candidate/bin/python$want"; then python=$candidate/bin/python$want; break; fi
            done
        fi ;;
    *) usage ;;
esac
if [ -z "$python" ] || ! runs "$python"; then
    echo "check-python: no Python $want that runs here (tried python$want on PATH and pyenv's versions)" >&2
    exit 2
fi
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=${2:-${TMPDIR:-/tmp}/k5serve-py$version}
if [ -e "$venv" ]; then
    [ -f "$venv/pyvenv.cfg" ] || { echo "check-python: $venv exists and is no virtualenv; not touching it" >&2; exit 2; }
    rm -rf "$venv"
fi

echo "== Python: $("$python" -VV | head -n 1) ($(command -v "$python" || echo "$python"))"
echo "== virtualenv: $venv"
"$python" -m venv "$venv"
log=$venv/install.log
"$venv/bin/python" -m pip install --quiet --upgrade pip >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
start=$(date +%s)
if [ -n "${TORCH_INDEX:-}" ]; then
    index=$TORCH_INDEX
    [ "$index" = cpu ] && index=https://download.pytorch.org/whl/cpu
    pins=$(sed -n 's/^ *"\(torch\(vision\)\{0,1\}==[^"]*\)".*/\1/p' "$root/pyproject.toml")
    # shellcheck disable=SC2086  # the pins are two words
    "$venv/bin/python" -m pip install --progress-bar off $pins --index-url "$index" >>"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; exit 1; }
fi
PYTHONWARNINGS="ignore:Editable installation." \
    "$venv/bin/python" -m pip install --progress-bar off -e "${root}[test]" >>"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "check-python: the install failed (log: $log)" >&2; exit 1; }
seconds=$(( $(date +%s) - start ))
"$venv/bin/python" - "$log" "$seconds" <<'EOF'
import re, sys
log, seconds = open(sys.argv[1]).read(), int(sys.argv[2])
unit = {"B": 1e-6, "kB": 1e-3, "KB": 1e-3, "MB": 1.0, "GB": 1e3}
files = re.findall(r"^\s*Downloading (\S+) \(([\d.]+) (B|kB|KB|MB|GB)\)", log, re.M)
total = sum(float(n) * unit[u] for _, n, u in files)
torch = [f"{name} ({n} {u})" for name, n, u in files if name.startswith("torch-")]
local = len(re.findall(r"^\s*Processing /", log, re.M))
print(f"== install: {seconds} s; pip downloaded {len(files)} files, {total / 1e3:.2f} GB"
      f" ({', '.join(torch) or 'torch not downloaded'}); {local} files taken from this disk")
warned = [line.strip() for line in log.splitlines() if "Warning: " in line or "Package would be ignored" in line]
print("== setuptools warnings: " + ("; ".join(warned) if warned else "none"))
EOF
"$venv/bin/python" -c 'import torch; print("== torch:", torch.__version__, "(CUDA", torch.version.cuda or "none", "build)")'

cd "$root"
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_install.py tests/test_python_smoke.py
status=$?
set -e
echo "== Python $version, venv size $(du -sh "$venv" | cut -f1): pytest exit $status"
if [ "$remove" = 1 ]; then rm -rf "$venv"; echo "== removed $venv"; fi
exit $status
