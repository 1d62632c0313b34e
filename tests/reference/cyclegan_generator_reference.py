#!/usr/bin/env python3
"""Numpy reference forward pass of a tiny ResNet CycleGAN generator.

Architecture: pytorch-CycleGAN-and-pix2pix ResnetGenerator, with
InstanceNorm2d(affine=False, eps=1e-5, biased variance over H,W), bias on every
conv, no dropout, and every ReLU replaced by LeakyReLU(slope).

    model.0        ReflectionPad2d(3)
    model.1        Conv2d(3, ngf, 7, padding=0) ; IN ; LeakyReLU
    model.4        Conv2d(ngf, 2ngf, 3, stride=2, padding=1) ; IN ; LeakyReLU
    model.7        Conv2d(2ngf, 4ngf, 3, stride=2, padding=1) ; IN ; LeakyReLU
    model.{10+i}   ResnetBlock(4ngf):
                   y = x + [ReflectionPad2d(1), conv_block.1 Conv2d(3x3), IN,
                            LeakyReLU, ReflectionPad2d(1),
                            conv_block.5 Conv2d(3x3), IN](x)
    model.{10+nb}  ConvTranspose2d(4ngf, 2ngf, 3, s=2, p=1, op=1) ; IN ; LeakyReLU
    model.{13+nb}  ConvTranspose2d(2ngf, ngf, 3, s=2, p=1, op=1) ; IN ; LeakyReLU
    model.{16+nb}  ReflectionPad2d(3)
    model.{17+nb}  Conv2d(ngf, 3, 7, padding=0) ; tanh

Weight layouts follow PyTorch: Conv2d [out, in, kh, kw];
ConvTranspose2d [in, out, kh, kw]; biases [out].

Tiny config: ngf=2, n_blocks=1, slope=0.2, input [1, 3, 8, 8].

Deterministic fill: sort all parameter names with Python `sorted` (byte order);
tensor number k (0-based in that list), element j in row-major order:
    0.3 * sin(0.7 * j + 1.3 * k)
Input element j (row-major over [1,3,8,8]): sin(0.1 * j) * 0.9.

All arithmetic is float64. Run with numpy only (no torch).
"""

import numpy as np

NGF = 2
N_BLOCKS = 1
SLOPE = 0.2
IN_SHAPE = (1, 3, 8, 8)
EPS = 1e-5


# ----------------------------------------------------------------- primitives

def reflection_pad(x, p):
    # Same as torch.nn.ReflectionPad2d(p): edge pixel not repeated.
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")


def zero_pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant")


def conv2d(x, w, b=None, stride=1, padding=0):
    """PyTorch Conv2d (cross-correlation), zero padding. w: [out, in, kh, kw]."""
    n, cin, h, wd = x.shape
    cout, cin_w, kh, kw = w.shape
    assert cin == cin_w
    xp = zero_pad(x, padding)
    hp, wp = xp.shape[2], xp.shape[3]
    ho = (hp - kh) // stride + 1
    wo = (wp - kw) // stride + 1
    y = np.zeros((n, cout, ho, wo), dtype=np.float64)
    for oy in range(ho):
        for ox in range(wo):
            patch = xp[:, :, oy * stride:oy * stride + kh, ox * stride:ox * stride + kw]
            y[:, :, oy, ox] = np.einsum("nikl,oikl->no", patch, w)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0):
    """PyTorch ConvTranspose2d. w: [in, out, kh, kw].

    Scatter-add: every input pixel (iy, ix) adds x[n,i,iy,ix] * w[i,o,:,:] into
    the full output at (iy*stride + ky, ix*stride + kx); the result is then
    cropped by `padding` at the top/left, to the size
    (H-1)*stride - 2*padding + kernel + output_padding.
    """
    n, cin, h, wd = x.shape
    cin_w, cout, kh, kw = w.shape
    assert cin == cin_w
    oph, opw = (output_padding if isinstance(output_padding, tuple)
                else (output_padding, output_padding))
    assert 0 <= oph < max(stride, 1) or oph == 0
    assert 0 <= opw < max(stride, 1) or opw == 0
    ho = (h - 1) * stride - 2 * padding + kh + oph
    wo = (wd - 1) * stride - 2 * padding + kw + opw
    full_h = (h - 1) * stride + kh + oph
    full_w = (wd - 1) * stride + kw + opw
    full = np.zeros((n, cout, full_h, full_w), dtype=np.float64)
    for iy in range(h):
        for ix in range(wd):
            # contrib[n, o, ky, kx] = sum_i x[n,i,iy,ix] * w[i,o,ky,kx]
            contrib = np.einsum("ni,iokl->nokl", x[:, :, iy, ix], w)
            full[:, :, iy * stride:iy * stride + kh, ix * stride:ix * stride + kw] += contrib
    y = full[:, :, padding:padding + ho, padding:padding + wo].copy()
    assert y.shape == (n, cout, ho, wo)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def instance_norm(x, eps=EPS):
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(2, 3), keepdims=True)  # biased
    return (x - mean) / np.sqrt(var + eps)


