#!/usr/bin/env bash
# The GPU suite: one command, one GPU, under 10 minutes. It runs the throughput table of
# benchmarks/RESULTS.md (ours and the PyTorch peer), the planner's bound for the pretraining
# config, a short Fashion-MNIST ResNet-18 pretraining with its probe accuracy and its measured
# images/s against that bound, and appends dated rows to RESULTS.md. Each part has its own time limit;
# a part that fails or runs out of time does not stop the others. Works offline and without
# TensorFlow: the pretraining reads the four Fashion-MNIST .gz files from a folder.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_suite.sh [--dry-run] [--parts LIST] [--python PY] [--data_dir DIR]
                                    [--pretrain_epochs E] [--peak_tflops T] [--log_dir DIR]
                                    [--workdir DIR] [--results FILE] [--no-append]
                                    [--plan_target T] [--limit PART=SECONDS]... [--record ROWS.md]

Parts, in order, with their time limits in seconds:
  ours_r18_cifar  benchmarks/throughput.py --preset r18_cifar --data device,views  (70)
  peer_r18_cifar  benchmarks/peer_torch.py --preset r18_cifar --device cuda        (60)
  ours_r50        benchmarks/throughput.py --preset r50 --data device,views        (125)
  peer_r50        benchmarks/peer_torch.py --preset r50 --device cuda              (90)
  plan            python -m simclr_jax.plan of the pretraining's config for --plan_target:
                  memory, FLOPs and the roofline bound, compiled ahead of time         (40)
  pretrain        simclr_jax.pretrain, pretrain_fashion_mnist.py:resnet18 (ResNet-18 at full
                  width, CIFAR stem, warmup then cosine) for --pretrain_epochs, bf16;
                  its row puts the measured images/s beside the plan's bound           (135)
  plot            python -m simclr_jax.plot of the pretraining workdir                  (20)
Before them, checks of nvidia-smi (10), jax (25) and torch (25): 600 s in all. Time a part or
check leaves unused (or a skipped part's) extends the next parts' limits, so the whole suite
stays within the sum. The peer parts run only when torch and torchvision import and see a GPU.
A first run compiles everything; a rerun on the same machine reads the compilation cache
($JAX_COMPILATION_CACHE_DIR, default .jax_cache).

  --dry-run          print every command it would run, run nothing, exit 0
  --parts LIST       comma-separated from throughput, peer, pretrain (default: all three)
  --python PY        interpreter (default: $SIMCLR_PYTHON, else .venv/bin/python, else python3)
  --data_dir DIR     folder of the Fashion-MNIST .gz files (default: $FASHION_MNIST_DIR, else
                     /usr/share/datasets/fashion-mnist, else .gpu_data/fashion-mnist)
  --pretrain_epochs  epochs of the short pretraining (default 10 = 1170 steps of 512 images);
                     the warmup is 5% of them, as the preset's 10 of 200
  --peak_tflops T    dense bf16 peak per GPU for the MFU (default 989: H100 / H200)
  --plan_target T    the planner's target (default: h200x1 on an H200, else h100x1)
  --log_dir DIR      logs, curves PNG, rows.md and summary.txt (default: a new temporary folder)
  --workdir DIR      the pretraining workdir (default: a new temporary folder; an existing
                     workdir is resumed)
  --results FILE     the results file to append to (default benchmarks/RESULTS.md)
  --no-append        leave the results file alone (the rows are still in LOG_DIR/rows.md)
  --limit PART=S     another time limit for a part or check, e.g. --limit pretrain=240
  --record ROWS.md   only append the rows of a rows.md from an earlier run (another machine)

Offline machines without the Debian package: copy the files into the repository first (the
folder .gpu_data/ is git-ignored):
  mkdir -p .gpu_data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu_data/fashion-mnist/
Needs jax with CUDA, flax, optax, orbax-checkpoint, ml-collections (pip install -e .); torch and
torchvision for the peer. Exit status: 0 when every part that ran succeeded, else 1.
EOF
}

die() {
  echo "gpu_suite.sh: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
  printf '%s' "$2"
}

abspath() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s' "$PWD/$1" ;;
  esac
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASHION_MNIST_FILES=(
  train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
  t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
)
SECTION="## GPU suite runs (benchmarks/gpu_suite.sh)"
TABLE_HEADER="| date | device | commit | command | numbers | status |"
PART_NAMES=(ours_r18_cifar peer_r18_cifar ours_r50 peer_r50 plan pretrain plot check_gpu check_jax
  check_torch)
