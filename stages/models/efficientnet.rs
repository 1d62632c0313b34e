//! EfficientNet B0-B4 (Tan & Le 2019) and EfficientNet-Lite0 in candle, with
//! BatchNorm that trains (batch statistics and running averages in training
//! mode, running averages in evaluation), dropout and stochastic depth drawn
//! from the caller's seeded generator, and a head with any number of logits
//! (one for melanoma).
//!
//! Parameter names follow torchvision's `efficientnet_b*` (`features.0.0.weight`,
//! `features.N.M.block.K...`, `classifier.1.weight`), so torchvision state dicts
//! load as they are and saved weights load into torchvision. Lite0 has no
//! squeeze-excitation module: its block indices skip it (expand 0, depthwise 1,
//! project 2), which is what `weights::legacy_pth` maps the
//! `efficientnet_pytorch`-style Lite0 weights to.
//!
//! Why not candle-transformers' EfficientNet: its BatchNorm is fixed in
//! inference mode and its fields are private, so it cannot be fine-tuned.
//!
//! On CPU the convolutions and BatchNorm run on `kernels` (depthwise and 1x1
//! convolutions, BatchNorm fused with its activation, each with its own
//! backward); candle's generic ops are several to a hundred times slower there.
//! On CUDA they run on `kernels::gpu`'s formulations.
//!
//! The network computes in its input's dtype (F32, or BF16 with F32
//! weights: see `precision`), except where F32 keeps sums accurate:
//! BatchNorm statistics, squeeze-excitation (a mean over H·W, and its
//! gradient a sum over H·W), global pooling and the classifier. The logits
//! and [`EfficientNet::features`] are F32 for F32 and BF16 input alike.

use candle_core::{D, DType, Module, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::kernels::batchnorm::{Act, batch_norm_act_eval, batch_norm_act_train};
use super::kernels::conv::conv2d;
use super::kernels::depthwise::depthwise_conv2d;
use super::kernels::pointwise::pointwise_conv2d;
use super::kernels::widen;
use super::precision::in_dtype_of;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    B0,
    B1,
    B2,
    B3,
    B4,
    Lite0,
}

impl Variant {
    /// (width multiplier, depth multiplier, native resolution, dropout): torchvision's table.
    fn scaling(self) -> (f64, f64, usize, f64) {
        match self {
            Variant::B0 | Variant::Lite0 => (1.0, 1.0, 224, 0.2),
            Variant::B1 => (1.0, 1.1, 240, 0.2),
            Variant::B2 => (1.1, 1.2, 260, 0.3),
            Variant::B3 => (1.2, 1.4, 300, 0.3),
            Variant::B4 => (1.4, 1.8, 380, 0.4),
        }
    }

    /// The resolution the variant was designed (and pretrained) at.
    pub fn native_resolution(self) -> usize {
        self.scaling().2
    }