def leaky_relu(x, slope=SLOPE):
    return np.where(x > 0, x, slope * x)


# ------------------------------------------------------------- self-checks

def check_conv_adjoint():
    """<conv2d(x), y> == <x, conv_transpose2d(y)> with the same weight tensor.

    Conv2d weight [out, in, kh, kw] is read by conv_transpose2d as
    [in_T = out, out_T = in, kh, kw], which is exactly the adjoint pairing.
    """
    rng = np.random.default_rng(12345)
    cases = [
        # (n, cin, cout, h, w, k, stride, padding)
        (1, 3, 2, 8, 8, 3, 2, 1),
        (2, 4, 3, 7, 7, 3, 2, 1),
        (1, 2, 5, 9, 6, 3, 1, 1),
        (1, 3, 2, 14, 14, 7, 1, 0),
        (1, 2, 3, 10, 11, 4, 2, 1),
        (2, 3, 4, 12, 12, 5, 3, 2),
    ]
    for (n, cin, cout, h, wd, k, s, p) in cases:
        x = rng.standard_normal((n, cin, h, wd))
        w = rng.standard_normal((cout, cin, k, k))
        cx = conv2d(x, w, stride=s, padding=p)
        ho, wo = cx.shape[2], cx.shape[3]
        y = rng.standard_normal((n, cout, ho, wo))
        # output_padding so that conv_transpose2d(y) has x's shape
        oph = h - ((ho - 1) * s - 2 * p + k)
        opw = wd - ((wo - 1) * s - 2 * p + k)
        ty = conv_transpose2d(y, w, stride=s, padding=p, output_padding=(oph, opw))
        assert ty.shape == x.shape, (ty.shape, x.shape)
        lhs = float(np.sum(cx * y))
        rhs = float(np.sum(x * ty))
        assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs)), (lhs, rhs)

    # Independent formulation of conv_transpose2d: zero-insert (dilate) the
    # input by stride, pad by k-1-p (plus output_padding at bottom/right), and
    # run a stride-1 cross-correlation with the spatially flipped, in/out
    # swapped kernel.
    for (n, cin, cout, h, wd, k, s, p, op) in [
        (1, 8, 4, 2, 2, 3, 2, 1, 1),
        (2, 3, 5, 4, 3, 3, 2, 1, 1),
        (1, 2, 3, 5, 5, 4, 2, 1, 0),
        (1, 3, 2, 3, 4, 5, 3, 2, 2),
    ]:
        x = rng.standard_normal((n, cin, h, wd))
        w = rng.standard_normal((cin, cout, k, k))
        b = rng.standard_normal((cout,))
        got = conv_transpose2d(x, w, b, stride=s, padding=p, output_padding=op)
        dil = np.zeros((n, cin, (h - 1) * s + 1, (wd - 1) * s + 1))
        dil[:, :, ::s, ::s] = x
        q = k - 1 - p
        dil = np.pad(dil, ((0, 0), (0, 0), (q, q + op), (q, q + op)))
        wflip = np.transpose(w, (1, 0, 2, 3))[:, :, ::-1, ::-1]
        want = conv2d(dil, wflip, b, stride=1, padding=0)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert np.max(np.abs(got - want)) < 1e-10

    # Reflection pad sanity (PyTorch semantics: no edge repeat).
    r = reflection_pad(np.arange(4.0).reshape(1, 1, 1, 4).repeat(4, axis=2), 2)
    assert list(r[0, 0, 0]) == [2.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0]


