//! Neural network models in candle, written the candle-nn way: a model is a
//! struct of layers built by `new(cfg, vb)`, weight names scoped with
//! `vb.pp(..)` to match the PyTorch reference implementations, `impl Module`.

pub mod cyclegan;
pub mod init;
pub mod layers;
