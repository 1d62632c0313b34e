use super::*;
use candle_core::Device;
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// `noise` and `value` of tests/reference/efficientnet_reference.py.
fn noise(a: f64) -> f64 {
    let v = a.sin() * 43758.5453;
    2.0 * (v - v.floor()) - 1.0
}

fn value(name: &str, k: usize, i: usize, dims: &[usize]) -> f64 {
    let s = noise(0.37 * i as f64 + 0.11 * k as f64 + 1.0);
    if name.ends_with("running_var") {
        1.0 + 0.5 * s.abs()
    } else if name.ends_with("running_mean") || name.ends_with("bias") {
        0.1 * s
    } else if dims.len() == 1 {
        1.0 + 0.1 * s
    } else {
        s * 3.0 / (dims[1..].iter().product::<usize>() as f64).sqrt()
    }
}

fn reference_model(variant: Variant) -> (VarMap, EfficientNet) {
    let vm = VarMap::new();
    let cfg = EfficientNetConfig {
        dropout: Some(0.0),
        stochastic_depth: 0.0,
        ..EfficientNetConfig::new(variant, 1)
    };
    let model =
        EfficientNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (k, name) in names.into_iter().enumerate() {
            let var = &data[name];
            let v: Vec<f32> = (0..var.elem_count())
                .map(|i| value(name, k, i, var.dims()) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    (vm, model)
}

fn input() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 64 * 64)
        .map(|i| noise(0.05 * i as f64) as f32)
        .collect();
    Tensor::from_vec(v, (2, 3, 64, 64), &Device::Cpu).unwrap()
}

