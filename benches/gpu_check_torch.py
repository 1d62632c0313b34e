#!/usr/bin/env python3
"""The PyTorch half of the GPU check (scripts/gpu-check.sh): the same training
steps as `melanoflow gpu-check bench`, on the same GPU, with the machine's own
torch (no pip, no network; only torch and torchvision are imported).

    python gpu_check_torch.py bench --weights-dir DIR --json torch.json \
        [--device cuda] [--models cyclegan,b0,lite0] [--precisions f32,tf32,bf16] \
        [--warmup 2] [--steps 5] [--gan-size 224 --gan-batch 8 --ngf 64 --blocks 9 --ndf 64] \
        [--size 224 --batch 32]
    python gpu_check_torch.py table --candle candle.json --torch torch.json \
        [--grads grads.json] > table.md

Models, loaded with melanoflow's exported weights by their reference names
(DIR holds what `melanoflow gpu-check bench --export DIR` wrote):
  cyclegan  the reference ResnetGenerator / NLayerDiscriminator
            (benches/cyclegan_step_torch.py, imported from beside this file),
            two of each, Adam, LSGAN + L1 cycle loss (its make_step);
  b0        torchvision's efficientnet_b0(num_classes=1);
  lite0     EfficientNet-Lite0 built here from torchvision's building blocks the
            way melanoflow's model is (no squeeze-excitation, ReLU6, TensorFlow
            SAME padding for stride 2, BatchNorm eps 1e-3 / momentum 0.01,
            32-channel stem and 1280-channel head): torchvision has no Lite.
Before timing, each model's output on melanoflow's probe input must match
melanoflow's output (relative L2 error < 1e-3, TF32 off), or the script stops:
the timings then compare the same computation.

Precisions: f32 (TF32 off for matmuls and cuDNN convolutions), tf32 (on for
both), bf16 (torch.autocast(bfloat16) around forward and loss, f32 master
weights and optimiser state). cuDNN's autotuner is on (cudnn.benchmark), as in
the reference CycleGAN's training script; the warm-up steps absorb it.

Timing: the device is synchronised before and after each timed step; ms/step
is the median over --steps steps after --warmup untimed ones. Peak memory:
the CUDA driver's total - free (torch.cuda.mem_get_info) sampled every
millisecond on a thread while the steps run, minus the reading before the
model is built, as the candle side measures it; the caching allocator's own
peak (torch.cuda.max_memory_reserved) is in the JSON too.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import struct
import sys
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cyclegan_step_torch import make_nets, make_step  # noqa: E402

# melanoflow's generator LeakyReLU slope (the paper's notebooks).
PAPER_SLOPE = 0.01
PROBE_TOL = 1e-3
CLASSIFIER_LR = 1e-4

# ---------------------------------------------------------------------------
# safetensors without the safetensors package
# ---------------------------------------------------------------------------

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8}


def load_safetensors(path):
    """{name: tensor} of a safetensors file (8-byte header length, JSON
    header, raw little-endian data)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = _DTYPES[meta["dtype"]]
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin \
            else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(meta["shape"])
    return out


