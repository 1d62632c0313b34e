//! Image features for the fidelity measures: the global-average-pooled
//! output of an EfficientNet's last convolution (1280 values for Lite0),
//! with pretrained weights, in evaluation mode.
//!
//! Images are resampled to the model's side exactly as the classifier's
//! evaluation does (bilinear, `train_classifier::augment::warp` with the
//! identity) and ImageNet-normalised. Batches are formed in the caller's
//! order with a fixed size, so the same images and weights give the same
//! features whatever the thread count.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::linalg::Mat;
use crate::imageset::{ImageRecord, ImageSet};
use crate::models::efficientnet::{
    EfficientNet, EfficientNetConfig, Variant, init_weights, load_pretrained,
};
use crate::train_classifier::augment::{Affine, push_normalised_chw, warp};

pub struct Extractor {
    model: EfficientNet,
    /// Side of the images fed to the model.
    pub side: usize,
    pub batch_size: usize,
    device: Device,
    /// Width of a feature vector.
    pub dims: usize,
}

impl Extractor {
    /// A model of `variant` with every feature variable from `weights` (a
    /// torchvision-layout state dict). The head is not used.
    pub fn new(
        variant: Variant,
        weights: &HashMap<String, Tensor>,
        side: usize,
        batch_size: usize,
        device: &Device,
    ) -> Result<Extractor> {
        let varmap = VarMap::new();
        let model = EfficientNet::new(
            &EfficientNetConfig::new(variant, 1),
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        // Nothing is left to candle's unseeded initialisation, even the unused head.
        init_weights(&varmap, 0)?;
        load_pretrained(&varmap, weights).map_err(|e| anyhow!("loading `weights`: {e}"))?;
        let dims = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .get("features.8.1.running_mean")
            .map(|v| v.elem_count())
            .context("the model has no head convolution")?;
        Ok(Extractor {
            model,
            side,
            batch_size,
            device: device.clone(),
            dims,
        })
    }

    /// Features of `records` of `set`, one row each, in order; `progress` is
    /// told the images done after every batch.
    pub fn features(
        &self,
        set: &ImageSet,
        records: &[&ImageRecord],
        progress: &dyn Fn(u64),
    ) -> Result<Mat> {
        let mut data = Vec::with_capacity(records.len() * self.dims);
        let side = self.side;
        for batch in records.chunks(self.batch_size) {
            let mut x = Vec::with_capacity(batch.len() * 3 * side * side);
            for r in batch {
                let px = set.pixels(r)?;
                push_normalised_chw(
                    &warp(&px, set.size as usize, side, Affine::IDENTITY),
                    side,
                    &mut x,
                );
            }
            let x = Tensor::from_vec(x, (batch.len(), 3, side, side), &self.device)?;
            let f = self
                .model
                .features(&x)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            if let Some(i) = f.iter().position(|v| !v.is_finite()) {
                let r = batch[i / self.dims];
                return Err(anyhow!(
                    "feature {} of `{}` ({}) is {}: the weights or the image are broken",
                    i % self.dims,
                    r.image_name,
                    set.dir.display(),
                    f[i]
                ));
            }
            data.extend(f);
            progress(batch.len() as u64);
        }
        Ok(Mat {
            rows: records.len(),
            cols: self.dims,
            data,
        })
    }
}
