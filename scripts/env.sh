# Sourced by scripts/demo and scripts/test: makes the Python environment they run in.
#
# The full dependency set is ~7 GB, so it lives once per dependency spec in a shared venv outside the
# clone (~/.cache/esam3/venvs/<hash>, or $ESAM3_VENV_ROOT/<hash>); the hash covers pyproject.toml's
# dependency lists, the Python version and the torch pins below. Each clone gets a tiny overlay venv (.venv) that
# sees the shared site-packages through a .pth file and holds only the editable install of this clone,
# so clones at different paths never overwrite each other's editable install.
#
# torch/torchvision are installed first at the exact versions below (on the development machine pip takes
# them from local disk); the constraint keeps any later resolution from pulling a newer torch.
set -euo pipefail

ESAM3_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ESAM3_PYTHON="${ESAM3_PYTHON:-python3}"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
RUFF_VERSION="0.17.6"  # the linter / formatter scripts/test runs; its own small venv, outside the dependency set

_esam3_log() { printf '[esam3 setup] %s\n' "$*" >&2; }

_esam3_spec_hash() {
    "$ESAM3_PYTHON" - "$ESAM3_ROOT/pyproject.toml" "${TORCH_PINS[@]}" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
spec = {
    "deps": project["dependencies"],
    "extras": project.get("optional-dependencies", {}),
    "python": sys.version.split()[0],
    "pins": sys.argv[2:],
}
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16])
PY
}

_esam3_requirements() {
    "$ESAM3_PYTHON" - "$ESAM3_ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]:
    print(req)
PY
}

_esam3_build_shared() {
    local target="$1"
    _esam3_log "building the shared dependency venv at $target (once per dependency set; a few minutes)"
    rm -rf "$target"
    "$ESAM3_PYTHON" -m venv "$target"
    "$target/bin/python" -m pip install -q --upgrade pip setuptools wheel 2> >(grep -v "is ignored: it is neither" >&2)
    "$target/bin/python" -m pip install -q "${TORCH_PINS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
    printf '%s\n' "${TORCH_PINS[@]}" >"$target/torch-constraints.txt"
    _esam3_requirements >"$target/requirements.txt"
    "$target/bin/python" -m pip install -q -c "$target/torch-constraints.txt" -r "$target/requirements.txt" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$target/.complete"
    _esam3_log "shared venv ready: $(du -sh "$target" | cut -f1)"
}

_esam3_overlay() {
    local shared="$1" overlay="$ESAM3_ROOT/.venv"
    local shared_site overlay_site
    shared_site="$("$shared/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [[ ! -x "$overlay/bin/python" ]] || [[ "$(cat "$overlay/.shared" 2>/dev/null)" != "$shared" ]]; then
        _esam3_log "making the clone's overlay venv $overlay"
        rm -rf "$overlay"
        "$ESAM3_PYTHON" -m venv --without-pip "$overlay"
        echo "$shared" >"$overlay/.shared"
    fi
    overlay_site="$("$overlay/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$shared_site" >"$overlay_site/_esam3_shared_deps.pth"
    # Reinstall the editable package whenever pyproject.toml changes (new subpackages, entry points).
    local stamp
    stamp="$(sha256sum "$ESAM3_ROOT/pyproject.toml" | cut -c1-16)"
    if [[ "$(cat "$overlay/.installed" 2>/dev/null)" != "$stamp" ]]; then
        PYTHONWARNINGS=ignore "$shared/bin/python" -m pip --python "$overlay/bin/python" install -q --no-deps \
            --no-build-isolation -e "$ESAM3_ROOT" 2> >(grep -v "is ignored: it is neither" >&2)
        echo "$stamp" >"$overlay/.installed"
    fi
}

esam3_env() {
    local root="${ESAM3_VENV_ROOT:-$HOME/.cache/esam3/venvs}"
    local hash shared
    hash="$(_esam3_spec_hash)"
    shared="$root/$hash"
    mkdir -p "$root"
    if [[ ! -f "$shared/.complete" ]]; then
        # One builder per dependency set; a second clone waits for it instead of racing.
        exec 9>"$shared.lock"
        flock 9
        [[ -f "$shared/.complete" ]] || _esam3_build_shared "$shared"
        flock -u 9
    fi
    _esam3_overlay "$shared"
    export PATH="$ESAM3_ROOT/.venv/bin:$shared/bin:$PATH"
    export VIRTUAL_ENV="$ESAM3_ROOT/.venv"
}

# Prints the path of a ruff of RUFF_VERSION, installed once into its own venv next to the shared ones.
esam3_ruff() {
    local root="${ESAM3_VENV_ROOT:-$HOME/.cache/esam3/venvs}/ruff-$RUFF_VERSION"
    mkdir -p "$(dirname "$root")"
    exec 8>"$root.lock"
    flock 8  # one installer at a time (clones testing side by side)
    if [[ ! -x "$root/bin/ruff" ]]; then
        _esam3_log "installing ruff $RUFF_VERSION into $root"
        rm -rf "$root"
        "$ESAM3_PYTHON" -m venv "$root"
        "$root/bin/python" -m pip install -q "ruff==$RUFF_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
    fi
    echo "$root/bin/ruff"
}
