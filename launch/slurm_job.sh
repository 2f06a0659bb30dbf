#!/usr/bin/env bash
#SBATCH --job-name=simclr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=simclr-%j.out
# The batch script of a multi-node GPU job (submit it with launch/slurm_submit.sh, or sbatch it
# directly; the #SBATCH lines above are defaults that sbatch options override). It runs srun once:
# every task runs the same stage, and jax's SLURM detection (SLURM_PROCID, SLURM_NTASKS, the first
# host of SLURM_STEP_NODELIST) joins them. --per gpu: a task per GPU (SLURM_LOCALID picks it);
# --per node: a task per node driving all its GPUs.
set -euo pipefail
# sbatch runs a copy of this file from its spool directory; slurm_submit.sh says where we live.
LAUNCH_DIR="${SIMCLR_LAUNCH_DIR:-$(dirname "${BASH_SOURCE[0]}")}"
[[ -f "$LAUNCH_DIR/common.sh" ]] || LAUNCH_DIR="${SLURM_SUBMIT_DIR:-.}/launch"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
usage: sbatch [SBATCH_OPTIONS] launch/slurm_job.sh [--stage STAGE] [--per gpu|node]
              [--port PORT] [--dry-run] -- STAGE_ARGS...

  --stage     pretrain (default), finetune or distill
  --per       gpu (default): one task per GPU; node: one task per node driving all its GPUs
              (submit with --ntasks-per-node matching: 8 for gpu on 8-GPU nodes, 1 for node)
  --port      coordinator port on the first node (default: jax derives one from the job id)
  --dry-run   print the srun command instead of running it (works outside an allocation too)
EOF
}

STAGE="pretrain" PER="gpu" PORT="" STAGE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) STAGE="$(need_value "$@")"; shift 2 ;;
    --per) PER="$(need_value "$@")"; shift 2 ;;
    --port) PORT="$(need_value "$@")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; STAGE_ARGS=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done
check_stage "$STAGE"
[[ "$PER" == gpu || "$PER" == node ]] || die "--per must be gpu or node (got '$PER')"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ ${#STAGE_ARGS[@]} -gt 0 ]] || die "give the stage's flags after --, e.g. -- --config=... --workdir=..."
if [[ "$DRY_RUN" != 1 && -z "${SLURM_JOB_ID:-}" ]]; then
  die "not inside a SLURM allocation: submit with launch/slurm_submit.sh (or use --dry-run)"
fi

GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
job_env=("SIMCLR_DISTRIBUTED=slurm")
[[ -n "$PORT" ]] && job_env+=("JAX_COORDINATOR_PORT=$PORT")
if [[ "$PER" == gpu ]]; then
  tasks_per_node="$GPUS_PER_NODE"
else
  # jax gives a SLURM task one GPU (its SLURM_LOCALID) unless told otherwise: all of them here.
  tasks_per_node=1
  ids="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  job_env+=("JAX_LOCAL_DEVICE_IDS=$ids")
fi

PYTHON="${SIMCLR_PYTHON:-$REPO/.venv/bin/python}"
# --kill-on-bad-exit: one failed task ends the step instead of leaving the others in a collective.
run srun "--ntasks-per-node=$tasks_per_node" --kill-on-bad-exit=1 \
  env "${job_env[@]}" "$PYTHON" -m "simclr_jax.$STAGE" "${STAGE_ARGS[@]}"