def load_into(model, state, what):
    """load_state_dict that allows only BatchNorm's num_batches_tracked to be
    absent (melanoflow does not keep it)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        sys.exit(f"{what}: names do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------
# EfficientNet-Lite0 from torchvision's building blocks
# ---------------------------------------------------------------------------

# (expand ratio, kernel, stride, in, out, repeats): EfficientNet-B0's stages.
B0_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1)]


def lite0(num_classes=1, dropout=0.2, stochastic_depth_prob=0.2):
    from torchvision.ops import Conv2dNormActivation, StochasticDepth

    bn = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)

    class ConvBn(Conv2dNormActivation):
        """Conv2dNormActivation (names 0.weight, 1.*) with TensorFlow SAME
        padding for stride 2: the extra row and column at the bottom/right."""

        def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
            self.same = stride == 2
            super().__init__(cin, cout, k, stride, padding=0 if self.same else k // 2,
                             groups=groups, norm_layer=bn,
                             activation_layer=nn.ReLU6 if act else None, bias=False)
            self.k = k

        def forward(self, x):
            if self.same:
                h, w = x.shape[-2:]
                th = max((math.ceil(h / 2) - 1) * 2 + self.k - h, 0)
                tw = max((math.ceil(w / 2) - 1) * 2 + self.k - w, 0)
                x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            return super().forward(x)

    class MBConv(nn.Module):
        def __init__(self, e, k, s, cin, cout, p):
            super().__init__()
            hidden = cin * e
            layers = [ConvBn(cin, hidden, 1)] if e != 1 else []
            layers += [ConvBn(hidden, hidden, k, s, groups=hidden), ConvBn(hidden, cout, 1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout
            self.stochastic_depth = StochasticDepth(p, "row")

        def forward(self, x):
            y = self.block(x)
            return x + self.stochastic_depth(y) if self.residual else y

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            total = sum(r for *_, r in B0_STAGES)
            features, i = [ConvBn(3, 32, 3, 2)], 0
            for e, k, s, cin, cout, r in B0_STAGES:
                stage = []
                for j in range(r):
                    stage.append(MBConv(e, k, s if j == 0 else 1, cin if j == 0 else cout, cout,
                                        stochastic_depth_prob * i / total))
                    i += 1
                features.append(nn.Sequential(*stage))
            features.append(ConvBn(320, 1280, 1))
            self.features = nn.Sequential(*features)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return Lite0()


# ---------------------------------------------------------------------------
# Models, probes, steps
# ---------------------------------------------------------------------------

def build(model, a, device):
    """(modules to probe and train, step(x, y) -> loss, probe forward)."""
    wd = a.weights_dir
    if model == "cyclegan":
        nets = make_nets(a.ngf, a.ndf, a.blocks, slope=PAPER_SLOPE)
        for k, net in nets.items():
            load_into(net, load_safetensors(os.path.join(wd, f"cyclegan-{k}.safetensors")), f"cyclegan {k}")
            net.to(device)
        return nets, nets["G_A"]
    if model == "b0":
        import torchvision
        net = torchvision.models.efficientnet_b0(num_classes=1)
    else:
        net = lite0()
    load_into(net, load_safetensors(os.path.join(wd, f"{model}.safetensors")), model)
    return {"classifier": net.to(device)}, net


def probe(model, fwd, a, device):
    """Relative L2 error of our output on melanoflow's probe input (eval mode
    for the classifiers; the generator has no mode)."""
    p = load_safetensors(os.path.join(a.weights_dir, f"{model}-probe.safetensors"))
    set_precision("f32")
    was = fwd.training
    fwd.eval()
    with torch.no_grad():
        y = fwd(p["input"].to(device)).float().cpu()
    fwd.train(was)
    ref = p["output"]
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def set_precision(precision):
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast_for(precision, device):
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_classifier_step(net, autocast):
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR, betas=(0.9, 0.999))
    bce = nn.BCEWithLogitsLoss()

    def step(x, t):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = bce(net(x).flatten().float(), t)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


class MemorySampler:
    """Peak of the driver's total - free while running (cuda only)."""

    def __init__(self, device):
        self.device, self.peak, self.stop = device, None, threading.Event()
        if device.type == "cuda":
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()

    @staticmethod
    def used(device):
        free, total = torch.cuda.mem_get_info(device)
        return total - free

    def run(self):
        peak = self.used(self.device)
        while not self.stop.is_set():
            peak = max(peak, self.used(self.device))
            time.sleep(0.001)
        self.peak = max(peak, self.used(self.device))

    def finish(self):
        if self.device.type != "cuda":
            return None
        self.stop.set()
        self.thread.join()
        return self.peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(model, precision, a, device):
    is_gan = model == "cyclegan"
    size, batch = (a.gan_size, a.gan_batch) if is_gan else (a.size, a.batch)
    row = {"framework": "pytorch", "model": model, "precision": precision, "status": "ok",
           "note": "", "device": str(device), "torch": torch.__version__,
           "shape": {"size": size, "batch": batch, **({"ngf": a.ngf, "n_blocks": a.blocks, "ndf": a.ndf} if is_gan else {})},
           "warmup": a.warmup, "steps": a.steps}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        baseline = MemorySampler.used(device)
    nets, fwd = build(model, a, device)
    err = probe(model, fwd, a, device)
    row["probe_rel_err"] = err
    if not err < PROBE_TOL:
        sys.exit(f"{model}: output on melanoflow's probe differs by {err:.2e} (>= {PROBE_TOL}): "
                 "not the same model, timings would not compare")
    set_precision(precision)
    autocast = autocast_for(precision, device)
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, size, size)
    if is_gan:
        step = make_step(nets, autocast=autocast)
        x, y = (torch.rand(shape, generator=g) * 2 - 1).to(device), (torch.rand(shape, generator=g) * 2 - 1).to(device)
    else:
        step = make_classifier_step(nets["classifier"], autocast)
        x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
        y = (torch.arange(batch) % 2).float().to(device)
    sampler = MemorySampler(device)
    times = []
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step(x, y)
        loss = loss[0] if isinstance(loss, tuple) else loss
        sync(device)
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            row["last_loss"] = loss
        if not math.isfinite(loss):
            sys.exit(f"{model} {precision}: loss {loss} at step {i}")
    peak = sampler.finish()
    ms = statistics.median(times)
    row.update(ms_per_step=ms, ms_per_step_mean=sum(times) / len(times), images_per_s=batch * 1e3 / ms)
    if device.type == "cuda":
        row["peak_mib"] = (peak - baseline) / 2**20
        row["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        row["memory_method"] = "torch.cuda.mem_get_info total-free, sampled every 1 ms, minus the reading before the model was built"
    else:
        row["peak_mib"] = None
        row["memory_method"] = "not measured on the CPU"
    del nets, step, x, y
    return row


def cmd_bench(a):
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rows = []
    for model in a.models.split(","):
        for precision in a.precisions.split(","):
            if precision not in ("f32", "tf32", "bf16"):
                sys.exit(f"unknown precision {precision}")
            row = bench_one(model, precision, a, device)
            print(f"{model} {precision}: {row['ms_per_step']:.1f} ms/step, "
                  f"{row['images_per_s']:.1f} images/s, probe error {row['probe_rel_err']:.1e}",
                  file=sys.stderr)
            rows.append(row)
    with open(a.json, "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "rows": rows}, f, indent=1)


# ---------------------------------------------------------------------------
# The markdown table
# ---------------------------------------------------------------------------

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def cmd_table(a):
    with open(a.candle) as f:
        candle = {(r["model"], r["precision"]): r for r in json.load(f)["rows"]}
    with open(a.torch) as f:
        torch_json = json.load(f)
    torch_rows = {(r["model"], r["precision"]): r for r in torch_json["rows"]}
    out = []
    if a.grads:
        with open(a.grads) as f:
            g = json.load(f)
        out.append(f"Gradient check ({g['candidate']} vs {g['reference']}, f32): "
                   f"{'passed' if g['passed'] else 'FAILED'}\n")
        out.append("| model | variables | worst gradient error | worst weight error after "
                   f"{g['steps']} steps | failures |")
        out.append("|---|---|---|---|---|")
        for m in g["models"]:
            out.append(f"| {m['model']} | {len(m['rows'])} | {m['worst_grad_err']:.2e} (< {g['tolerances']['gradient']:.0e}) "
                       f"| {m['worst_weight_err']:.2e} (< {g['tolerances']['weights']:.0e}) | {len(m['failures'])} |")
        out.append("")
    notes = set()
    out.append("| model | shape | precision | candle ms/step | PyTorch ms/step | candle images/s "
               "| PyTorch images/s | candle peak MiB | PyTorch peak MiB | candle/PyTorch |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(candle) | set(torch_rows), key=lambda k: (k[0], ["f32", "tf32", "bf16"].index(k[1]))):
        c, t = candle.get(key, {}), torch_rows.get(key, {})
        shape = c.get("shape") or t.get("shape") or {}
        desc = f"{shape.get('size')} px, batch {shape.get('batch')}"
        if key[0] == "cyclegan":
            desc += f", ngf {shape.get('ngf')}, {shape.get('n_blocks')} blocks"
        cm, tm = c.get("ms_per_step"), t.get("ms_per_step")
        ratio = f"{cm / tm:.2f}" if cm and tm else "n/a"
        cms = fmt(cm, ".1f") if c.get("status", "ok") == "ok" else "skipped"
        if c.get("status") == "skipped":
            notes.add(f"candle {key[1]}: {c.get('note')}")
        out.append(f"| {key[0]} | {desc} | {key[1]} | {cms} | {fmt(tm, '.1f')} | {fmt(c.get('images_per_s'), '.1f')} "
                   f"| {fmt(t.get('images_per_s'), '.1f')} | {fmt(c.get('peak_mib'), '.0f')} "
                   f"| {fmt(t.get('peak_mib'), '.0f')} | {ratio} |")
    out.append("")
    out.extend(f"- {n}" for n in sorted(notes))
    out.append("")
    out.append(f"PyTorch {torch_json.get('torch')} (CUDA {torch_json.get('cuda')}) on {torch_json.get('gpu')}. "
               "ms/step: median of the timed steps, device synchronised around each; "
               "images/s: batch / ms per step (CycleGAN: image pairs); peak: driver-level device "
               "memory (total - free) sampled every 1 ms, minus the reading before the model was built.")
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--weights-dir", required=True)
    b.add_argument("--json", required=True)
    b.add_argument("--device", default="cuda")
    b.add_argument("--models", default="cyclegan,b0,lite0")
    b.add_argument("--precisions", default="f32,tf32,bf16")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--gan-size", type=int, default=224)
    b.add_argument("--gan-batch", type=int, default=8)
    b.add_argument("--ngf", type=int, default=64)
    b.add_argument("--blocks", type=int, default=9)
    b.add_argument("--ndf", type=int, default=64)
    b.add_argument("--size", type=int, default=224)
    b.add_argument("--batch", type=int, default=32)
    t = sub.add_parser("table")
    t.add_argument("--candle", required=True)
    t.add_argument("--torch", required=True)
    t.add_argument("--grads")
    a = ap.parse_args()
    {"bench": cmd_bench, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
