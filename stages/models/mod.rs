//! Neural network models in candle, written the candle-nn way: a model is a
//! struct of layers built by `new(cfg, vb)`, weight names scoped with
//! `vb.pp(..)` to match the PyTorch reference implementations, `impl Module`.

pub mod adam;
pub mod cyclegan;
pub mod efficientnet;
pub mod init;
pub mod kernels;
pub mod layers;
pub mod precision;
