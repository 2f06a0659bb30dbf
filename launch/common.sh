# shellcheck shell=bash
# Helpers the launch scripts share (sourced, not run): one place decides whether a command runs or,
# under --dry-run, is only printed, so the printed commands are exactly the ones that would run.

# shellcheck disable=SC2034  # used by the scripts that source this file
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGES=(pretrain finetune distill evaluate)  # evaluate: the job that evaluates a workdir's checkpoints
DRY_RUN=0

die() {
  echo "error: $*" >&2
  echo "run with --help for usage" >&2
  exit 2
}

# Print arguments as one shell command line, quoting only the words that need it.
quote_command() {
  local word out=()
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Run a command, or print it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_command "$@"
  else
    "$@"
  fi
}

# The value of an option that takes one: fails when it is missing.
need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

check_stage() {
  local stage
  for stage in "${STAGES[@]}"; do
    [[ "$1" == "$stage" ]] && return 0
  done
  die "--stage must be one of: ${STAGES[*]} (got '$1')"
}

# A shell-quoted command line for a remote bash (each word quoted with printf %q).
remote_words() {
  local word out=()
  for word in "$@"; do
    out+=("$(printf '%q' "$word")")
  done
  printf '%s' "${out[*]}"
}

PLAN=1            # --no-plan turns the plan before a launch off
PLAN_CAPACITY=""  # --plan-capacity-gib: plan against less memory than the device has (headroom)

# plan_or_refuse TARGET STAGE_ARGS...: compile the stage's step for TARGET here, ahead of time
# (python -m simclr_jax.plan: memory per device, FLOPs, bounds), print the plan on stderr, and stop
# the launch when the program does not fit. Only --config flags go to the planner.
plan_or_refuse() {
  local target="$1" arg python plan_json
  shift
  [[ "$PLAN" == 1 ]] || return 0
  local config_args=()
  for arg in "$@"; do
    case "$arg" in --config=* | --config.*) config_args+=("$arg") ;; esac
  done
  [[ ${#config_args[@]} -gt 0 ]] || return 0  # no config to plan (the evaluation job)
  python="${SIMCLR_PYTHON:-$REPO/.venv/bin/python}"
  [[ -x "$python" ]] || die "planning needs $python (launch/bootstrap_host.sh, or set SIMCLR_PYTHON); --no-plan skips the plan"
  plan_json="$(mktemp)"
  local extra=()
  [[ -n "$PLAN_CAPACITY" ]] && extra+=("--capacity_gib=$PLAN_CAPACITY")
  echo "Planning for $target before launching (python -m simclr_jax.plan; --no-plan skips it):" >&2
  (cd "$REPO" && "$python" -m simclr_jax.plan --target="$target" --host_rate=0 \
    --out="$plan_json" "${extra[@]}" "${config_args[@]}") >&2 ||
    die "planning for $target failed (above); fix the config or pass --no-plan"
  if ! "$python" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["fits"] else 1)' \
    "$plan_json"; then
    rm -f "$plan_json"
    echo "error: the config does not fit $target (the plan above): lower --config.batch_size, use a larger slice, or pass --no-plan to launch anyway" >&2
    exit 3
  fi
  rm -f "$plan_json"
}
