//! The CycleGAN networks of the paper: a ResNet generator and a PatchGAN
//! discriminator, as in pytorch-CycleGAN-and-pix2pix (`ResnetGenerator`,
//! `NLayerDiscriminator`, instance norm without affine parameters, biases on
//! every conv), with the paper's change: LeakyReLU everywhere in the
//! generator, slope a parameter.
//!
//! Both networks compute in their input's dtype (F32, or BF16 with F32
//! weights: see `precision`) and return it.
//!
//! Weight names follow the reference's `nn.Sequential` indices (`model.1.weight`,
//! `model.10.conv_block.1.weight`, ...), so a saved safetensors file loads
//! into the PyTorch reference model with `load_state_dict`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{
    Conv, ConvT, instance_norm, instance_norm_leaky_relu, leaky_relu, upsample_nearest2x,
};

/// How the generator doubles resolution on the way up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upsample {
    /// Stride-2 transposed convolution (the reference).
    Transposed,
    /// Nearest-neighbour upsampling then a 3x3 convolution (no checkerboard
    /// artefacts). The conv keeps the transposed conv's name slot.
    NearestConv,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    pub ngf: usize,
    pub n_blocks: usize,
    pub upsample: Upsample,
    /// LeakyReLU slope (0.01 in the paper's notebooks; 0.2 is common for GANs).
    pub slope: f64,
}

#[derive(Clone, Debug)]
enum Up {
    Transposed(ConvT),
    NearestConv(Conv),
}

impl Up {
    fn new(kind: Upsample, cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            Upsample::Transposed => Up::Transposed(ConvT::new(cin, cout, vb)?),
            Upsample::NearestConv => Up::NearestConv(Conv::new(cin, cout, 3, 1, 1, vb)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Up::Transposed(c) => c.forward(x),
            Up::NearestConv(c) => c.forward(&upsample_nearest2x(x)?),
        }
    }
}

#[derive(Clone, Debug)]
struct ResBlock {
    conv1: Conv,
    conv2: Conv,
}

impl ResBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("conv_block");
        Ok(ResBlock {
            conv1: Conv::reflect_padded(dim, dim, 3, 1, vb.pp(1))?,
            conv2: Conv::reflect_padded(dim, dim, 3, 1, vb.pp(5))?,
        })
    }

    fn forward(&self, x: &Tensor, slope: f64) -> Result<Tensor> {
        let y = instance_norm_leaky_relu(&self.conv1.forward(x)?, slope)?;
        let y = instance_norm(&self.conv2.forward(&y)?)?;
        x + y
    }
}

/// The ResNet generator: 7x7 stem, two stride-2 downsamplings, `n_blocks`
/// residual blocks, two upsamplings, 7x7 to RGB, tanh.
#[derive(Clone, Debug)]
pub struct Generator {
    stem: Conv,
    down: [Conv; 2],
    blocks: Vec<ResBlock>,
    up: [Up; 2],
    head: Conv,
    slope: f64,
}

impl Generator {
    pub fn new(cfg: &GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        let (ngf, nb) = (cfg.ngf, cfg.n_blocks);
        let m = vb.pp("model");
        Ok(Generator {
            stem: Conv::reflect_padded(3, ngf, 7, 3, m.pp(1))?,
            down: [
                Conv::new(ngf, 2 * ngf, 3, 2, 1, m.pp(4))?,
                Conv::new(2 * ngf, 4 * ngf, 3, 2, 1, m.pp(7))?,
            ],
            blocks: (0..nb)
                .map(|i| ResBlock::new(4 * ngf, m.pp(10 + i)))
                .collect::<Result<_>>()?,
            up: [
                Up::new(cfg.upsample, 4 * ngf, 2 * ngf, m.pp(10 + nb))?,
                Up::new(cfg.upsample, 2 * ngf, ngf, m.pp(13 + nb))?,
            ],
            head: Conv::reflect_padded(ngf, 3, 7, 3, m.pp(17 + nb))?,
            slope: cfg.slope,
        })
    }
}

impl Module for Generator {
    /// [B, 3, H, W] in [-1, 1] -> [B, 3, H, W] in [-1, 1]; H and W multiples of 4.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let act = |t: Tensor| instance_norm_leaky_relu(&t, self.slope);
        let mut y = act(self.stem.forward(x)?)?; // [B, ngf, H, W]
        for d in &self.down {
            y = act(d.forward(&y)?)?; // [B, 2ngf, H/2, W/2], then [B, 4ngf, H/4, W/4]
        }
        for b in &self.blocks {
            y = b.forward(&y, self.slope)?;
        }
        for u in &self.up {
            y = act(u.forward(&y)?)?; // back to [B, ngf, H, W]
        }
        self.head.forward(&y)?.tanh()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscriminatorConfig {
    pub ndf: usize,
    /// Stride-2 layers after the first (3 in the reference: a 70x70 PatchGAN).
    pub n_layers: usize,
}

/// The PatchGAN discriminator: 4x4 convs, LeakyReLU 0.2, one real/fake score
/// per overlapping patch.
#[derive(Clone, Debug)]
pub struct Discriminator {
    /// (conv, followed by instance norm)
    layers: Vec<(Conv, bool)>,
    head: Conv,
}

impl Discriminator {
    pub fn new(cfg: &DiscriminatorConfig, vb: VarBuilder) -> Result<Self> {
        let (m, ndf) = (vb.pp("model"), cfg.ndf);
        // Reference indices: conv 0 (stride 2, no norm); for n in 1..n_layers a
        // stride-2 conv at 3n - 1 (+ IN, LeakyReLU); a stride-1 conv at
        // 3 n_layers - 1; the 1-channel head at 3 n_layers + 2.
        let mut layers = vec![(Conv::new(3, ndf, 4, 2, 1, m.pp(0))?, false)];
        let mut mult = 1;
        for n in 1..=cfg.n_layers {
            let prev = mult;
            mult = (1 << n).min(8);
            let stride = if n == cfg.n_layers { 1 } else { 2 };
            layers.push((
                Conv::new(ndf * prev, ndf * mult, 4, stride, 1, m.pp(3 * n - 1))?,
                true,
            ));
        }
        Ok(Discriminator {
            layers,
            head: Conv::new(ndf * mult, 1, 4, 1, 1, m.pp(3 * cfg.n_layers + 2))?,
        })
    }

    /// This discriminator with its parameters detached (see
    /// [`Conv::frozen`]): the generators' step trains through it without
    /// computing the discriminator's weight gradients, which that step
    /// would drop (PyTorch's reference turns `requires_grad` off for it).
    pub fn frozen(&self) -> Discriminator {
        Discriminator {
            layers: self
                .layers
                .iter()
                .map(|(c, norm)| (c.frozen(), *norm))
                .collect(),
            head: self.head.frozen(),
        }
    }
}

impl Module for Discriminator {
    /// [B, 3, H, W] -> [B, 1, h, w] patch scores (h = H/8 - 2 for 3 layers).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for (conv, norm) in &self.layers {
            y = conv.forward(&y)?;
            y = if *norm {
                instance_norm_leaky_relu(&y, 0.2)?
            } else {
                leaky_relu(&y, 0.2)?
            };
        }
        self.head.forward(&y)
    }
}
