//! The `melanoflow` binary: the engine's CLI with this crate's stage kinds
//! and application commands.

use melanoflow_pipeline::cli::{AppCommand, main_with};

fn main() -> std::process::ExitCode {
    melanoflow::tune_threads();
    melanoflow::tune_allocator();
    main_with(
        melanoflow::registry(),
        &[
            AppCommand {
                name: "metrics",
                about: "Print the comparison table of the last evaluate run",
                run: melanoflow::evaluate::metrics_command,
            },
            AppCommand {
                name: "report",
                about: "One HTML page comparing experiments: metrics, paired tests, ROC curves",
                run: melanoflow::exp_report::report_command,
            },
            AppCommand {
                name: "convert-weights",
                about: "Convert legacy PyTorch EfficientNet weights to safetensors (make weights)",
                run: melanoflow::weights::convert_command,
            },
            AppCommand {
                name: "gpu-check",
                about: "Compare training steps on CPU and GPU, time them (scripts/gpu-check.sh)",
                run: melanoflow::gpu_check::gpu_check_command,
            },
        ],
    )
}
