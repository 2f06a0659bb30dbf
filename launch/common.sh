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