declare -A LIMIT=(
  [ours_r18_cifar]=70 [peer_r18_cifar]=60 [ours_r50]=125 [peer_r50]=90 [plan]=40 [pretrain]=135
  [plot]=20 [check_gpu]=10 [check_jax]=25 [check_torch]=25
)
KILL_AFTER=15  # a part gets SIGTERM at its limit (the trainer then saves and stops), SIGKILL later
PLANNED=0      # $SECONDS by which the checks and parts so far were allowed to end

DRY_RUN=0 APPEND=1 PARTS="throughput,peer,pretrain" PYTHON="" DATA_DIR="" EPOCHS=10
PEAK_TFLOPS=989 LOG_DIR="" WORKDIR="" RESULTS="" RECORD="" PLAN_TARGET=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --no-append) APPEND=0; shift ;;
    --parts) PARTS="$(need_value "$@")"; shift 2 ;;
    --python) PYTHON="$(need_value "$@")"; shift 2 ;;
    --data_dir) DATA_DIR="$(abspath "$(need_value "$@")")"; shift 2 ;;
    --pretrain_epochs) EPOCHS="$(need_value "$@")"; shift 2 ;;
    --peak_tflops) PEAK_TFLOPS="$(need_value "$@")"; shift 2 ;;
    --plan_target) PLAN_TARGET="$(need_value "$@")"; shift 2 ;;
    --log_dir) LOG_DIR="$(abspath "$(need_value "$@")")"; shift 2 ;;
    --workdir) WORKDIR="$(abspath "$(need_value "$@")")"; shift 2 ;;
    --results) RESULTS="$(abspath "$(need_value "$@")")"; shift 2 ;;
    --record) RECORD="$(abspath "$(need_value "$@")")"; shift 2 ;;
    --limit)
      value="$(need_value "$@")"
      [[ "$value" =~ ^([a-z0-9_]+)=([1-9][0-9]*)$ && " ${PART_NAMES[*]} " == *" ${BASH_REMATCH[1]} "* ]] ||
        die "--limit takes PART=SECONDS with PART one of ${PART_NAMES[*]} (got '$value')"
      LIMIT[${BASH_REMATCH[1]}]="${BASH_REMATCH[2]}"
      shift 2
      ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$EPOCHS" =~ ^([0-9]+)(\.[0-9]+)?$ && "$EPOCHS" != 0 ]] ||
  die "--pretrain_epochs must be a positive number, got '$EPOCHS'"
[[ "$PEAK_TFLOPS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--peak_tflops must be a number"
IFS=, read -r -a WANTED <<<"$PARTS"
for part in "${WANTED[@]}"; do
  [[ "$part" =~ ^(throughput|peer|pretrain)$ ]] ||
    die "--parts: unknown part '$part'; choose from throughput, peer, pretrain"
done
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

RESULTS="${RESULTS:-$REPO/benchmarks/RESULTS.md}"
if [[ -z "$PYTHON" ]]; then
  if [[ -n "${SIMCLR_PYTHON:-}" ]]; then
    PYTHON="$SIMCLR_PYTHON"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PYTHON="$REPO/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi
if [[ -z "$DATA_DIR" ]]; then
  for candidate in "${FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist \
    "$REPO/.gpu_data/fashion-mnist"; do
    if [[ -n "$candidate" && -f "$candidate/${FASHION_MNIST_FILES[0]}" ]]; then
      DATA_DIR="$candidate"
      break
    fi
  done
  DATA_DIR="${DATA_DIR:-$REPO/.gpu_data/fashion-mnist}"
fi
# The pretraining schedule: 60,000 images in batches of 512 (the preset's); the warmup is 5% of
# the run and the probe is evaluated four times, so a run cut by its limit still reports one.
STEPS=$(awk -v e="$EPOCHS" 'BEGIN { printf "%d", e * int(60000 / 512) }')
WARMUP_EPOCHS=$(awk -v e="$EPOCHS" 'BEGIN { printf "%g", e / 20 }')
EVAL_EVERY=$(awk -v s="$STEPS" 'BEGIN { n = int(s / 4); printf "%d", (n > 0 ? n : 1) }')

cd "$REPO"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$REPO/.jax_cache}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}" PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------
# Appending rows: under this script's own section of the results file, after its last row.