    fn is_lite(self) -> bool {
        self == Variant::Lite0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetConfig {
    pub variant: Variant,
    /// Logits out of the head (1 for a binary classifier with BCE).
    pub num_classes: usize,
    /// Dropout before the head; `None` = the variant's (0.2 - 0.4).
    pub dropout: Option<f64>,
    /// Stochastic depth: the last block is dropped with this probability,
    /// earlier ones linearly less (torchvision: 0.2).
    pub stochastic_depth: f64,
    /// TensorFlow "SAME" padding for stride-2 convolutions (pad bottom/right
    /// more), which weights ported from TensorFlow (Lite0) were trained with.
    pub tf_same_padding: bool,
    /// Transfer learning on little data: torchvision's `features[..n]` (the
    /// stem for 1, then whole MBConv stages, up to 8) keep their loaded
    /// weights. In training they run in evaluation mode (BatchNorm running
    /// statistics, no stochastic depth) and pass no gradient back, so they
    /// neither learn nor cost a backward pass. 0 = everything trains.
    pub frozen_stages: usize,
    /// BatchNorm's running-statistics momentum (PyTorch's convention: the
    /// weight of each new batch). 0.1 for every variant: the TensorFlow-trained
    /// Lite weights used 0.01 over hundreds of thousands of ImageNet steps, but
    /// a fine-tuning run of a few hundred steps at that rate would still
    /// evaluate with mostly ImageNet's statistics (0.99^100 = 0.37).
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
}

fn default_bn_momentum() -> f64 {
    0.1
}

impl EfficientNetConfig {
    pub fn new(variant: Variant, num_classes: usize) -> Self {
        EfficientNetConfig {
            variant,
            num_classes,
            dropout: None,
            stochastic_depth: 0.2,
            tf_same_padding: variant.is_lite(),
            frozen_stages: 0,
            bn_momentum: default_bn_momentum(),
        }
    }

    /// Whether the variable `name` (torchvision's name) belongs to a frozen
    /// stage, `features.{i}.*` with `i < frozen_stages`.
    pub fn is_frozen(&self, name: &str) -> bool {
        name.strip_prefix("features.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < self.frozen_stages)
    }

    /// BatchNorm (eps, momentum). eps: torchvision's 1e-5; the TensorFlow-trained
    /// Lite weights' 1e-3.
    fn bn_config(&self) -> (f64, f64) {
        let eps = if self.variant.is_lite() { 1e-3 } else { 1e-5 };
        (eps, self.bn_momentum)
    }
}

/// One stage of MBConv blocks in B0 terms: (expand ratio, kernel, stride, in, out, repeats).
const B0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// torchvision's `_make_divisible(v, 8)`.
fn make_divisible(v: f64) -> usize {
    let d = 8.0;
    let new = ((v + d / 2.0) / d).floor().max(1.0) * d;
    let new = if new < 0.9 * v { new + d } else { new };
    new as usize
}

/// The per-stage block layout of a variant: (expand ratio, kernel, stride, in, out, repeats).
pub fn stage_layout(variant: Variant) -> Vec<(usize, usize, usize, usize, usize, usize)> {
    let (width, depth, _, _) = variant.scaling();
    B0_STAGES
        .iter()
        .map(|&(e, k, s, i, o, r)| {
            (
                e,
                k,
                s,
                make_divisible(i as f64 * width),
                make_divisible(o as f64 * width),
                (r as f64 * depth).ceil() as usize,
            )
        })
        .collect()
}

/// BatchNorm2d with PyTorch's names and semantics (biased batch variance to
/// normalise, unbiased into the running average), fused with the activation
/// that follows it (one pass forward, one backward: see `kernels::batchnorm`).
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    fn new(channels: usize, (eps, momentum): (f64, f64), vb: VarBuilder) -> Result<Self> {
        // The VarMap's own tensors, so the running averages are saved with the weights.
        let var = |name, init| -> Result<Var> {
            Var::from_tensor(&vb.get_with_hints(channels, name, init)?)
        };
        Ok(BatchNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: var("running_mean", Init::Const(0.0))?,
            running_var: var("running_var", Init::Const(1.0))?,
            eps,
            momentum,
        })
    }

    fn forward_act(&self, x: &Tensor, train: bool, act: Act) -> Result<Tensor> {
        if !train {
            return batch_norm_act_eval(
                x,
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                self.eps,
                act,
            );
        }
        let (y, mean, var) = batch_norm_act_train(x, &self.weight, &self.bias, self.eps, act)?;
        let m = self.momentum;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?)?;
        Ok(y)
    }
}

/// Randomness for training-time regularisation; `None` = evaluation mode.
pub type TrainRng<'a> = Option<&'a mut dyn rand::RngCore>;

/// A k x k convolution (no bias), BatchNorm, optional activation:
/// torchvision's `Conv2dNormActivation`, names `N.0.weight` and `N.1.*`.
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    stride: usize,
    depthwise: bool,
    tf_same: bool,
    act: Act,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        depthwise: bool,
        act: Act,
        cfg: &EfficientNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shape = if depthwise {
            (cout, 1, k, k)
        } else {
            (cout, cin, k, k)
        };
        // Kaiming normal, fan-out mode (torchvision's init); the values are
        // redrawn from the pipeline seed by `init_weights`.
        let weight = vb
            .pp("0")
            .get_with_hints(shape, "weight", Init::Const(0.0))?;
        let bn = BatchNorm::new(cout, cfg.bn_config(), vb.pp("1"))?;
        Ok(ConvBn {
            weight,
            bn,
            stride,
            depthwise,
            tf_same: cfg.tf_same_padding,
            act,
        })
    }

    /// BatchNorm's weights stay F32: it normalises in F32 and returns x's dtype.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, k, _) = self.weight.dims4()?;
        let weight = in_dtype_of(&self.weight, x)?;
        let x = if k == 1 {
            pointwise_conv2d(x, &weight)?
        } else {
            let (x, pad) = self.pad(x, k)?;
            if self.depthwise {
                depthwise_conv2d(&x, &weight, self.stride, pad)?
            } else {
                conv2d(&x, &weight, self.stride, pad)?
            }
        };
        self.bn.forward_act(&x, train, self.act)
    }

    /// Symmetric padding k/2 (torchvision), or TensorFlow's SAME padding for
    /// stride 2, which puts the extra row and column at the bottom and right.
    fn pad(&self, x: &Tensor, k: usize) -> Result<(Tensor, usize)> {
        if !(self.tf_same && self.stride == 2) {
            return Ok((x.clone(), k / 2));
        }
        let (_, _, h, w) = x.dims4()?;
        // SAME: output ceil(n / 2), total padding (out - 1) * 2 + k - n.
        let total = |n: usize| ((n.div_ceil(2) - 1) * 2 + k).saturating_sub(n);
        let (th, tw) = (total(h), total(w));
        let x = x
            .pad_with_zeros(2, th / 2, th - th / 2)?
            .pad_with_zeros(3, tw / 2, tw - tw / 2)?;
        Ok((x, 0))
    }
}

