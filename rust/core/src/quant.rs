//! Quantizer: dense float weights -> PackedMatrix (placeholder until the real one lands).

use crate::format::{FormatError, PackedMatrix};

/// Settings of one compression.
#[derive(Clone, Debug)]
pub struct QuantConfig {
    /// Budget: bits per weight, every stored byte counted.
    pub bits: f64,
    /// Block size B (32, 64, 128, 256).
    pub block_size: usize,
}

/// Errors of the quantizer.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{0}")]
    Value(String),
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl QuantConfig {
    /// Defaults for everything but the budget and block size.
    pub fn new(bits: f64, block_size: usize) -> Self {
        QuantConfig { bits, block_size }
    }
}

/// Compresses `w` (float32 [rows, cols], row-major).
pub fn compress(_w: &[f32], _rows: usize, _cols: usize, _importance: Option<&[f32]>, _cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    Err(QuantError::Value("not implemented yet".into()))
}
