//! Pretrained weights: reading PyTorch's legacy `.pth` format without torch
//! and renaming `efficientnet_pytorch` parameters to torchvision's layout
//! (`legacy_pth`), and the `melanoflow convert-weights` command over it.

pub mod legacy_pth;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use melanoflow_pipeline::BoxError;
use melanoflow_pipeline::cli::AppInvocation;

use legacy_pth::{
    EFFICIENTNET_B0_EXPAND_RATIOS, EFFICIENTNET_B0_REPEATS, convert,
    efficientnet_pytorch_to_torchvision,
};

/// Convert PyTorch legacy-format EfficientNet weights to safetensors (torchvision names).
#[derive(Parser, Debug)]
#[command(name = "convert-weights")]
struct Args {
    /// Naming of the source file: only `efficientnet-pytorch` (lukemelas' package and its Lite ports).
    #[arg(long, default_value = "efficientnet-pytorch")]
    from: String,
    /// `lite0` (no squeeze-excitation) or `b0` (with it).
    #[arg(long, default_value = "lite0")]
    variant: String,
    /// The legacy `.pth` file.
    src: PathBuf,
    /// The safetensors file to write (atomically).
    dst: PathBuf,
}

pub fn convert_command(inv: &AppInvocation) -> Result<ExitCode, BoxError> {
    let args = Args::try_parse_from(inv.args)?;
    if args.from != "efficientnet-pytorch" {
        return Err(format!(
            "--from `{}`: only `efficientnet-pytorch` naming is supported",
            args.from
        )
        .into());
    }
    let has_se = match args.variant.as_str() {
        "lite0" => false,
        "b0" => true,
        other => return Err(format!("--variant `{other}`: expected `lite0` or `b0`").into()),
    };
    let report = convert(&args.src, &args.dst, |name| {
        efficientnet_pytorch_to_torchvision(
            name,
            &EFFICIENTNET_B0_REPEATS,
            &EFFICIENTNET_B0_EXPAND_RATIOS,
            has_se,
        )
    })?;
    if !inv.quiet {
        println!(
            "wrote {}: {} tensors, {} values, {} bytes",
            args.dst.display(),
            report.tensors,
            report.parameters,
            report.bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}