insert_rows() {  # insert_rows ROWS_FILE: the rows go after the last row of the section's table
  local rows="$1" tmp
  [[ -s "$rows" ]] || return 0
  if ! grep -qxF "$SECTION" "$RESULTS" 2>/dev/null; then
    {
      printf '\n%s\n\n' "$SECTION"
      printf '%s\n' "One row per part of each run: \`bash benchmarks/gpu_suite.sh\` on one GPU" \
        "(throughput.py and peer_torch.py with their presets, bf16; a short Fashion-MNIST" \
        "ResNet-18 pretraining, pretrain_fashion_mnist.py:resnet18 with the epochs in its command)." \
        "Numbers as the scripts print them; the status says when a part ran out of time."
      printf '\n%s\n%s\n' "$TABLE_HEADER" "|---|---|---|---|---|---|"
    } >>"$RESULTS"
  fi
  tmp="$RESULTS.tmp.$$"
  awk -v section="$SECTION" -v rows="$rows" '
    { line[NR] = $0 }
    $0 == section { start = NR }
    END {
      last = 0
      for (i = start + 1; i <= NR; i++) {
        if (line[i] ~ /^\|/) last = i
        else if (last || line[i] ~ /^#/) break
      }
      for (i = 1; i <= NR; i++) {
        print line[i]
        if (i == last) while ((getline row < rows) > 0) print row
      }
    }' "$RESULTS" >"$tmp"
  mv "$tmp" "$RESULTS"
}

if [[ -n "$RECORD" ]]; then
  [[ -f "$RECORD" ]] || die "--record: no file $RECORD"
  if ((DRY_RUN)); then
    echo "# would insert the rows of $RECORD under '$SECTION' in $RESULTS"
    exit 0
  fi
  insert_rows "$RECORD"
  echo "inserted $(grep -c '^|' "$RECORD") rows into $RESULTS"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Running a part: logged, time-limited, its status remembered; in a dry run only printed.

declare -A STATUS=() SECONDS_TAKEN=() COMMAND=() NUMBERS=()
ORDER=()

show() {  # the command as one line that a shell reads back as the same words
  local word line=""
  for word in "$@"; do
    if [[ ! "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    line+="$word "
  done
  printf '%s\n' "${line% }"
}

limit_of() {  # limit_of NAME: its own limit plus what the checks and parts before it left unused
  local slack=$((PLANNED - SECONDS))
  ((DRY_RUN == 0 && slack > 0)) || slack=0
  echo $((LIMIT[$1] + slack))
}

run_part() {  # run_part NAME LOG COMMAND...: its status is ok, timeout after Ns, or failed (exit N)
  local name="$1" log="$2" limit rc=0 start
  shift 2
  limit=$(limit_of "$name")
  PLANNED=$((PLANNED + LIMIT[$name]))
  ORDER+=("$name")
  COMMAND[$name]="$(show "$@")"
  if ((DRY_RUN)); then
    show timeout -k "$KILL_AFTER" "$limit" "$@"
    return 0
  fi
  echo "=== $name (limit ${limit} s): ${COMMAND[$name]}"
  start=$SECONDS
  { timeout -k "$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$log"; } || rc=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  case "$rc" in
    0) STATUS[$name]="ok" ;;
    124 | 137) STATUS[$name]="timeout after ${limit} s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s"
  record_row "$name"
}

record_row() {  # record_row NAME: its numbers, and its row in rows.md at once (a run cut short
  # from outside still leaves the rows of the parts that finished)
  local name="$1" command
  case "$name" in
    ours_*) NUMBERS[$name]=$(throughput_numbers "$LOG_DIR/$name.log") ;;
    peer_*) NUMBERS[$name]=$(peer_numbers "$LOG_DIR/$name.log" "$LOG_DIR/ours_${name#peer_}.log") ;;
    plan) NUMBERS[$name]=$(plan_numbers "$LOG_DIR/plan.json") ;;
    pretrain) NUMBERS[$name]=$(pretrain_numbers "$WORKDIR" "$LOG_DIR/plan.json") ;;
    plot) NUMBERS[$name]="$LOG_DIR/pretrain_curves.png"; return 0 ;;
  esac
  command="${COMMAND[$name]//$REPO\//}"
  command="${command//$PYTHON /python }"
  # shellcheck disable=SC2001  # (a pattern up to the next space: simpler with sed)
  command="$(sed 's/ --workdir=[^ ]*//' <<<"$command")"
  printf '| %s | %s | %s | %s | %s | %s (%s s) |\n' "$NOW" "$DEVICE$VERSIONS" "$COMMIT" \
    "\`$command\`" "${NUMBERS[$name]:--}" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]}" >>"$ROWS"
}