/// Logits from tests/reference/efficientnet_reference.py (torch 2.x,
/// torchvision 0.29 `efficientnet_b0(num_classes=1, dropout=0,
/// stochastic_depth_prob=0)`, every tensor set by the formula above).
#[test]
fn b0_forward_matches_torchvision_in_eval_and_train_mode() {
    let (vm, model) = reference_model(Variant::B0);
    // torchvision's parameter count, plus BatchNorm buffers (which candle keeps as variables).
    assert_eq!(
        vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
        4_008_829 + bn_buffer_count(&vm)
    );
    let x = input();
    let eval: Vec<f32> = model
        .forward_t(&x, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in eval.iter().zip([0.160_057_93_f32, 0.162_367_02]) {
        assert!((got - want).abs() < 2e-5, "eval logits {eval:?}");
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let train: Vec<f32> = model
        .forward_t(&x, Some(&mut rng))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in train.iter().zip([0.234_746_47_f32, 0.531_991_8]) {
        assert!((got - want).abs() < 2e-4, "train logits {train:?}");
    }
    // The training pass moved the running mean like PyTorch's (momentum 0.1).
    let data = vm.data().lock().unwrap();
    let rm: Vec<f32> = data["features.0.1.running_mean"]
        .as_tensor()
        .narrow(0, 0, 4)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in rm.iter().zip([
        0.045_436_986_f32,
        0.021_913_748,
        0.009_020_329,
        -0.016_324_783,
    ]) {
        assert!((got - want).abs() < 1e-5, "running mean {rm:?}");
    }
}

/// Elements of BatchNorm running statistics (buffers in PyTorch, not parameters).
fn bn_buffer_count(vm: &VarMap) -> usize {
    let data = vm.data().lock().unwrap();
    data.iter()
        .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
        .map(|(_, v)| v.elem_count())
        .sum()
}

#[test]
fn frozen_stages_pass_no_gradient_and_keep_their_statistics() {
    // features[..4]: the stem and the MBConv stages 1-3 (5 blocks of Lite0).
    let frozen_cfg = EfficientNetConfig {
        dropout: Some(0.0),
        stochastic_depth: 0.0,
        frozen_stages: 4,
        ..EfficientNetConfig::new(Variant::Lite0, 1)
    };
    let (vm, plain) = reference_model(Variant::Lite0);
    let frozen = EfficientNet::new(
        &frozen_cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(frozen.frozen_blocks, 1 + 2 + 2);
    let snapshot = |vm: &VarMap| -> BTreeMap<String, Vec<f32>> {
        let data = vm.data().lock().unwrap();
        data.iter()
            .map(|(n, v)| (n.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let x = input();
    // Evaluation does not depend on freezing.
    let eval = |m: &EfficientNet| -> Vec<f32> {
        m.forward_t(&x, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(eval(&plain), eval(&frozen));

    let before = snapshot(&vm);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let loss = frozen
        .forward_t(&x, Some(&mut rng))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let after = snapshot(&vm);
    let data = vm.data().lock().unwrap();
    let (mut frozen_vars, mut trained_vars) = (0, 0);
    for (name, var) in data.iter() {
        let statistic = name.ends_with("running_mean") || name.ends_with("running_var");
        if frozen_cfg.is_frozen(name) {
            frozen_vars += 1;
            assert!(grads.get(var).is_none(), "{name} got a gradient");
            assert_eq!(before[name], after[name], "{name} moved");
        } else if !statistic {
            trained_vars += 1;
            assert!(grads.get(var).is_some(), "{name} got no gradient");
        } else if name.starts_with("features.8") {
            // The head's BatchNorm still learns its running statistics.
            assert_ne!(before[name], after[name], "{name} did not move");
        }
    }
    assert!(frozen_vars > 0 && trained_vars > 0);
    assert!(frozen_cfg.is_frozen("features.3.1.block.0.0.weight"));
    assert!(!frozen_cfg.is_frozen("features.4.0.block.0.0.weight"));
    assert!(!frozen_cfg.is_frozen("classifier.1.weight"));
}

#[test]
fn variants_have_torchvision_widths_and_lite0_has_the_converter_names() {
    let widths = |v| {
        stage_layout(v)
            .iter()
            .map(|s| (s.4, s.5))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        widths(Variant::B0),
        [
            (16, 1),
            (24, 2),
            (40, 2),
            (80, 3),
            (112, 3),
            (192, 4),
            (320, 1)
        ]
    );
    // torchvision efficientnet_b4: 24, 32, 56, 112, 160, 272, 448 with 2,4,4,6,6,8,2 blocks.
    assert_eq!(
        widths(Variant::B4),
        [
            (24, 2),
            (32, 4),
            (56, 4),
            (112, 6),
            (160, 6),
            (272, 8),
            (448, 2)
        ]
    );
    let (vm, _) = reference_model(Variant::Lite0);
    let data = vm.data().lock().unwrap();
    for name in [
        "features.1.0.block.0.0.weight",
        "features.1.0.block.1.0.weight",
        "features.2.0.block.2.1.running_var",
        "features.8.0.weight",
        "classifier.1.weight",
    ] {
        assert!(data.contains_key(name), "{name}");
    }
    assert!(
        !data.keys().any(|n| n.contains("fc1")),
        "Lite0 has no squeeze-excitation"
    );
    assert_eq!(data["features.8.0.weight"].dims(), [1280, 320, 1, 1]);
}

#[test]
fn tf_same_padding_pads_bottom_right_for_stride_two() {
    let vm = VarMap::new();
    let cfg = EfficientNetConfig::new(Variant::Lite0, 1);
    let conv = ConvBn::new(
        1,
        1,
        3,
        2,
        false,
        Act::Identity,
        &cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let (p, pad) = conv.pad(&x, 3).unwrap();
    assert_eq!((p.dims4().unwrap(), pad), ((1, 1, 5, 5), 0));
    let rows: Vec<Vec<f32>> = p.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    assert_eq!(
        rows[0],
        [1., 1., 1., 1., 0.],
        "no padding on top/left, one on bottom/right"
    );
    assert_eq!(rows[4], [0.; 5]);
}

// -----------------------------------------------------------------------
// Mixed precision (`models::precision`)
// -----------------------------------------------------------------------

/// A B0 with the seed's weights (dropout and stochastic depth on), and a
/// batch of `n` (2 or 4) noise images at 32 px with their targets.
fn tiny_b0(n: usize) -> (VarMap, EfficientNet, Tensor, Tensor) {
    let vm = VarMap::new();
    let model = EfficientNet::new(
        &EfficientNetConfig::new(Variant::B0, 1),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_weights(&vm, 3).unwrap();
    let x: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| noise(0.37 * i as f64 + 0.5) as f32)
        .collect();
    let x = Tensor::from_vec(x, (n, 3, 32, 32), &Device::Cpu).unwrap();
    let t = Tensor::new(&[1f32, 0., 0., 1.][..n], &Device::Cpu).unwrap();
    (vm, model, x, t)
}

/// The BCE loss of the model on `x` computed in `dtype` (training mode
/// with `rng`), and its gradients.
fn loss_and_grads(
    model: &EfficientNet,
    (x, t): (&Tensor, &Tensor),
    dtype: DType,
    rng: TrainRng,
) -> (f64, candle_core::backprop::GradStore) {
    let logits = model
        .forward_t(&x.to_dtype(dtype).unwrap(), rng)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(logits.dtype(), DType::F32, "logits are F32");
    let loss = crate::train_classifier::train::bce_with_logits(&logits, t).unwrap();
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, loss.backward().unwrap())
}

/// Trainable variables (not BatchNorm's running statistics), as the stage
/// hands them to Adam.
fn trainable(vm: &VarMap) -> Vec<(String, Var)> {
    crate::models::adam::named_vars("", vm)
        .into_iter()
        .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .collect()
}

/// The comparison runs in evaluation mode. In training mode a deep
/// BatchNorm network at initialisation is chaotic (Yang et al. 2019, "A
/// mean field theory of batch normalization"): rounding only the input
/// images to BF16, everything else F32, moves this B0's logits by up to
/// 0.12 at batch 4, so a training-mode comparison would measure that,
/// not BF16's arithmetic. Evaluation mode, with the running statistics
/// moved towards the batch's by 6 F32 training passes, is the same
/// network and BF16 arithmetic with BatchNorm frozen. Measured there:
/// the loss within 0.03%, every weight's gradient within 7% relative L2
/// (most within 2-3%: each gradient is a sum over rounded activations
/// and rounded output gradients, and at initialisation those sums cancel
/// heavily). The bounds (1%, 15%) catch a layer that is wrong or a
/// gradient that does not flow. Training mode's BF16 step is checked by
/// the determinism test below, which also checks what stays F32.
#[test]
fn bf16_matches_f32_in_evaluation_mode() {
    const LOSS_TOLERANCE: f64 = 0.01;
    const GRAD_TOLERANCE: f64 = 0.15;
    let (vm, model, x, t) = tiny_b0(4);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    for _ in 0..6 {
        model.forward_t(&x, Some(&mut rng)).unwrap();
    }
    let (want, want_grads) = loss_and_grads(&model, (&x, &t), DType::F32, None);
    let (got, got_grads) = loss_and_grads(&model, (&x, &t), DType::BF16, None);
    let rel = (got - want).abs() / want.abs();
    println!("loss: f32 {want:.6} bf16 {got:.6} relative difference {rel:.2e}");
    assert!(rel <= LOSS_TOLERANCE, "loss {want} vs {got}");
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let mut worst = (0f64, String::new());
    for (name, var) in trainable(&vm) {
        let (w, g) = (want_grads.get(&var).unwrap(), got_grads.get(&var).unwrap());
        assert_eq!(
            g.dtype(),
            DType::F32,
            "{name}: the gradient reaches the F32 variable"
        );
        let rel = (norm(&(g - w).unwrap()) / norm(w).max(1e-30)).sqrt();
        assert!(rel <= GRAD_TOLERANCE, "{name}: relative L2 error {rel:.2e}");
        if rel > worst.0 {
            worst = (rel, name);
        }
    }
    println!(
        "largest relative gradient error: {:.2e} ({})",
        worst.0, worst.1
    );
}

/// A BF16 training step (batch 2: BatchNorm's batch statistics, dropout
/// and stochastic depth on) gives the same bytes at 1, 2 and 7 threads,
/// and leaves the variables, BatchNorm's running statistics and Adam's
/// moments F32.
#[test]
fn a_bf16_step_is_deterministic_and_keeps_f32_master_weights() {
    use crate::models::adam::{Adam, named_vars};
    crate::models::kernels::testing::assert_same_bits_at_any_thread_count("bf16 B0 step", || {
        let (vm, model, x, t) = tiny_b0(2);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
        let (loss, grads) = loss_and_grads(&model, (&x, &t), DType::BF16, Some(&mut rng));
        assert!(loss.is_finite());
        let mut adam = Adam::new(trainable(&vm), 1e-3, 0.9, 0.999).unwrap();
        adam.step(&grads).unwrap();
        for (name, moment) in adam.state("") {
            assert_eq!(moment.dtype(), DType::F32, "{name}");
        }
        for (name, var) in named_vars("", &vm) {
            assert_eq!(var.dtype(), DType::F32, "{name}");
        }
        let weights: Vec<Tensor> = named_vars("", &vm)
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap())
            .collect();
        vec![
            ("loss", Tensor::new(&[loss as f32], &Device::Cpu).unwrap()),
            ("weights", Tensor::cat(&weights, 0).unwrap()),
        ]
    });
}
