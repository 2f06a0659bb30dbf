#!/usr/bin/env bash
# Ours against the PyTorch peer on the same GPU in the same session (A-B-A), and the ratios.
#
#   bash benchmarks/compare_gpu.sh            # r50: ResNet-50, 224 px, 256 images, bf16
#   bash benchmarks/compare_gpu.sh r18_cifar  # ResNet-18, 32 px, 512 images, bf16
#
# Needs jax with CUDA, and torch + torchvision for the peer (pip install torch torchvision).
# Ours runs before and after the peer, so a drifting clock or a warming GPU shows up.
# Logs go to $LOG_DIR (default: a new temporary directory).
set -euo pipefail

preset="${1:-r50}"
python="${PYTHON:-python}"
log_dir="${LOG_DIR:-$(mktemp -d)}"
cd "$(dirname "$0")/.."

# field NAME VARIANT FILE: the value of NAME on the line of VARIANT.
field() {
  grep "variant=$2 " "$3" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
"$python" benchmarks/throughput.py --preset "$preset" --data views,device \
  | tee "$log_dir/ours_before.txt"
"$python" benchmarks/peer_torch.py --preset "$preset" --device cuda | tee "$log_dir/peer.txt"
"$python" benchmarks/throughput.py --preset "$preset" --data views,device \
  | tee "$log_dir/ours_after.txt"

peer=$(field images_per_s torch_views "$log_dir/peer.txt")
summary() {  # summary VARIANT
  local before after
  before=$(field images_per_s "$1" "$log_dir/ours_before.txt")
  after=$(field images_per_s "$1" "$log_dir/ours_after.txt")
  awk -v v="$1" -v b="$before" -v a="$after" -v p="$peer" 'BEGIN {
    m = (b + a) / 2
    printf "ours(%s) images/s: %.0f (before %.0f, after %.0f); peer: %.0f; ratio ours/peer: %.2f\n",
      v, m, b, a, p, m / p
  }'
}
echo "preset=$preset logs=$log_dir"
summary views   # model + loss + LARS on ready-made views on both sides: the fair ratio
summary device  # ours with on-device augmentation (the peer has none)
case "$preset" in
  r50) echo "goals: ours(device) >= 3500 images/s on one H100; ours/peer >= 1.2" ;;
  r18_cifar) echo "goal: s_per_50k_images <= 2 for ours(device)" ;;
esac
grep -h "augmentation_share" "$log_dir/ours_before.txt" "$log_dir/ours_after.txt"