/// Squeeze-and-excitation: global average, 1x1 reduce (SiLU), 1x1 expand
/// (sigmoid), channel-wise scale. Names `fc1.*`, `fc2.*`.
struct SqueezeExcite {
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl SqueezeExcite {
    fn new(channels: usize, squeezed: usize, vb: VarBuilder) -> Result<Self> {
        // Stored as [out, in, 1, 1] like torchvision's Conv2d, used as Linear.
        let linear = |cin: usize, cout: usize, vb: VarBuilder| -> Result<candle_nn::Linear> {
            let w = vb.get_with_hints((cout, cin, 1, 1), "weight", Init::Const(0.0))?;
            let b = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
            Ok(candle_nn::Linear::new(w.reshape((cout, cin))?, Some(b)))
        };
        Ok(SqueezeExcite {
            fc1: linear(channels, squeezed, vb.pp("fc1"))?,
            fc2: linear(squeezed, channels, vb.pp("fc2"))?,
        })
    }

    /// In F32 for half-precision x (a no-op cast for F32): the squeeze is a
    /// mean over H·W and the scale's gradient a sum over H·W, which candle
    /// would add in BF16.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = widen(x)?;
        let s = xf.flatten_from(2)?.mean(D::Minus1)?;
        let s = self.fc1.forward(&s)?.silu()?;
        let s = candle_nn::ops::sigmoid(&self.fc2.forward(&s)?)?;
        xf.broadcast_mul(&s.unsqueeze(2)?.unsqueeze(3)?)?
            .to_dtype(x.dtype())
    }
}

/// Inverted residual block (MBConv).
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    residual: bool,
    /// Probability that the block is skipped for a sample in training.
    drop_prob: f64,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        expand_ratio: usize,
        k: usize,
        stride: usize,
        cin: usize,
        cout: usize,
        drop_prob: f64,
        cfg: &EfficientNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let act = if cfg.variant.is_lite() {
            Act::Relu6
        } else {
            Act::Silu
        };
        let hidden = make_divisible(cin as f64 * expand_ratio as f64);
        let mut idx = 0;
        let mut next = || {
            idx += 1;
            (idx - 1).to_string()
        };
        let expand = if expand_ratio != 1 {
            Some(ConvBn::new(
                cin,
                hidden,
                1,
                1,
                false,
                act,
                cfg,
                vb.pp(next()),
            )?)
        } else {
            None
        };
        let depthwise = ConvBn::new(hidden, hidden, k, stride, true, act, cfg, vb.pp(next()))?;
        let se = if cfg.variant.is_lite() {
            None
        } else {
            Some(SqueezeExcite::new(hidden, (cin / 4).max(1), vb.pp(next()))?)
        };
        let project = ConvBn::new(hidden, cout, 1, 1, false, Act::Identity, cfg, vb.pp(next()))?;
        Ok(MbConv {
            expand,
            depthwise,
            se,
            project,
            residual: stride == 1 && cin == cout,
            drop_prob,
        })
    }

    fn forward_t(&self, x: &Tensor, rng: &mut TrainRng) -> Result<Tensor> {
        let train = rng.is_some();
        let mut h = match &self.expand {
            Some(e) => e.forward_t(x, train)?,
            None => x.clone(),
        };
        h = self.depthwise.forward_t(&h, train)?;
        if let Some(se) = &self.se {
            h = se.forward(&h)?;
        }
        h = self.project.forward_t(&h, train)?;
        if !self.residual {
            return Ok(h);
        }
        if let Some(rng) = rng.as_deref_mut()
            && self.drop_prob > 0.0
        {
            h = h.broadcast_mul(
                &keep_mask(h.dim(0)?, 1, self.drop_prob, rng, h.device())?
                    .to_dtype(h.dtype())?
                    .unsqueeze(2)?
                    .unsqueeze(3)?,
            )?;
        }
        h + x
    }
}

