//! Which decoder layers of a model are MoE layers.
//!
//! Placements and loads in this crate have one row per MoE layer. SGLang's files have one row
//! per decoder layer, dense layers included (its `ModelConfigForExpertLocation::num_layers` is
//! the model's `num_hidden_layers`), so converting needs the layout.

use crate::error::{EplbError, Result};
use crate::formats::counted;

/// The decoder layers of a model and which of them are MoE layers (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderLayout {
    num_decoder_layers: usize,
    moe_layers: Vec<usize>,
}

/// No model comes near this; it keeps a mistyped flag from allocating without bound.
const MAX_DECODER_LAYERS: usize = 1 << 16;

fn lerr<T>(m: String) -> Result<T> {
    Err(EplbError::Request(m))
}

impl DecoderLayout {
    /// `num_decoder_layers` layers of which `moe_layers` (any order, no repeats) are MoE.
    pub fn new(num_decoder_layers: usize, moe_layers: &[usize]) -> Result<DecoderLayout> {
        if num_decoder_layers > MAX_DECODER_LAYERS {
            return lerr(format!(
                "{num_decoder_layers} decoder layers is more than {MAX_DECODER_LAYERS}"
            ));
        }
        let mut m = moe_layers.to_vec();
        m.sort_unstable();
        if m.is_empty() {
            return lerr("the layout has no MoE layers".into());
        }
        if let Some(w) = m.windows(2).find(|w| w[0] == w[1]) {
            return lerr(format!("MoE layer {} is listed twice", w[0]));
        }
        if let Some(&last) = m.last()
            && last >= num_decoder_layers
        {
            return lerr(format!(
                "MoE layer {last} is out of range: the model has {}",
                counted(num_decoder_layers, "decoder layer", "decoder layers")
            ));
        }
        Ok(DecoderLayout {
            num_decoder_layers,
            moe_layers: m,
        })
    }

    /// The first `first_dense` decoder layers are dense, the next `num_moe_layers` are MoE
    /// (DeepSeek-V3: `first_k_dense_replace` = 3, 58 MoE layers).
    pub fn first_dense(first_dense: usize, num_moe_layers: usize) -> Result<DecoderLayout> {
        let n = first_dense.saturating_add(num_moe_layers);
        if n > MAX_DECODER_LAYERS {
            return lerr(format!(
                "{n} decoder layers is more than {MAX_DECODER_LAYERS}"
            ));
        }
        DecoderLayout::new(n, &(first_dense..n).collect::<Vec<_>>())
    }

    /// Every decoder layer is an MoE layer (Mixtral, Qwen3-MoE).
    pub fn all_moe(num_layers: usize) -> Result<DecoderLayout> {
        DecoderLayout::first_dense(0, num_layers)
    }

    pub fn num_decoder_layers(&self) -> usize {
        self.num_decoder_layers
    }

    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers.len()
    }

    /// Decoder-layer numbers of the MoE layers, ascending: MoE layer `i` is decoder layer
    /// `moe_layers()[i]`.
    pub fn moe_layers(&self) -> &[usize] {
        &self.moe_layers
    }

    /// The dense decoder layers, ascending.
    pub fn dense_layers(&self) -> Vec<usize> {
        (0..self.num_decoder_layers)
            .filter(|l| self.moe_layers.binary_search(l).is_err())
            .collect()
    }

    /// Checks that a placement or load with `moe_rows` MoE-layer rows fits.
    pub fn check_moe_rows(&self, moe_rows: usize, what: &str) -> Result<()> {
        if moe_rows != self.moe_layers.len() {
            return Err(EplbError::Mismatch(format!(
                "{what} has {} but the decoder-layer layout has {} ({}, {} dense)",
                counted(moe_rows, "MoE layer", "MoE layers"),
                self.moe_layers.len(),
                counted(self.num_decoder_layers, "decoder layer", "decoder layers"),
                self.num_decoder_layers - self.moe_layers.len()
            )));
        }
        Ok(())
    }

    /// Checks that a file with one row per decoder layer fits.
    pub fn check_decoder_rows(&self, rows: usize, what: &str) -> Result<()> {
        if rows != self.num_decoder_layers {
            return Err(EplbError::Mismatch(format!(
                "{what} has {} but the decoder-layer layout has {}",
                counted(rows, "layer", "layers"),
                counted(self.num_decoder_layers, "decoder layer", "decoder layers")
            )));
        }
        Ok(())
    }

    /// A compact description: "61 decoder layers, dense 0-2".
    pub fn describe(&self) -> String {
        let dense = self.dense_layers();
        if dense.is_empty() {
            return format!(
                "{}, all MoE",
                counted(self.num_decoder_layers, "decoder layer", "decoder layers")
            );
        }
        format!(
            "{}, dense {}",
            counted(self.num_decoder_layers, "decoder layer", "decoder layers"),
            ranges(&dense)
        )
    }
}

/// "0-2, 5, 7-9" for a sorted list.
pub(crate) fn ranges(xs: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            xs[i].to_string()
        } else {
            format!("{}-{}", xs[i], xs[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let l = DecoderLayout::first_dense(3, 58).unwrap();
        assert_eq!(l.num_decoder_layers(), 61);
        assert_eq!(l.moe_layers()[0], 3);
        assert_eq!(l.dense_layers(), vec![0, 1, 2]);
        assert_eq!(l.describe(), "61 decoder layers, dense 0-2");
        let m = DecoderLayout::new(6, &[5, 1, 3]).unwrap();
        assert_eq!(m.moe_layers(), &[1, 3, 5]);
        assert_eq!(ranges(&m.dense_layers()), "0, 2, 4");
        assert!(DecoderLayout::new(4, &[4]).is_err());
        assert!(DecoderLayout::new(4, &[1, 1]).is_err());
        assert!(DecoderLayout::new(4, &[]).is_err());
        assert!(m.check_moe_rows(2, "load").is_err());
        assert!(m.check_moe_rows(3, "load").is_ok());
    }

    /// Counts of one are singular ("has 1 decoder layers" before).
    #[test]
    fn messages_count_in_the_singular_for_one() {
        let one = DecoderLayout::first_dense(0, 1).unwrap();
        assert_eq!(one.describe(), "1 decoder layer, all MoE");
        let e = one.check_moe_rows(2, "the load").unwrap_err().to_string();
        assert!(
            e.contains("the load has 2 MoE layers but the decoder-layer layout has 1 (1 decoder layer, 0 dense)"),
            "{e}"
        );
        let e = one
            .check_decoder_rows(2, "the file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 1 decoder layer"), "{e}");
        let e = DecoderLayout::new(1, &[1]).unwrap_err().to_string();
        assert!(e.contains("the model has 1 decoder layer"), "{e}");
        let two = DecoderLayout::new(2, &[1]).unwrap();
        let e = two.check_moe_rows(1, "x").map(|()| "ok").unwrap_or("err");
        assert_eq!(e, "ok");
        let e = two
            .check_decoder_rows(1, "the file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the file has 1 layer but"), "{e}");
    }
}
