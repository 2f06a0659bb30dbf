#!/usr/bin/env bash
# Cloud TPU VMs and pod slices: create, copy the code, set up, run a stage on every worker, follow
# its log, stop it, delete. Every worker runs the same command (a pod slice is one JAX program over
# several hosts); simclr_jax.distributed joins them with jax.distributed.initialize().
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [-- STAGE_ARGS...]

Commands:
  create    create the TPU VM / pod slice (--accelerator-type, --version, --spot); with the
            stage's flags after --, plan them for the slice first and refuse what does not fit
  copy      pack this checkout (without .venv, .git, caches) and unpack it on every worker
  clone     git clone --repo URL [--ref REF] on every worker instead of copying
  setup     on every worker: launch/bootstrap_host.sh --accelerator tpu (venv, jax[tpu], package)
  run       start a stage on every worker in the background; STAGE_ARGS go to the stage.
            With --accelerator-type, the stage is planned for that slice first (memory per
            chip, time bounds: python -m simclr_jax.plan) and a config that does not fit is
            refused
  evaluate  start the evaluation job (python -m simclr_jax.evaluate) on one worker (--worker,
            default 0), on its CPU beside the training job that holds the TPU chips; it
            evaluates each new checkpoint of --workdir once and exits after the last step.
            (On a TPU VM of its own: run --stage evaluate.) logs/stop --stage evaluate follow it
  logs      follow the stage's log on one worker (--worker, default 0; Ctrl-C stops following)
  stop      stop the stage on every worker
  ssh       an interactive shell on one worker (--worker, default 0)
  delete    delete the TPU VM

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-central2-b for v4 (required)
  --project PROJECT        gcloud project (default: gcloud's configured one)
  --accelerator-type TYPE  create: v4-8, v4-32, v3-32, v5litepod-16, ... (default v4-32);
                           run: the slice's type, to plan the stage for it first
  --version VERSION        create: TPU software version (default tpu-ubuntu2204-base;
                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                   create: a Spot VM (cheaper, can be preempted; runs resume)
  --repo URL, --ref REF    clone: where the code comes from (default ref: main)
  --stage STAGE            run/logs/stop: pretrain (default), finetune, distill or evaluate
  --cache-dir DIR          run: JAX compilation cache shared by the workers (e.g. gs://b/jax_cache)
  --worker N               logs/ssh/evaluate: which worker (default 0)
  --no-plan                create/run: launch without planning first
  --plan-capacity-gib N    plan against N GiB per device instead of its HBM (keep headroom)
  --dry-run                print the commands instead of running them (the plan still runs)
  -h, --help               this message

Example (v4-32 = 4 hosts x 4 chips):
  launch/tpu_vm.sh create --name simclr --zone us-central2-b --accelerator-type v4-32
  launch/tpu_vm.sh copy   --name simclr --zone us-central2-b
  launch/tpu_vm.sh setup  --name simclr --zone us-central2-b
  launch/tpu_vm.sh run    --name simclr --zone us-central2-b -- \
      --config=configs/pretrain_imagenet.py:r50_1x_sk0 --workdir=gs://BUCKET/r50 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
  launch/tpu_vm.sh evaluate --name simclr --zone us-central2-b -- --workdir=gs://BUCKET/r50
  launch/tpu_vm.sh logs   --name simclr --zone us-central2-b
  launch/tpu_vm.sh delete --name simclr --zone us-central2-b
EOF
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage; exit 0 ;;
  create | copy | clone | setup | run | evaluate | logs | stop | ssh | delete) COMMAND="$1"; shift ;;
  *) die "unknown command '$1'" ;;
esac

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base" SPOT=0
REPO_URL="" REF="main" STAGE="pretrain" CACHE_DIR="" WORKER=0 STAGE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$(need_value "$@")"; shift 2 ;;
    --zone) ZONE="$(need_value "$@")"; shift 2 ;;
    --project) PROJECT="$(need_value "$@")"; shift 2 ;;
    --accelerator-type) ACCELERATOR="$(need_value "$@")"; shift 2 ;;
    --version) VERSION="$(need_value "$@")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo) REPO_URL="$(need_value "$@")"; shift 2 ;;
    --ref) REF="$(need_value "$@")"; shift 2 ;;
    --stage) STAGE="$(need_value "$@")"; shift 2 ;;
    --cache-dir) CACHE_DIR="$(need_value "$@")"; shift 2 ;;
    --worker) WORKER="$(need_value "$@")"; shift 2 ;;
    --no-plan) PLAN=0; shift ;;
    --plan-capacity-gib) PLAN_CAPACITY="$(need_value "$@")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; STAGE_ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$WORKER'"