/// A [rows, cols] mask of 0 or 1/(1-p) (inverted dropout), drawn from `rng`.
fn keep_mask(
    rows: usize,
    cols: usize,
    p: f64,
    rng: &mut dyn rand::RngCore,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let scale = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    Tensor::from_vec(v, (rows, cols), device)
}

pub struct EfficientNet {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    classifier: candle_nn::Linear,
    dropout: f64,
    /// MBConv blocks inside the frozen stages (see `frozen_stages`).
    frozen_blocks: usize,
    pub config: EfficientNetConfig,
}

impl EfficientNet {
    pub fn new(cfg: &EfficientNetConfig, vb: VarBuilder) -> Result<Self> {
        let (width, _, _, dropout) = cfg.variant.scaling();
        let lite = cfg.variant.is_lite();
        let act = if lite { Act::Relu6 } else { Act::Silu };
        let layout = stage_layout(cfg.variant);
        let features = vb.pp("features");
        // Lite keeps the stem and head widths fixed whatever the width multiplier.
        let stem_out = if lite {
            32
        } else {
            make_divisible(32.0 * width)
        };
        let stem = ConvBn::new(3, stem_out, 3, 2, false, act, cfg, features.pp("0"))?;
        let total: usize = layout.iter().map(|s| s.5).sum();
        if cfg.frozen_stages > layout.len() + 1 {
            candle_core::bail!(
                "frozen_stages {} > {}: the head convolution and the classifier always train",
                cfg.frozen_stages,
                layout.len() + 1
            );
        }
        let frozen_blocks = layout
            .iter()
            .take(cfg.frozen_stages.saturating_sub(1))
            .map(|s| s.5)
            .sum();
        let mut blocks = Vec::with_capacity(total);
        for (si, &(e, k, s, cin, cout, repeats)) in layout.iter().enumerate() {
            for j in 0..repeats {
                let (cin, stride) = if j == 0 { (cin, s) } else { (cout, 1) };
                let drop_prob = cfg.stochastic_depth * blocks.len() as f64 / total as f64;
                let vb = features
                    .pp((si + 1).to_string())
                    .pp(j.to_string())
                    .pp("block");
                blocks.push(MbConv::new(e, k, stride, cin, cout, drop_prob, cfg, vb)?);
            }
        }
        let last = layout[6].4;
        let head_out = if lite { 1280 } else { 4 * last };
        let head = ConvBn::new(last, head_out, 1, 1, false, act, cfg, features.pp("8"))?;
        let cls = vb.pp("classifier").pp("1");
        let w = cls.get_with_hints((cfg.num_classes, head_out), "weight", Init::Const(0.0))?;
        let b = cls.get_with_hints(cfg.num_classes, "bias", Init::Const(0.0))?;
        Ok(EfficientNet {
            stem,
            blocks,
            head,
            classifier: candle_nn::Linear::new(w, Some(b)),
            dropout: cfg.dropout.unwrap_or(dropout),
            frozen_blocks,
            config: cfg.clone(),
        })
    }

    /// Logits [B, num_classes] for images [B, 3, H, W] (ImageNet-normalised).
    /// With `rng`, the model is in training mode: BatchNorm uses and updates
    /// batch statistics, dropout and stochastic depth draw from `rng`.
    pub fn forward_t(&self, x: &Tensor, mut rng: TrainRng) -> Result<Tensor> {
        let mut pooled = self.pooled_t(x, &mut rng)?;
        if let Some(rng) = rng
            && self.dropout > 0.0
        {
            pooled = pooled.mul(&keep_mask(
                pooled.dim(0)?,
                pooled.dim(1)?,
                self.dropout,
                rng,
                pooled.device(),
            )?)?;
        }
        self.classifier.forward(&pooled)
    }