skip_part() {  # skip_part NAME REASON: its time goes to the next parts
  PLANNED=$((PLANNED + LIMIT[$1]))
  ORDER+=("$1")
  STATUS[$1]="skipped: $2"
  if ((DRY_RUN)); then echo "# $1 skipped: $2"; fi
}

check() {  # check NAME COMMAND...: stdout of a quick check (last line), or nothing if it fails
  local limit="${LIMIT[$1]}"
  shift
  if ((DRY_RUN)); then
    show timeout "$limit" "$@"
    return 0
  fi
  { timeout "$limit" "$@" 2>/dev/null || true; } | tail -n 1
}

field() {  # field NAME VARIANT FILE: the value of NAME on the key=value line of VARIANT
  { grep -h "variant=$2 " "$3" 2>/dev/null || true; } | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}

throughput_numbers() {  # throughput_numbers LOG: the table's numbers of both variants
  local log="$1" variant out="" share
  for variant in device views; do
    [[ -n "$(field images_per_s "$variant" "$log")" ]] || continue
    out+="$variant: $(field images_per_s "$variant" "$log") images/s, "
    out+="$(field median_step_ms "$variant" "$log") ms/step, "
    out+="$(field s_per_50k_images "$variant" "$log") s/50k images, "
    out+="$(field xla_gflop_per_step "$variant" "$log") GFLOP/step, MFU $(field mfu "$variant" "$log"); "
  done
  share=$({ grep -h '^augmentation_share=' "$log" 2>/dev/null || true; } | head -n 1 |
    sed 's/^augmentation_share=\([^ ]*\).*/\1/')
  [[ -z "$share" ]] || out+="aug. share $share; "
  printf '%s' "${out%; }"
}

peer_numbers() {  # peer_numbers PEER_LOG OURS_LOG: the peer's speed and ours(views) / peer
  local peer ours
  peer=$(field images_per_s torch_views "$1")
  [[ -n "$peer" ]] || return 0
  printf 'torch_views: %s images/s, %s ms/step' "$peer" "$(field median_step_ms torch_views "$1")"
  ours=$(field images_per_s views "$2")
  if [[ -n "$ours" ]]; then
    awk -v o="$ours" -v p="$peer" 'BEGIN { printf "; ours(views)/peer %.2f", o / p }'
  fi
}

plan_numbers() {  # plan_numbers PLAN_JSON: the facts and the bound, one line
  "$PYTHON" - "$1" <<'PY' 2>/dev/null || true
import json, sys

plan = json.load(open(sys.argv[1]))
memory = plan["memory_bytes"]
print(
    f"{plan['target']}: {memory['total'] / 2**30:.2f} of {memory['capacity'] / 2**30:.1f} GiB "
    f"({'fits' if plan['fits'] else 'DOES NOT FIT'}), {plan['flops_per_image'] / 1e9:.2f} GFLOP "
    f"per image (XLA), step >= {plan['step_time_bound_s'] * 1e3:.2f} ms, "
    f"<= {plan['images_per_s_bound']:,.0f} images/s (bound, {plan['limited_by']})"
)
PY
}

pretrain_numbers() {  # pretrain_numbers WORKDIR [PLAN_JSON]: newest values of metrics.jsonl,
  # with the measured images/s as a fraction of the plan's bound where there is one; one line
  "$PYTHON" - "$1" "${2:-}" <<'PY' 2>/dev/null || true
import json, pathlib, sys

newest = {}
path = pathlib.Path(sys.argv[1]) / "metrics.jsonl"
for line in path.read_text().splitlines() if path.exists() else []:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        continue
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float):
            newest[key] = (record.get("step"), value)
parts = []
if newest:
    parts.append(f"steps {max(step for step, _ in newest.values())}")
for key, what, form in [
    ("eval_probe_top1", "probe top-1 (test)", "{:.2%}"),
    ("probe_acc", "probe accuracy (train batches)", "{:.2%}"),
    ("contrastive_loss", "contrastive loss", "{:.4g}"),
    ("images_per_sec", "images/s", "{:,.0f}"),
]:
    if key in newest:
        step, value = newest[key]
        parts.append(f"{what} {form.format(value)} at step {step}")
