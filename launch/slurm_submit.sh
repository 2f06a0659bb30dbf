#!/usr/bin/env bash
# Submit a multi-node GPU job to SLURM: sbatch launch/slurm_job.sh with the node, task and GPU
# counts that match the chosen layout (a task per GPU, or a task per node).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/slurm_submit.sh --nodes N [--gpus-per-node G] [--per gpu|node] [--stage STAGE]
                              [--partition P] [--account A] [--time HH:MM:SS] [--port PORT]
                              [--plan-gpu GPU [--plan-capacity-gib N] | --no-plan]
                              [--dry-run] -- STAGE_ARGS...

  --nodes          nodes to allocate (required)
  --gpus-per-node  GPUs on each node (default 8)
  --per            gpu (default): one process per GPU; node: one process per node for all its GPUs
  --stage          pretrain (default), finetune or distill
  --partition, --account, --time   passed to sbatch (default time 24:00:00)
  --port           coordinator port (default: jax derives one from the job id)
  --plan-gpu       the nodes' GPU (h100, h200, a100-80gb, a100-40gb): plan the stage for
                   NODESxGPUxGPUS_PER_NODE first (python -m simclr_jax.plan) and refuse a config
                   that does not fit; without it the job is not planned
  --plan-capacity-gib N   plan against N GiB per GPU instead of JAX's default share of its memory
  --no-plan        submit without planning
  --dry-run        print the sbatch command instead of submitting (the plan still runs)

Example (4 nodes x 8 GPUs = 32 processes, ImageNet data and workdir on a shared filesystem):
  launch/slurm_submit.sh --nodes 4 --partition gpu -- \
      --config=configs/pretrain_imagenet.py:r50_1x_sk0 --workdir=/shared/runs/r50 \
      --config.dataset.data_dir=/shared/tensorflow_datasets
EOF
}

NODES="" GPUS_PER_NODE=8 PER="gpu" STAGE="pretrain" PARTITION="" ACCOUNT="" TIME="24:00:00"
PORT="" PLAN_GPU="" STAGE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$(need_value "$@")"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="$(need_value "$@")"; shift 2 ;;
    --per) PER="$(need_value "$@")"; shift 2 ;;
    --stage) STAGE="$(need_value "$@")"; shift 2 ;;
    --partition) PARTITION="$(need_value "$@")"; shift 2 ;;
    --account) ACCOUNT="$(need_value "$@")"; shift 2 ;;
    --time) TIME="$(need_value "$@")"; shift 2 ;;
    --port) PORT="$(need_value "$@")"; shift 2 ;;
    --plan-gpu) PLAN_GPU="$(need_value "$@")"; shift 2 ;;
    --plan-capacity-gib) PLAN_CAPACITY="$(need_value "$@")"; shift 2 ;;
    --no-plan) PLAN=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; STAGE_ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got '$NODES')"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
[[ "$PER" == gpu || "$PER" == node ]] || die "--per must be gpu or node (got '$PER')"
check_stage "$STAGE"
[[ ${#STAGE_ARGS[@]} -gt 0 ]] || die "give the stage's flags after --, e.g. -- --config=... --workdir=..."

if [[ -n "$PLAN_GPU" ]]; then
  plan_or_refuse "${NODES}x${PLAN_GPU}x${GPUS_PER_NODE}" "${STAGE_ARGS[@]}"
elif [[ "$PLAN" == 1 ]]; then
  echo "Not planned: give --plan-gpu (h100, a100-80gb, ...) to check memory first (or --no-plan)" >&2
fi

tasks_per_node=1
[[ "$PER" == gpu ]] && tasks_per_node="$GPUS_PER_NODE"
sbatch_args=(
  "--nodes=$NODES"
  "--ntasks-per-node=$tasks_per_node"
  "--gpus-per-node=$GPUS_PER_NODE"
  "--time=$TIME"
  "--job-name=simclr-$STAGE"
  "--export=ALL,SIMCLR_LAUNCH_DIR=$REPO/launch"
)
[[ -n "$PARTITION" ]] && sbatch_args+=("--partition=$PARTITION")
[[ -n "$ACCOUNT" ]] && sbatch_args+=("--account=$ACCOUNT")
job_args=(--stage "$STAGE" --per "$PER")
[[ -n "$PORT" ]] && job_args+=(--port "$PORT")
run sbatch "${sbatch_args[@]}" "$REPO/launch/slurm_job.sh" "${job_args[@]}" -- "${STAGE_ARGS[@]}"
