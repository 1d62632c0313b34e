"""Reference logits for melanoflow's EfficientNet-B0 (stages/models/efficientnet.rs).

torchvision's efficientnet_b0 with one output, every parameter and buffer set by a
formula the Rust test repeats (so no weight file is needed), on a fixed input.
Prints the logits in evaluation mode and in training mode (batch statistics,
dropout and stochastic depth off). Run with torch + torchvision:
    python tests/reference/efficientnet_reference.py
"""
import math

import torch
from torchvision.models import efficientnet_b0


def noise(a):
    """A pseudo-random value in [-1, 1) from a float (the shader-style hash)."""
    v = math.sin(a) * 43758.5453
    return 2.0 * (v - math.floor(v)) - 1.0


def value(name, k, i, shape):
    s = noise(0.37 * i + 0.11 * k + 1.0)
    if name.endswith("running_var"):
        return 1.0 + 0.5 * abs(s)
    if name.endswith("running_mean") or name.endswith("bias"):
        return 0.1 * s
    if len(shape) == 1:  # BatchNorm scale
        return 1.0 + 0.1 * s
    fan_in = math.prod(shape[1:])
    return s * (3.0 / math.sqrt(fan_in))


def main():
    torch.manual_seed(0)
    model = efficientnet_b0(num_classes=1, dropout=0.0, stochastic_depth_prob=0.0)
    state = model.state_dict()
    names = sorted(n for n in state if not n.endswith("num_batches_tracked"))
    with torch.no_grad():
        for k, n in enumerate(names):
            t = state[n]
            flat = torch.tensor([value(n, k, i, list(t.shape)) for i in range(t.numel())], dtype=torch.float32)
            t.copy_(flat.reshape(t.shape))
    x = torch.tensor([noise(0.05 * i) for i in range(2 * 3 * 64 * 64)], dtype=torch.float32).reshape(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        print("eval", model(x).flatten().tolist())
    model.train()
    with torch.no_grad():
        print("train", model(x).flatten().tolist())
        print("running_mean features.0.1[:4]", model.features[0][1].running_mean[:4].tolist())
    print("eps", model.features[0][1].eps, "momentum", model.features[0][1].momentum)


if __name__ == "__main__":
    main()
