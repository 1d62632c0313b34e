//! Building blocks candle lacks or that the models need in a specific form:
//! reflection padding (not an op in candle: built from `index_select`),
//! instance normalisation without affine parameters, LeakyReLU, and
//! convolutions with biases named like PyTorch's (`weight`, `bias`).
//!
//! Every layer computes in its input's dtype (see `precision`): F32
//! variables are cast to it in the forward pass, while instance-norm
//! statistics, bias additions and the losses stay in F32.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::kernels::batchnorm::{Act, batch_norm_act_train};
use super::kernels::bias;
use super::kernels::conv::{conv_transpose2d, conv2d, conv2d_reflect};
use super::kernels::gpu::norm;
use super::kernels::{Path, accumulation_dtype, half_on_cpu, path, widen};
use super::precision::in_dtype_of;

/// The init hint for weights: N(0, 0.02), as the reference CycleGAN. (The
/// actual values are then drawn from the pipeline seed: see `init.rs`.)
const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Pads the last two dimensions by reflection (the edge pixel is not
/// repeated), like `torch.nn.ReflectionPad2d(p)`. Shape [B, C, H, W] ->
/// [B, C, H + 2p, W + 2p]; requires p < H and p < W. Two `index_select`s with
/// index tensors cached per device and size, on every device (a gather: the
/// same bytes however its indices were built).
pub fn reflection_pad2d(x: &Tensor, p: usize) -> Result<Tensor> {
    norm::reflection_pad2d(x, p)
}

/// Instance normalisation over (H, W) per sample and channel, without affine
/// parameters (PyTorch `InstanceNorm2d(affine=False)`, biased variance). It is
/// BatchNorm's training-mode normalisation of a batch of one with N x C
/// channels, so it runs on the fused BatchNorm kernel (one pass forward, one
/// backward) instead of five candle ops and their gradients.
///
/// CUDA tensors take `kernels::gpu::norm`'s formulation (no per-call
/// constants, closed-form backward) instead (`kernels::path` decides).
pub fn instance_norm(x: &Tensor) -> Result<Tensor> {
    instance_norm_act(x, Act::Identity)
}

/// `leaky_relu(instance_norm(x), slope)` in one fused kernel on CPU: the
/// activation and its derivative run inside the normalisation's passes, so
/// the pair costs no more than the norm alone (candle's `maximum` and its
/// backward are about a dozen full-size passes). Same values as the two
/// unfused ops, bit for bit (ties at exactly 0 included).
pub fn instance_norm_leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    instance_norm_act(x, Act::LeakyRelu(slope as f32))
}

fn instance_norm_act(x: &Tensor, act: Act) -> Result<Tensor> {
    const EPS: f64 = 1e-5;
    if path(&[x]) == Path::Formulation {
        let y = norm::instance_norm(x, EPS)?;
        return match act {
            Act::LeakyRelu(slope) => leaky_relu(&y, slope as f64),
            _ => Ok(y),
        };
    }
    let (n, c, h, w) = x.dims4()?;
    let dtype = accumulation_dtype(x.dtype());
    let ones = Tensor::ones(n * c, dtype, x.device())?;
    let zeros = Tensor::zeros(n * c, dtype, x.device())?;
    let (y, _, _) = batch_norm_act_train(&x.reshape((1, n * c, h, w))?, &ones, &zeros, EPS, act)?;
    y.reshape((n, c, h, w))
}

/// LeakyReLU for a slope in [0, 1): max(x, slope * x).
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.maximum(&(x * slope)?)
}

/// Nearest-neighbour upsampling of x [B, C, H, W] to [B, C, 2H, 2W]. Half
/// precision on the CPU upsamples in F32 (a copy, so the same values):
/// candle's backward of this op is a grouped `conv2d`, which its CPU backend
/// lacks in half precision.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if half_on_cpu(&[x]) {
        return widen(x)?
            .upsample_nearest2d(2 * h, 2 * w)?
            .to_dtype(x.dtype());
    }
    x.upsample_nearest2d(2 * h, 2 * w)
}

/// A 2-D convolution with bias (the reference uses biases with instance norm),
/// on `kernels::conv` (im2col + gemm, with its own backward) on CPU.
#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// Pad by reflection (`ReflectionPad2d(padding)` before the conv in the
    /// reference), fused into the convolution's gathers.
    reflect: bool,
}

