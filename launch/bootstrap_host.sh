#!/usr/bin/env bash
# Prepare one host to run simclr_jax: a virtual environment in the checkout with JAX for the host's
# accelerator and the package itself (editable, with the tfds extra). Run it on every host of a job
# (tpu_vm.sh setup does so on every TPU worker); rerunning it only upgrades what changed.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/bootstrap_host.sh [--accelerator tpu|cuda12|cuda13|cpu] [--python PYTHON]
                                [--jax-version VERSION] [--dry-run]

  --accelerator   which JAX build to install (default: tpu if /dev/accel0 or /dev/vfio exists,
                  cuda12 if nvidia-smi works, else cpu)
  --python        the interpreter that creates the venv (default: the newest python3.1x found,
                  3.11+; on Ubuntu 22.04 images, which ship 3.10, apt installs python3.11)
  --jax-version   pin jax, e.g. 0.10.2 (default: the newest pip resolves)
  --dry-run       print the commands instead of running them

The venv is created at <checkout>/.venv; launch scripts run <checkout>/.venv/bin/python.
EOF
}

ACCELERATOR="" PYTHON_BIN="" JAX_VERSION=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accelerator) ACCELERATOR="$(need_value "$@")"; shift 2 ;;
    --python) PYTHON_BIN="$(need_value "$@")"; shift 2 ;;
    --jax-version) JAX_VERSION="$(need_value "$@")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done

if [[ -z "$ACCELERATOR" ]]; then
  if [[ -e /dev/accel0 || -d /dev/vfio ]] && [[ ! -e /dev/nvidia0 ]]; then
    ACCELERATOR=tpu
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ACCELERATOR=cuda12
  else
    ACCELERATOR=cpu
  fi
fi
case "$ACCELERATOR" in
  tpu | cuda12 | cuda13) JAX_SPEC="jax[$ACCELERATOR]" ;;
  cpu) JAX_SPEC="jax" ;;
  *) die "--accelerator must be tpu, cuda12, cuda13 or cpu (got '$ACCELERATOR')" ;;
esac
[[ -n "$JAX_VERSION" ]] && JAX_SPEC+="==$JAX_VERSION"

# jax needs Python 3.11+; TPU VM images (Ubuntu 22.04) ship 3.10, and universe has 3.11.
if [[ -z "$PYTHON_BIN" ]]; then
  for candidate in python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1; then
      PYTHON_BIN="$candidate"
      break
    fi
  done
fi
if [[ -z "$PYTHON_BIN" ]]; then
  command -v apt-get >/dev/null 2>&1 || die "no python3.11+ found: pass --python /path/to/python3.11"
  sudo=()
  [[ "$(id -u)" != 0 ]] && sudo=(sudo)
  run "${sudo[@]}" apt-get update -qq
  run "${sudo[@]}" apt-get install -y -qq python3.11 python3.11-venv
  PYTHON_BIN=python3.11
fi

VENV="$REPO/.venv"
PIP=("$VENV/bin/python" -m pip install --quiet)
if [[ ! -x "$VENV/bin/python" || "$DRY_RUN" == 1 ]]; then
  run "$PYTHON_BIN" -m venv "$VENV"
fi
run "${PIP[@]}" --upgrade pip
run "${PIP[@]}" "$JAX_SPEC"
run "${PIP[@]}" -e "${REPO}[tfds]"
run "$VENV/bin/python" -c "import jax; print(jax.__version__, jax.devices())"
