#!/usr/bin/env python3
"""PyTorch CPU baseline for benches/train_step.rs: the same pieces of
training, one JSON line per run (median over --steps timed steps after
--warmup untimed ones).

    python benches/train_step_torch.py generator --size 128 --ngf 64 --blocks 9 --batch 1 --threads 2
    python benches/train_step_torch.py efficientnet --variant b0 --size 224 --batch 8 --threads 2
    python benches/train_step_torch.py depthwise --channels 96 --size 112 --k 3 --stride 2 --batch 8 --threads 2

generator: the ResNet generator of cyclegan_step_torch.py (imported from it),
    forward ms and backward ms (L1 loss to a fixed target + backward), no
    optimizer. Weights N(0, 0.02) like the candle side (speed does not depend
    on them, but denormals could).
efficientnet: torchvision efficientnet_b0(num_classes=1), train mode,
    forward + BCEWithLogits (all-zero targets) + backward + Adam(1e-3).
depthwise: F.conv2d(groups=C, no bias), input and weight needing gradients;
    forward ms and backward ms (loss = sum(y * g), g fixed and random).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cyclegan_step_torch import ResnetGenerator  # noqa: E402


def ms_since(t0):
    return (time.perf_counter() - t0) * 1000.0


def timed(n_warmup, n_steps, step):
    """Runs step() warmup + steps times; step returns a tuple of ms values.
    Returns the median of each over the timed steps."""
    for _ in range(n_warmup):
        step()
    runs = [step() for _ in range(n_steps)]
    return [round(statistics.median(col), 1) for col in zip(*runs)]


def generator(a, out):
    g = ResnetGenerator(ngf=a.ngf, n_blocks=a.blocks)
    for p in g.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    g.train()
    shape = (a.batch, 3, a.size, a.size)
    x = torch.rand(shape) * 2 - 1
    target = torch.rand(shape) * 2 - 1

    def step():
        g.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        y = g(x)
        f = ms_since(t0)
        t0 = time.perf_counter()
        F.l1_loss(y, target).backward()
        return f, ms_since(t0)

    out["fwd_ms"], out["bwd_ms"] = timed(a.warmup, a.steps, step)
    out.update(size=a.size, ngf=a.ngf, blocks=a.blocks, batch=a.batch)


def efficientnet(a, out):
    import torchvision

    if a.variant != "b0":
        sys.exit(f"only --variant b0 here, not {a.variant}")
    model = torchvision.models.efficientnet_b0(num_classes=1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    x = torch.randn(a.batch, 3, a.size, a.size)
    target = torch.zeros(a.batch)
    bce = torch.nn.BCEWithLogitsLoss()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = bce(model(x).flatten(), target)
        loss.backward()
        opt.step()
        return (ms_since(t0),)

    (out["ms_per_step"],) = timed(a.warmup, a.steps, step)
    out.update(variant=a.variant, size=a.size, batch=a.batch, torchvision=torchvision.__version__)


def depthwise(a, out):
    c, pad = a.channels, a.k // 2
    x = torch.randn(a.batch, c, a.size, a.size, requires_grad=True)
    w = (torch.randn(c, 1, a.k, a.k) / a.k).requires_grad_(True)
    with torch.no_grad():
        g = torch.randn_like(F.conv2d(x, w, stride=a.stride, padding=pad, groups=c))

    def step():
        x.grad = w.grad = None
        t0 = time.perf_counter()
        y = F.conv2d(x, w, stride=a.stride, padding=pad, groups=c)
        f = ms_since(t0)
        t0 = time.perf_counter()
        (y * g).sum().backward()
        return f, ms_since(t0)

    out["fwd_ms"], out["bwd_ms"] = timed(a.warmup, a.steps, step)
    out.update(channels=c, size=a.size, k=a.k, stride=a.stride, batch=a.batch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", choices=["generator", "efficientnet", "depthwise"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--variant", default="b0")
    ap.add_argument("--channels", type=int, default=96)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    # Per-work defaults, the same as train_step.rs.
    size, batch = {"generator": (128, 1), "efficientnet": (224, 8), "depthwise": (112, 8)}[a.work]
    a.size = size if a.size is None else a.size
    a.batch = batch if a.batch is None else a.batch
    a.steps = max(1, a.steps)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = {"framework": "pytorch", "work": a.work, "threads": torch.get_num_threads(),
           "steps": a.steps, "torch": torch.__version__}
    {"generator": generator, "efficientnet": efficientnet, "depthwise": depthwise}[a.work](a, out)
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