# ------------------------------------------------------------ the generator

def param_shapes(ngf=NGF, nb=N_BLOCKS, in_c=3, out_c=3):
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[name + ".weight"] = (cout, cin, k, k)
        shapes[name + ".bias"] = (cout,)

    def convt(name, cin, cout, k):
        shapes[name + ".weight"] = (cin, cout, k, k)
        shapes[name + ".bias"] = (cout,)

    conv("model.1", in_c, ngf, 7)
    conv("model.4", ngf, 2 * ngf, 3)
    conv("model.7", 2 * ngf, 4 * ngf, 3)
    for i in range(nb):
        conv(f"model.{10 + i}.conv_block.1", 4 * ngf, 4 * ngf, 3)
        conv(f"model.{10 + i}.conv_block.5", 4 * ngf, 4 * ngf, 3)
    convt(f"model.{10 + nb}", 4 * ngf, 2 * ngf, 3)
    convt(f"model.{13 + nb}", 2 * ngf, ngf, 3)
    conv(f"model.{17 + nb}", ngf, out_c, 7)
    return shapes


def make_params(shapes):
    names = sorted(shapes)  # Python str sort == byte sort for ASCII names
    params = {}
    for k, name in enumerate(names):
        size = int(np.prod(shapes[name]))
        j = np.arange(size, dtype=np.float64)
        params[name] = (0.3 * np.sin(0.7 * j + 1.3 * k)).reshape(shapes[name])
    return names, params


def generator(x, P, nb=N_BLOCKS):
    h = reflection_pad(x, 3)
    h = leaky_relu(instance_norm(conv2d(h, P["model.1.weight"], P["model.1.bias"])))
    h = leaky_relu(instance_norm(conv2d(h, P["model.4.weight"], P["model.4.bias"], stride=2, padding=1)))
    h = leaky_relu(instance_norm(conv2d(h, P["model.7.weight"], P["model.7.bias"], stride=2, padding=1)))
    for i in range(nb):
        pre = f"model.{10 + i}.conv_block"
        r = reflection_pad(h, 1)
        r = leaky_relu(instance_norm(conv2d(r, P[pre + ".1.weight"], P[pre + ".1.bias"])))
        r = reflection_pad(r, 1)
        r = instance_norm(conv2d(r, P[pre + ".5.weight"], P[pre + ".5.bias"]))
        h = h + r
    n = f"model.{10 + nb}"
    h = leaky_relu(instance_norm(conv_transpose2d(h, P[n + ".weight"], P[n + ".bias"],
                                                  stride=2, padding=1, output_padding=1)))
    n = f"model.{13 + nb}"
    h = leaky_relu(instance_norm(conv_transpose2d(h, P[n + ".weight"], P[n + ".bias"],
                                                  stride=2, padding=1, output_padding=1)))
    h = reflection_pad(h, 3)
    n = f"model.{17 + nb}"
    h = conv2d(h, P[n + ".weight"], P[n + ".bias"])
    return np.tanh(h)


def main():
    check_conv_adjoint()
    print("self-check: conv2d/conv_transpose2d adjoint + dilated-conv equivalence OK")

    shapes = param_shapes()
    names, params = make_params(shapes)
    print(f"config: ngf={NGF} n_blocks={N_BLOCKS} slope={SLOPE} input={list(IN_SHAPE)}")
    print("parameters (sorted; k = fill index):")
    for k, name in enumerate(names):
        print(f"  {k:2d} {name} {list(shapes[name])}")

    j = np.arange(int(np.prod(IN_SHAPE)), dtype=np.float64)
    x = (np.sin(0.1 * j) * 0.9).reshape(IN_SHAPE)

    y = generator(x, params)
    flat = y.reshape(-1)
    print(f"output shape: {list(y.shape)}")
    print(f"output sum: {flat.sum():.8g}   (full: {flat.sum():.17g})")
    print(f"output mean |y|: {np.abs(flat).mean():.8g}   (full: {np.abs(flat).mean():.17g})")
    print("first 8 outputs (row-major):")
    print("  " + ", ".join(f"{v:.10f}" for v in flat[:8]))
    for c in range(3):
        print(f"output[0, {c}, 3, 5] = {y[0, c, 3, 5]:.10f}")


if __name__ == "__main__":
    main()
