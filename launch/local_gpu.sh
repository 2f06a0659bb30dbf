#!/usr/bin/env bash
# One machine, one or more GPUs. By default a single process drives every visible GPU (JAX splits
# each batch over them). --processes N starts N processes instead, one GPU each, joined through a
# coordinator on localhost: the layout of a multi-node job, to try it out on one box.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/local_gpu.sh [--stage STAGE] [--gpus LIST] [--processes N] [--port PORT]
                           [--plan-target TARGET [--plan-capacity-gib N] | --no-plan] [--dry-run]
                           -- STAGE_ARGS...

  --stage       pretrain (default), finetune or distill
  --gpus        GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
  --processes   start N processes, one per GPU (default 1: one process for all GPUs)
  --port        coordinator port on localhost for --processes > 1 (default 12355)
  --plan-target this machine as a planner target, e.g. h100x8 or a100-80gbx4: plan the stage
                for it first (python -m simclr_jax.plan) and refuse a config that does not fit;
                without it the run is not planned
  --plan-capacity-gib N   plan against N GiB per GPU instead of JAX's default share of its memory
  --no-plan     run without planning
  --dry-run     print the commands instead of running them (the plan still runs)

Examples:
  launch/local_gpu.sh -- --config=configs/pretrain_cifar10.py --workdir=/tmp/c10
  launch/local_gpu.sh --gpus 0,1 --processes 2 -- --config=configs/pretrain_cifar10.py --workdir=/tmp/c10

The interpreter is $SIMCLR_PYTHON, else <checkout>/.venv/bin/python (launch/bootstrap_host.sh).
EOF
}

STAGE="pretrain" GPUS="" PROCESSES=1 PORT=12355 PLAN_TARGET="" STAGE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) STAGE="$(need_value "$@")"; shift 2 ;;
    --gpus) GPUS="$(need_value "$@")"; shift 2 ;;
    --processes) PROCESSES="$(need_value "$@")"; shift 2 ;;
    --port) PORT="$(need_value "$@")"; shift 2 ;;
    --plan-target) PLAN_TARGET="$(need_value "$@")"; shift 2 ;;
    --plan-capacity-gib) PLAN_CAPACITY="$(need_value "$@")"; shift 2 ;;
    --no-plan) PLAN=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; STAGE_ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done
check_stage "$STAGE"
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$PROCESSES'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,2 (got '$GPUS')"
[[ ${#STAGE_ARGS[@]} -gt 0 ]] || die "give the stage's flags after --, e.g. -- --config=... --workdir=..."

if [[ -n "$PLAN_TARGET" ]]; then
  plan_or_refuse "$PLAN_TARGET" "${STAGE_ARGS[@]}"
elif [[ "$PLAN" == 1 ]]; then
  echo "Not planned: give --plan-target (e.g. h100x8) to check memory first (or --no-plan)" >&2
fi

PYTHON="${SIMCLR_PYTHON:-$REPO/.venv/bin/python}"
COMMAND=("$PYTHON" -m "simclr_jax.$STAGE" "${STAGE_ARGS[@]}")

if [[ "$PROCESSES" == 1 ]]; then
  if [[ -n "$GPUS" ]]; then
    run env "CUDA_VISIBLE_DEVICES=$GPUS" "${COMMAND[@]}"
  else
    run "${COMMAND[@]}"
  fi
  exit 0
fi

# One GPU per process: the given list, or GPUs 0..N-1.
if [[ -n "$GPUS" ]]; then
  IFS=, read -r -a GPU_LIST <<<"$GPUS"
else
  GPU_LIST=()
  for ((i = 0; i < PROCESSES; i++)); do GPU_LIST+=("$i"); done
fi
[[ ${#GPU_LIST[@]} -eq "$PROCESSES" ]] ||
  die "--processes $PROCESSES needs as many GPUs in --gpus (got ${#GPU_LIST[@]})"

PIDS=()
stop_all() {  # end the processes this script started (a failed one would leave the others waiting)
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
for ((i = 0; i < PROCESSES; i++)); do
  job_env=(
    "CUDA_VISIBLE_DEVICES=${GPU_LIST[$i]}"
    "SIMCLR_COORDINATOR_ADDRESS=localhost:$PORT"
    "SIMCLR_NUM_PROCESSES=$PROCESSES"
    "SIMCLR_PROCESS_ID=$i"
  )
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$(quote_command env "${job_env[@]}" "${COMMAND[@]}") &"
  else
    env "${job_env[@]}" "${COMMAND[@]}" &
    PIDS+=("$!")
  fi
done
[[ "$DRY_RUN" == 1 ]] && { echo "wait"; exit 0; }
trap stop_all INT TERM
status=0
for ((left = ${#PIDS[@]}; left > 0; left--)); do
  if ! wait -n; then  # the first failure ends the rest instead of leaving them in a collective
    status=1
    stop_all
  fi
done
exit "$status"
