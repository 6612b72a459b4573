#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_*.py need on the lent GPU machine (Python 3.12, torch and
# transformers preinstalled but an older transformers, no pydantic, nothing reachable) into .whl/ at the
# repository root. Versions follow this machine's esam3 environment. Then carry ".whl" and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
source scripts/env.sh
esam3_env >/dev/null
versions="$(.venv/bin/python - <<'PY'
import importlib.metadata as m
for name in ("transformers", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions"):
    print(f"{name.replace('_', '-')}=={m.version(name)}")
PY
)"
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $versions 2> >(grep -v "is ignored: it is neither" >&2)
ls -l .whl
