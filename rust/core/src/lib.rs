//! predprey-core: the Predator-Prey packed weight format, its quantizer and CPU kernels.
//!
//! Pure Rust, no Python. Layers: `format` (the one definition of the packed layout),
//! `quant` (weights -> packed), `cpu` (y = W x straight from the packed data).

pub mod cpu;
pub mod format;
pub mod quant;
pub mod shaders;

pub use format::{FormatError, PackedMatrix};
