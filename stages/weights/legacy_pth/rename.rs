//! `efficientnet_pytorch` (lukemelas) parameter names -> torchvision's `efficientnet_b*`.

/// Blocks per stage of EfficientNet-B0, and of EfficientNet-Lite0 (same depth coefficient).
pub const EFFICIENTNET_B0_REPEATS: [usize; 7] = [1, 2, 2, 3, 3, 4, 1];
/// MBConv expand ratio per stage of EfficientNet-B0 and -Lite0.
pub const EFFICIENTNET_B0_EXPAND_RATIOS: [usize; 7] = [1, 6, 6, 6, 6, 6, 6];

/// Maps an `efficientnet_pytorch` parameter name to torchvision's `efficientnet_b*` naming;
/// `None` for a name that is not a weight of that architecture.
///
/// `repeats[s]` is the number of blocks in stage `s + 1` and `expand_ratios[s]` their expand
/// ratio (both [`EFFICIENTNET_B0_REPEATS`]/[`EFFICIENTNET_B0_EXPAND_RATIOS`] for B0 and
/// Lite0); `has_se` is false for the Lite variants, which drop squeeze-and-excitation.
/// `efficientnet_pytorch` numbers blocks flat (`_blocks.N`); torchvision nests them as
/// `features.{stage}.{index in stage}.block.{k}`, where `k` counts only the sub-modules the
/// block has, in order: expand conv (expand ratio != 1), depthwise conv, SE (if any),
/// project conv. Stem is `features.0`, head `features.{stages + 1}`, the linear layer
/// `classifier.1` (after the dropout at `classifier.0`).
pub fn efficientnet_pytorch_to_torchvision(
    name: &str,
    repeats: &[usize],
    expand_ratios: &[usize],
    has_se: bool,
) -> Option<String> {
    const BN: [&str; 5] = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ];
    let is_bn = |p: &str| BN.contains(&p);
    let is_linear = |p: &str| p == "weight" || p == "bias";
    let head_stage = repeats.len() + 1;

    let (module, param) = name.split_once('.')?;
    match module {
        "_conv_stem" if param == "weight" => Some("features.0.0.weight".to_owned()),
        "_bn0" if is_bn(param) => Some(format!("features.0.1.{param}")),
        "_conv_head" if param == "weight" => Some(format!("features.{head_stage}.0.weight")),
        "_bn1" if is_bn(param) => Some(format!("features.{head_stage}.1.{param}")),
        "_fc" if is_linear(param) => Some(format!("classifier.1.{param}")),
        "_blocks" => {
            if expand_ratios.len() != repeats.len() {
                return None;
            }
            let (index, rest) = param.split_once('.')?;
            // Only canonical decimal indices: "01" or "+1" would be a different module name.
            if index.is_empty()
                || !index.bytes().all(|b| b.is_ascii_digit())
                || (index.len() > 1 && index.starts_with('0'))
            {
                return None;
            }
            let mut flat: usize = index.parse().ok()?;
            let mut stage = None;
            for (s, &n) in repeats.iter().enumerate() {
                if flat < n {
                    stage = Some((s, flat));
                    break;
                }
                flat -= n;
            }
            let (s, j) = stage?;
            let expands = expand_ratios[s] != 1;

            // torchvision's MBConv appends sub-modules only when present, so indices shift.
            let mut next = 0usize;
            let mut take = |present: bool| {
                present.then(|| {
                    next += 1;
                    next - 1
                })
            };
            let expand = take(expands);
            let depthwise = take(true)?;
            let se = take(has_se);
            let project = take(true)?;

            let (part, p) = rest.split_once('.')?;
            let sub = match part {
                "_expand_conv" if p == "weight" => format!("{}.0.weight", expand?),
                "_bn0" if is_bn(p) => format!("{}.1.{p}", expand?),
                "_depthwise_conv" if p == "weight" => format!("{depthwise}.0.weight"),
                "_bn1" if is_bn(p) => format!("{depthwise}.1.{p}"),
                "_se_reduce" if is_linear(p) => format!("{}.fc1.{p}", se?),
                "_se_expand" if is_linear(p) => format!("{}.fc2.{p}", se?),
                "_project_conv" if p == "weight" => format!("{project}.0.weight"),
                "_bn2" if is_bn(p) => format!("{project}.1.{p}"),
                _ => return None,
            };
            Some(format!("features.{}.{j}.block.{sub}", s + 1))
        }
        _ => None,
    }
}
