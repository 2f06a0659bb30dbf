"""The peer: the same SimCLR pretraining step in PyTorch, as a user would write it today.

    python benchmarks/peer_torch.py --preset r50 --device cuda       # one GPU, bf16, torch.compile
    python benchmarks/peer_torch.py --preset tiny --device cpu       # smoke run

torchvision ResNet (zero-initialised last BN gamma of each block; CIFAR stem at <= 32 px), a
projection head of Linear(no bias) + BN layers, an online linear probe on detached features, the
same NT-Xent (both directions, self-similarity masked, mean over images) and LARS (trust
coefficient 1e-3, momentum 0.9, no weight decay or trust ratio for biases and BN; the probe decayed
without trust ratio). Channels-last memory format, bf16 autocast, torch.compile of the model and of
the optimizer step. Input: two ready-made views on the device, so it compares with
`throughput.py --data views` (model + loss + optimizer); `--data device` adds our on-device
augmentation, which this peer does not do (PyTorch users usually augment on CPU workers).

Prints `key=value` lines like throughput.py. Run both on the same GPU in the same session
(compare_gpu.sh) so that the ratio is fair. torch and torchvision are not dependencies of
simclr_jax; install them (matching the CUDA of the machine) to run this file.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

NUM_CLASSES = 10
LARGE_NUM = 1e9

# Same models and batches as throughput.py's presets (tiny uses torchvision's full-width ResNet-18:
# torchvision has no base-width knob for basic blocks; it is a smoke run, not a comparison).
PRESETS = {
    "tiny": dict(depth=18, image_size=32, batch=32, dtype="float32", proj_out_dim=16,
                 num_proj_layers=2, warmup=2, steps=5),
    "r18_cifar": dict(depth=18, image_size=32, batch=512, dtype="bfloat16", proj_out_dim=128,
                      num_proj_layers=2, warmup=10, steps=30),
    "r50": dict(depth=50, image_size=224, batch=256, dtype="bfloat16", proj_out_dim=128,
                num_proj_layers=2, warmup=10, steps=30),
}  # fmt: skip


class SimCLRNet(nn.Module):
    """ResNet trunk -> projection head; linear probe on the detached pooled features."""

    def __init__(self, depth: int, image_size: int, proj_out_dim: int, num_proj_layers: int):
        super().__init__()
        resnet = getattr(torchvision.models, f"resnet{depth}")(zero_init_residual=True)
        if image_size <= 32:  # CIFAR stem: 3x3 stride 1, no max-pool
            resnet.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        dim = resnet.fc.in_features
        resnet.fc = nn.Identity()
        self.backbone = resnet
        layers: list[nn.Module] = []
        for j in range(num_proj_layers):
            last = j == num_proj_layers - 1
            width = proj_out_dim if last else dim
            layers += [nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(dim, NUM_CLASSES)

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        return self.head(features), self.classifier(features.detach())


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view against the 2N - 1 others, both directions, mean over images."""
    z_a = F.normalize(z_a.float(), dim=1)
    z_b = F.normalize(z_b.float(), dim=1)
    n = z_a.shape[0]
    labels = torch.arange(n, device=z_a.device)
    mask = torch.eye(n, device=z_a.device) * LARGE_NUM
    logits_ab = z_a @ z_b.T / temperature
    logits_ba = z_b @ z_a.T / temperature
    logits_aa = z_a @ z_a.T / temperature - mask
    logits_bb = z_b @ z_b.T / temperature - mask
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return loss_a + loss_b


class LARS(torch.optim.Optimizer):
    """LARS as the reference SimCLR: the learning rate inside the momentum buffer.

    Groups carry `weight_decay` and `trust` (whether the trust ratio applies).
    """

    def __init__(self, groups, lr: float, momentum: float = 0.9, eta: float = 1e-3):
        super().__init__(groups, dict(lr=lr, momentum=momentum, eta=eta, weight_decay=0.0))
        for group in self.param_groups:  # buffers up front: no state created inside compiled code
            for p in group["params"]:
                self.state[p]["momentum"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"])
                if group["trust"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0
                    )
                    g = g * ratio
                buf = self.state[p]["momentum"]
                buf.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                p.sub_(buf)


def lars_groups(model: SimCLRNet, weight_decay: float):
    """Biases and BN parameters: no decay, no trust ratio; probe: decay, no trust ratio."""
    adapted, probe, plain = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            (probe if p.ndim > 1 else plain).append(p)
        elif p.ndim > 1:
            adapted.append(p)
        else:  # biases and BatchNorm scale/offset are 1-D
            plain.append(p)
    return [
        dict(params=adapted, weight_decay=weight_decay, trust=True),
        dict(params=probe, weight_decay=weight_decay, trust=False),
        dict(params=plain, weight_decay=0.0, trust=False),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name in (
        "depth",
        "image_size",
        "batch",
        "proj_out_dim",
        "num_proj_layers",
        "warmup",
        "steps",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_compile", action="store_true", help="eager PyTorch")
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model = SimCLRNet(args.depth, args.image_size, args.proj_out_dim, args.num_proj_layers)
    model = model.to(device, memory_format=torch.channels_last)
    lr = 0.3 * args.batch / 256  # the reference's linear scaling (value does not affect speed)
    optimizer = LARS(lars_groups(model, weight_decay=1e-6), lr=lr)
    forward = model if args.no_compile else torch.compile(model)
    optimizer_step = optimizer.step if args.no_compile else torch.compile(lambda: optimizer.step())
    use_bf16 = args.dtype == "bfloat16"

    shape = (args.batch, 3, args.image_size, args.image_size)
    view_a = torch.rand(shape, device=device).contiguous(memory_format=torch.channels_last)
    view_b = torch.rand(shape, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)

    def train_step() -> torch.Tensor:
        images = torch.cat([view_a, view_b])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            projection, logits = forward(images)
        z_a, z_b = projection.chunk(2)
        loss = nt_xent(z_a, z_b, args.temperature)
        loss = loss + F.cross_entropy(logits.float(), torch.cat([labels, labels]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step()
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = train_step()
    synchronize()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = train_step()
        synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"platform={device.type} device_kind={kind!r} torch={torch.__version__} "
        f"torchvision={torchvision.__version__} cpus={os.cpu_count()} "
        f"compiled={not args.no_compile}"
    )
    print(
        f"preset={args.preset} depth={args.depth} image_size={args.image_size} "
        f"batch={args.batch} dtype={args.dtype} warmup={args.warmup} steps={args.steps}"
    )
    print(
        f"variant=torch_views median_step_ms={1e3 * median:.4g} min_step_ms={1e3 * min(times):.4g} "
        f"images_per_s={args.batch / median:.4g} s_per_50k_images={50_000 * median / args.batch:.4g} "
        f"warmup_s={warmup_s:.4g} loss={float(loss):.4g} timed_steps={len(times)}"
    )


if __name__ == "__main__":
    main()
