//! The `melanoflow` binary: the engine's CLI with this crate's stage kinds.

fn main() -> std::process::ExitCode {
    melanoflow_pipeline::cli::main(melanoflow::registry())
}