check_stage "$STAGE"

REMOTE_DIR="simclr_jax"  # relative to the home directory on every worker
LOG_DIR="simclr_logs"
TARBALL="${TMPDIR:-/tmp}/simclr_jax_${NAME}.tar.gz"
TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")

on_workers() {  # on_workers WORKERS REMOTE_COMMAND
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$1" "--command=$2"
}

case "$COMMAND" in
  create)
    extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    plan_or_refuse "${ACCELERATOR:-v4-32}" "${STAGE_ARGS[@]}"
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=${ACCELERATOR:-v4-32}" \
      "--version=$VERSION" "${extra[@]}"
    ;;
  copy)
    run tar -czf "$TARBALL" -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./.jax_cache \
      --exclude=./workdirs --exclude=./demo_out --exclude=__pycache__ .
    run "${TPU[@]}" scp "$TARBALL" "$NAME:simclr_jax.tar.gz" "${WHERE[@]}" --worker=all
    on_workers all "mkdir -p $REMOTE_DIR && tar -xzf simclr_jax.tar.gz -C $REMOTE_DIR"
    ;;
  clone)
    [[ -n "$REPO_URL" ]] || die "clone needs --repo URL"
    on_workers all "rm -rf $REMOTE_DIR && git clone --depth=1 --branch=$(printf '%q' "$REF") \
$(printf '%q' "$REPO_URL") $REMOTE_DIR"
    ;;
  setup)
    on_workers all "cd $REMOTE_DIR && bash launch/bootstrap_host.sh --accelerator tpu"
    ;;
  run)
    [[ ${#STAGE_ARGS[@]} -gt 0 ]] || die "run needs the stage's flags after --, e.g. -- --config=... --workdir=gs://..."
    if [[ -n "$ACCELERATOR" ]]; then
      plan_or_refuse "$ACCELERATOR" "${STAGE_ARGS[@]}"
    elif [[ "$PLAN" == 1 ]]; then
      echo "Not planned: give the slice's --accelerator-type to plan it first (or --no-plan)" >&2
    fi
    env_words="SIMCLR_DISTRIBUTED=tpu"
    [[ -n "$CACHE_DIR" ]] && env_words+=" JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$CACHE_DIR")"
    # Detached (nohup), so a dropped ssh connection does not stop the job; the pid file is for `stop`.
    on_workers all "cd $REMOTE_DIR && mkdir -p ~/$LOG_DIR && $env_words nohup .venv/bin/python \
-m simclr_jax.$STAGE $(remote_words "${STAGE_ARGS[@]}") > ~/$LOG_DIR/$STAGE.log 2>&1 < /dev/null & \
echo \$! > ~/$LOG_DIR/$STAGE.pid"
    ;;
  evaluate)
    [[ ${#STAGE_ARGS[@]} -gt 0 ]] || die "evaluate needs the job's flags after --, e.g. -- --workdir=gs://..."
    # The chips belong to the training job: this process uses the host's CPU (JAX_PLATFORMS=cpu).
    on_workers "$WORKER" "cd $REMOTE_DIR && mkdir -p ~/$LOG_DIR && JAX_PLATFORMS=cpu nohup \
.venv/bin/python -m simclr_jax.evaluate $(remote_words "${STAGE_ARGS[@]}") > ~/$LOG_DIR/evaluate.log \
2>&1 < /dev/null & echo \$! > ~/$LOG_DIR/evaluate.pid"
    ;;
  logs)
    on_workers "$WORKER" "tail -n 200 -F ~/$LOG_DIR/$STAGE.log"
    ;;
  stop)
    on_workers all "kill \$(cat ~/$LOG_DIR/$STAGE.pid)"
    ;;
  ssh)
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$WORKER"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