    /// The globally average-pooled output of the last convolution [B, C]
    /// (1280 for B0 and Lite0) in evaluation mode: what the head sees, as
    /// image features (FID-style measures, linear probes).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.pooled_t(x, &mut None)
    }

    /// Stem, blocks, head convolution and global average pooling: [B, C],
    /// pooled in F32 for half-precision input.
    fn pooled_t(&self, x: &Tensor, rng: &mut TrainRng) -> Result<Tensor> {
        let train = rng.is_some();
        let (prefix, rest) = self.blocks.split_at(self.frozen_blocks);
        let mut h = if self.config.frozen_stages > 0 {
            // The frozen stem and blocks always run as in evaluation (which is
            // what evaluation runs anyway); autograd stops at their output.
            let mut h = self.stem.forward_t(x, false)?;
            for b in prefix {
                h = b.forward_t(&h, &mut None)?;
            }
            h.detach()
        } else {
            self.stem.forward_t(x, train)?
        };
        for b in rest {
            h = b.forward_t(&h, rng)?;
        }
        h = self.head.forward_t(&h, train)?;
        widen(&h)?.flatten_from(2)?.mean(D::Minus1)
    }
}

/// Draws every weight from the seed, in name order: convolutions Kaiming
/// normal (fan-out), the classifier uniform(+-1/sqrt(out)), BatchNorm
/// weight 1 / bias 0 / running mean 0 / running var 1, other biases 0
/// (torchvision's `EfficientNet.__init__`).
pub fn init_weights(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n = var.elem_count();
        // The only one-dimensional weights are BatchNorm scales.
        let values: Vec<f32> =
            if name.ends_with("running_var") || (dims.len() == 1 && name.ends_with(".weight")) {
                vec![1.0; n]
            } else if name.ends_with(".bias") || name.ends_with("running_mean") {
                vec![0.0; n]
            } else if name.starts_with("classifier") {
                let r = 1.0 / (dims[0] as f32).sqrt();
                (0..n).map(|_| rng.random_range(-r..r)).collect()
            } else {
                // Kaiming normal, fan_out = out channels x kernel area.
                let fan_out = dims[0] * dims[2..].iter().product::<usize>();
                let std = (2.0 / fan_out as f32).sqrt();
                (0..n)
                    .map(|_| std * super::init::standard_normal(&mut rng))
                    .collect()
            };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Redraws the head as PyTorch's default `nn.Linear` (uniform within
/// +-1/sqrt(in_features), bias 0), as one does when replacing a pretrained
/// model's classifier. torchvision's rule (+-1/sqrt(out_features)) suits
/// training from scratch, but on pretrained features it makes the first
/// logits tens of units large and fine-tuning starts from saturation.
pub fn init_head_for_finetuning(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    let data = varmap.data().lock().expect("varmap lock");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4EAD);
    let w = &data["classifier.1.weight"];
    let r = 1.0 / (w.dims()[1] as f32).sqrt();
    let v: Vec<f32> = (0..w.elem_count())
        .map(|_| rng.random_range(-r..r))
        .collect();
    w.set(&Tensor::from_vec(v, w.shape(), w.device())?)?;
    let b = &data["classifier.1.bias"];
    b.set(&b.zeros_like()?)?;
    Ok(())
}

/// What loading pretrained weights did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub loaded: usize,
    /// Variables left at their initial values (the new head, when its shape differs).
    pub kept_initial: Vec<String>,
}

/// Copies a torchvision-layout state dict into the model's variables. Every
/// feature variable must be present with the right shape; the classifier is
/// taken only when its shape matches (a 1000-class ImageNet head does not fit a
/// one-logit head and stays freshly initialised).
pub fn load_pretrained(
    varmap: &candle_nn::VarMap,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> std::result::Result<LoadReport, String> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut report = LoadReport {
        loaded: 0,
        kept_initial: vec![],
    };
    for name in names {
        let var = &data[name];
        match tensors.get(name.as_str()) {
            Some(t) if t.dims() == var.dims() => {
                let t = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(|e| e.to_string())?;
                var.set(&t).map_err(|e| e.to_string())?;
                report.loaded += 1;
            }
            other if name.starts_with("classifier") => {
                let _ = other;
                report.kept_initial.push(name.clone());
            }
            Some(t) => {
                return Err(format!(
                    "`{name}` has shape {:?} in the weights file, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ));
            }
            None => return Err(format!("`{name}` is missing from the weights file")),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
