#!/usr/bin/env python3
"""PyTorch CPU baseline: wall time of one full CycleGAN training step.

Architecture mirrors melanoflow's CycleGAN (pytorch-CycleGAN-and-pix2pix
ResnetGenerator with InstanceNorm2d(affine=False), bias on every conv, no
dropout, LeakyReLU(0.2) instead of ReLU; PatchGAN NLayerDiscriminator with
n_layers=3). Two generators, two discriminators, Adam(2e-4, (0.5, 0.999)),
LSGAN (MSE) adversarial losses, L1 cycle loss weighted 10.

Usage:
    python benches/cyclegan_step_torch.py --size 128 --ngf 64 --ndf 64 \
        --blocks 9 --batch 1 --steps 5 --warmup 2 --threads 2

Prints one JSON line:
    {"framework":"pytorch","size":..,"ngf":..,"blocks":..,"batch":..,
     "threads":..,"ms_per_step": <median over --steps timed steps>}
"""

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn as nn

SLOPE = 0.2


class ResnetBlock(nn.Module):
    def __init__(self, dim, slope=SLOPE):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),                      # conv_block.0
            nn.Conv2d(dim, dim, 3, bias=True),          # conv_block.1
            nn.InstanceNorm2d(dim),                     # conv_block.2
            nn.LeakyReLU(slope),                        # conv_block.3
            nn.ReflectionPad2d(1),                      # conv_block.4
            nn.Conv2d(dim, dim, 3, bias=True),          # conv_block.5
            nn.InstanceNorm2d(dim),                     # conv_block.6
        )

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    def __init__(self, in_c=3, out_c=3, ngf=64, n_blocks=9, slope=SLOPE):
        super().__init__()
        layers = [
            nn.ReflectionPad2d(3),                                  # 0
            nn.Conv2d(in_c, ngf, 7, padding=0, bias=True),          # 1
            nn.InstanceNorm2d(ngf),                                 # 2
            nn.LeakyReLU(slope),                                    # 3
        ]
        for i in range(2):                                          # 4..9
            mult = 2 ** i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.LeakyReLU(slope),
            ]
        for _ in range(n_blocks):                                   # 10..10+nb-1
            layers.append(ResnetBlock(ngf * 4, slope))
        for i in range(2):                                          # 10+nb..15+nb
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2,
                                   padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.LeakyReLU(slope),
            ]
        layers += [
            nn.ReflectionPad2d(3),                                  # 16+nb
            nn.Conv2d(ngf, out_c, 7, padding=0, bias=True),         # 17+nb
            nn.Tanh(),                                              # 18+nb
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_c=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_c, ndf, 4, 2, 1, bias=True), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=True),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=True),
            nn.InstanceNorm2d(ndf * mult),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1, bias=True),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def make_nets(ngf=64, ndf=64, blocks=9, n_layers_d=3, slope=SLOPE):
    """G_A (A -> B), G_B (B -> A), D_A (judges B), D_B (judges A), in train mode:
    the names of melanoflow's G_A/G_B/D_A/D_B.safetensors."""
    nets = {
        "G_A": ResnetGenerator(ngf=ngf, n_blocks=blocks, slope=slope),
        "G_B": ResnetGenerator(ngf=ngf, n_blocks=blocks, slope=slope),
        "D_A": NLayerDiscriminator(ndf=ndf, n_layers=n_layers_d),
        "D_B": NLayerDiscriminator(ndf=ndf, n_layers=n_layers_d),
    }
    for net in nets.values():
        net.train()
    return nets


def make_step(nets, lam=10.0, lr=2e-4, autocast=contextlib.nullcontext):
    """One training step step(real_A, real_B) -> (loss_G, loss_D) as floats
    (reading them waits for the step): Adam(lr, (0.5, 0.999)) on both pairs,
    LSGAN losses, L1 cycle loss weighted `lam`; forward passes and losses
    under `autocast()` (bf16 autocast on a GPU), backward outside it."""
    G_A, G_B, D_A, D_B = (nets[k] for k in ("G_A", "G_B", "D_A", "D_B"))
    opt_G = torch.optim.Adam(list(G_A.parameters()) + list(G_B.parameters()),
                             lr=lr, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(list(D_A.parameters()) + list(D_B.parameters()),
                             lr=lr, betas=(0.5, 0.999))
    mse = nn.MSELoss()
    l1 = nn.L1Loss()

    def gan_loss(pred, target_is_real):
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return mse(pred, target)

    def step(real_A, real_B):
        # ---- generators
        with autocast():
            fake_B = G_A(real_A)
            rec_A = G_B(fake_B)
            fake_A = G_B(real_B)
            rec_B = G_A(fake_A)
        set_requires_grad((D_A, D_B), False)
        opt_G.zero_grad(set_to_none=True)
        with autocast():
            loss_G = (gan_loss(D_A(fake_B), True) + gan_loss(D_B(fake_A), True)
                      + lam * l1(rec_A, real_A) + lam * l1(rec_B, real_B))
        loss_G.backward()
        opt_G.step()
        # ---- discriminators
        set_requires_grad((D_A, D_B), True)
        opt_D.zero_grad(set_to_none=True)
        with autocast():
            loss_D_A = 0.5 * (gan_loss(D_A(real_B), True) + gan_loss(D_A(fake_B.detach()), False))
            loss_D_B = 0.5 * (gan_loss(D_B(real_A), True) + gan_loss(D_B(fake_A.detach()), False))
        (loss_D_A + loss_D_B).backward()
        opt_D.step()
        return float(loss_G.detach()), float((loss_D_A + loss_D_B).detach())

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--ndf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--n-layers-d", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    nets = make_nets(args.ngf, args.ndf, args.blocks, args.n_layers_d)
    step = make_step(nets)
    shape = (args.batch, 3, args.size, args.size)
    real_A = torch.rand(shape) * 2 - 1
    real_B = torch.rand(shape) * 2 - 1

    for _ in range(args.warmup):
        step(real_A, real_B)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(real_A, real_B)
        times.append((time.perf_counter() - t0) * 1000.0)

    print(json.dumps({
        "framework": "pytorch",
        "size": args.size,
        "ngf": args.ngf,
        "blocks": args.blocks,
        "batch": args.batch,
        "threads": args.threads,
        "ms_per_step": round(statistics.median(times), 3),
    }, separators=(",", ":")))


if __name__ == "__main__":
    main()