impl Conv {
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", WEIGHT_INIT)?;
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(Conv {
            weight,
            bias,
            stride,
            padding,
            reflect: false,
        })
    }

    /// A stride-1 convolution whose input is first padded by `padding` by
    /// reflection, as the reference's `ReflectionPad2d` + `Conv2d(padding=0)`
    /// pair (the same parameters).
    pub fn reflect_padded(
        cin: usize,
        cout: usize,
        k: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Conv {
            reflect: true,
            ..Conv::new(cin, cout, k, 1, padding, vb)?
        })
    }

    /// The same layer with its parameters detached from the graph: a
    /// backward pass through it computes its input's gradient only, for a
    /// network held fixed while another trains through it.
    pub fn frozen(&self) -> Conv {
        Conv {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            ..self.clone()
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = in_dtype_of(&self.weight, x)?;
        let y = if self.reflect {
            conv2d_reflect(x, &w, self.stride, self.padding)?
        } else {
            conv2d(x, &w, self.stride, self.padding)?
        };
        add_channel_bias(&y, &self.bias)
    }
}

/// A stride-2 transposed convolution that doubles H and W (kernel 3,
/// padding 1, output padding 1). Weight shape [cin, cout, 3, 3], as PyTorch.
#[derive(Clone, Debug)]
pub struct ConvT {
    weight: Tensor,
    bias: Tensor,
}

impl ConvT {
    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cin, cout, 3, 3), "weight", WEIGHT_INIT)?;
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(ConvT { weight, bias })
    }
}

impl Module for ConvT {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = in_dtype_of(&self.weight, x)?;
        add_channel_bias(&conv_transpose2d(x, &w, 2, 1, 1)?, &self.bias)
    }
}

/// x [N, C, H, W] + bias [C], in x's dtype (`kernels::bias`). The addition
/// runs in F32 for half-precision x: the bias's gradient is a sum over
/// N·H·W values, which candle would otherwise add in BF16. (For F32 x the
/// casts are no-ops.)
fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let bias = bias.to_dtype(accumulation_dtype(x.dtype()))?;
    bias::add_channel_bias(&widen(x)?, &bias)?.to_dtype(x.dtype())
}

/// Mean squared error against a target tensor of the same shape, computed
/// in F32 (or F64) whatever the inputs' dtype.
pub fn mse(x: &Tensor, target: &Tensor) -> Result<Tensor> {
    (widen(x)? - widen(target)?)?.sqr()?.mean_all()
}

/// Mean absolute error, in F32 (or F64) as [`mse`].
pub fn l1(x: &Tensor, target: &Tensor) -> Result<Tensor> {
    (widen(x)? - widen(target)?)?.abs()?.mean_all()
}

/// A scalar tensor's value.
pub fn scalar(x: &Tensor) -> Result<f32> {
    x.to_dtype(DType::F32)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reflection_pad_matches_torch() {
        // torch.nn.ReflectionPad2d(2)(torch.arange(9.).reshape(1,1,3,3))[0,0]
        let x = Tensor::arange(0f32, 9., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let y = reflection_pad2d(&x, 2).unwrap();
        let rows: Vec<Vec<f32>> = y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(rows[0], [8., 7., 6., 7., 8., 7., 6.]);
        assert_eq!(rows[2], [2., 1., 0., 1., 2., 1., 0.]);
        assert_eq!(rows[6], [2., 1., 0., 1., 2., 1., 0.]);
    }

    #[test]
    fn instance_norm_zero_mean_unit_variance_per_channel() {
        let x = Tensor::arange(0f32, 32., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4, 4))
            .unwrap();
        let x = (x.sqr().unwrap() * 0.1).unwrap();
        let y = instance_norm(&x).unwrap();
        for c in 0..2 {
            let ch = y
                .get(0)
                .unwrap()
                .get(c)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mean = ch.iter().sum::<f32>() / 16.0;
            let var = ch.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
    }

    /// The fused norm + LeakyReLU computes the unfused pair's values and
    /// gradients bit for bit, at exact ties (normalised value 0) too: each
    /// plane is symmetric around its mean, so its middle value is exactly 0.
    #[test]
    fn instance_norm_leaky_relu_equals_the_unfused_ops_bitwise() {
        use candle_core::Var;
        let (n, c, hw) = (2, 3, 25);
        let x: Vec<f32> = (0..n * c)
            .flat_map(|p| {
                (0..hw).map(move |i| (i as f32 - 12.0) * (1.0 + p as f32) + 10.0 * p as f32)
            })
            .collect();
        let x = Var::from_vec(x, (n, c, 5, 5), &Device::Cpu).unwrap();
        let dy = Tensor::randn(0f32, 1., (n, c, 5, 5), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let run = |fused: bool| {
            let y = if fused {
                instance_norm_leaky_relu(x.as_tensor(), 0.2)
            } else {
                leaky_relu(&instance_norm(x.as_tensor()).unwrap(), 0.2)
            }
            .unwrap();
            let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            (bits(&y), bits(grads.get(x.as_tensor()).unwrap()))
        };
        let (y_fused, dx_fused) = run(true);
        let (y_ref, dx_ref) = run(false);
        assert_eq!(
            y_fused.iter().filter(|&&b| b == 0).count(),
            n * c,
            "one tie per plane"
        );
        assert_eq!(y_fused, y_ref);
        assert_eq!(dx_fused, dx_ref);
    }
}
