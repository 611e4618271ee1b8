//! predprey-core: the Predator-Prey packed weight format, its quantizer and CPU kernels.
//!
//! Pure Rust, no Python. Layers: `format` (the one definition of the packed layout),
//! `quant` (weights -> packed), `gptq` (error feedback across columns, for calibration), `cpu` (y = W x straight from the packed data).

pub mod cpu;
pub mod format;
pub mod gptq;
pub mod quant;
pub mod shaders;

pub use format::{FormatError, PackedMatrix};