plan = pathlib.Path(sys.argv[2]) if sys.argv[2:] and sys.argv[2] else None
if plan and plan.exists() and "images_per_sec" in newest:
    bound = json.loads(plan.read_text())["images_per_s_bound"]
    parts.append(f"{newest['images_per_sec'][1] / bound:.1%} of the plan's bound ({bound:,.0f})")
print(", ".join(parts))
PY
}

# ---------------------------------------------------------------------------------------------

# One GPU: the first visible one (throughput.py would otherwise use every GPU).
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
NVIDIA_SMI=(nvidia-smi --query-gpu=name "--format=csv,noheader" -i "${CUDA_VISIBLE_DEVICES%%,*}")
JAX_PROBE=("$PYTHON" -c "import flax, ml_collections, optax, orbax.checkpoint, jax; \
print(jax.default_backend(), jax.__version__, jax.devices()[0].device_kind)")
TORCH_PROBE=("$PYTHON" -c "import torch, torchvision; \
print('cuda' if torch.cuda.is_available() else 'no-gpu', torch.__version__)")

if ((DRY_RUN)); then
  LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/gpu_suite.XXXXXX}"
  WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/gpu_suite_workdir.XXXXXX/fashion_mnist_r18}"
  echo "# gpu_suite.sh --dry-run: python=$PYTHON data_dir=$DATA_DIR log_dir=$LOG_DIR"
  echo "# checks, then the parts (timeout -k $KILL_AFTER LIMIT ...):"
else
  if [[ -z "$LOG_DIR" ]]; then LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"; fi
  if [[ -z "$WORKDIR" ]]; then
    WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_workdir.XXXXXX")/fashion_mnist_r18"
  fi
  mkdir -p "$LOG_DIR"
  [[ ! -e "$RESULTS" || -w "$RESULTS" ]] || die "cannot write $RESULTS (use --no-append)"
  NOW="$(date -u '+%Y-%m-%d %H:%M UTC')"
  COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  ROWS="$LOG_DIR/rows.md"
  : >"$ROWS"
fi

# The environment, checked once (each check has a short limit and never stops the suite).
JAX_CHECK="" TORCH_CHECK="" JAX_BACKEND=none DEVICE="" VERSIONS=""
PLANNED=$((SECONDS + LIMIT[check_gpu] + LIMIT[check_jax] + LIMIT[check_torch]))
if ((DRY_RUN)); then
  check check_gpu "${NVIDIA_SMI[@]}"
  if wants throughput || wants pretrain; then check check_jax "${JAX_PROBE[@]}"; fi
  if wants peer; then check check_torch "${TORCH_PROBE[@]}"; fi
else
  DEVICE=$(check check_gpu "${NVIDIA_SMI[@]}")
  if wants throughput || wants pretrain; then JAX_CHECK=$(check check_jax "${JAX_PROBE[@]}"); fi
  if wants peer; then TORCH_CHECK=$(check check_torch "${TORCH_PROBE[@]}"); fi
  if [[ -n "$JAX_CHECK" ]]; then
    read -r JAX_BACKEND JAX_VERSION JAX_KIND <<<"$JAX_CHECK"
    [[ -n "$DEVICE" || "$JAX_BACKEND" != gpu ]] || DEVICE="$JAX_KIND"
    VERSIONS+="; jax $JAX_VERSION"
  fi
  if [[ "$TORCH_CHECK" == cuda* ]]; then VERSIONS+="; torch ${TORCH_CHECK#cuda }"; fi
  DEVICE="${DEVICE:-unknown device}"
  echo "device: $DEVICE; jax: ${JAX_CHECK:-not importable}; torch: ${TORCH_CHECK:-not importable}"
fi
if [[ -z "$PLAN_TARGET" ]]; then
  if [[ "$DEVICE" == *H200* ]]; then PLAN_TARGET=h200x1; else PLAN_TARGET=h100x1; fi
fi
jax_problem() {  # why the JAX parts cannot run, or nothing
  ((DRY_RUN)) && return 0
  if [[ -z "$JAX_CHECK" ]]; then
    echo "jax, flax, optax, orbax-checkpoint or ml-collections does not import with $PYTHON"
  elif [[ "$JAX_BACKEND" != gpu ]]; then
    echo "jax sees no GPU (backend $JAX_BACKEND): install jax with CUDA"
  fi
}
torch_problem() {
  ((DRY_RUN)) && return 0
  if [[ -z "$TORCH_CHECK" ]]; then
    echo "torch or torchvision does not import"
  elif [[ "$TORCH_CHECK" != cuda* ]]; then
    echo "torch sees no GPU"
  fi
}

# 1. The throughput table: ours and the peer per preset, the peer right after ours.
for preset in r18_cifar r50; do
  if wants throughput; then
    problem=$(jax_problem)
    if [[ -n "$problem" ]]; then
      skip_part "ours_$preset" "$problem"
    else
      run_part "ours_$preset" "$LOG_DIR/ours_$preset.log" \
        "$PYTHON" benchmarks/throughput.py --preset "$preset" --data device,views \
        --peak_tflops "$PEAK_TFLOPS"
    fi
  fi
  if wants peer; then
    problem=$(torch_problem)
    if [[ -n "$problem" ]]; then
      skip_part "peer_$preset" "$problem"
    else
      run_part "peer_$preset" "$LOG_DIR/peer_$preset.log" \
        "$PYTHON" benchmarks/peer_torch.py --preset "$preset" --device cuda
    fi
  fi
done

# 2. A short Fashion-MNIST pretraining on the GPU preset, then its curves.
if wants pretrain; then
  problem=$(jax_problem)
  missing=()
  for file in "${FASHION_MNIST_FILES[@]}"; do
    [[ -f "$DATA_DIR/$file" ]] || missing+=("$file")
  done
  if [[ -z "$problem" && ${#missing[@]} -gt 0 ]]; then
    problem="Fashion-MNIST files missing in $DATA_DIR (${missing[*]}); copy them there or pass"
    problem+=" --data_dir (see --help)"
  fi
  if [[ -n "$problem" ]]; then
    skip_part plan "$problem"
    skip_part pretrain "$problem"
  else
    PRETRAIN_CONFIG=(
      --config=configs/pretrain_fashion_mnist.py:resnet18
      --config.dataset.source=local --config.dataset.data_dir="$DATA_DIR"
      --config.num_epochs="$EPOCHS" --config.optim.warmup_epochs="$WARMUP_EPOCHS"
      --config.dtype=bfloat16 --config.evals.probe.every_steps="$EVAL_EVERY"
      --config.evals.knn.every_steps="$EVAL_EVERY"
    )
    # The same config planned for this GPU (no host decode rate: the data lives on the device).
    run_part plan "$LOG_DIR/plan.log" \
      "$PYTHON" -m simclr_jax.plan "${PRETRAIN_CONFIG[@]}" --target="$PLAN_TARGET" \
      --host_rate=0 --out="$LOG_DIR/plan.json"
    run_part pretrain "$LOG_DIR/pretrain.log" \
      "$PYTHON" -m simclr_jax.pretrain "${PRETRAIN_CONFIG[@]}" --workdir="$WORKDIR"
    # A run stopped by its limit checkpoints and keeps its metrics: plot whatever it logged.
    if ((DRY_RUN)) || [[ -f "$WORKDIR/metrics.jsonl" ]]; then
      run_part plot /dev/null \
        "$PYTHON" -m simclr_jax.plot --workdir="$WORKDIR" --out="$LOG_DIR/pretrain_curves.png"
    fi
  fi
fi

if ((DRY_RUN)); then
  exit 0
fi

# 3. The rows (already in rows.md, part by part) into the results file; then the summary.
if ((APPEND)); then
  insert_rows "$ROWS"
fi

failed=0 appended=""
for name in "${ORDER[@]}"; do
  [[ "${STATUS[$name]}" == ok || "${STATUS[$name]}" == skipped* ]] || failed=1
done
if ((APPEND)); then appended=" (appended to $RESULTS)"; fi
{
  echo "gpu_suite.sh on $DEVICE$VERSIONS, $NOW, commit $COMMIT"
  for name in "${ORDER[@]}"; do
    taken="${SECONDS_TAKEN[$name]:-}"
    printf '%-15s %-40s %s\n' "$name" "${STATUS[$name]}${taken:+ (${taken} s)}" \
      "${NUMBERS[$name]:-}"
  done
  echo "logs: $LOG_DIR; rows: $ROWS$appended"
} | tee "$LOG_DIR/summary.txt"
exit "$failed"
