//! `predprey_rs._core`: glue only. numpy in and out, input checks, error mapping (in one place,
//! `errors`), and the GIL released around every heavy call. All logic lives in predprey-core.

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use predprey_core::cpu::{self, Activations};
use predprey_core::format::{self, Dtype, PackedMatrix, Tensor};
use predprey_core::quant::{self, QuantConfig};
use pyo3::exceptions::{PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

mod errors {
    use super::*;
    pyo3::create_exception!(predprey_rs, FormatError, PyValueError, "A packed matrix or file breaks the format (FORMAT.md), or has an unknown version.");
    pyo3::create_exception!(predprey_rs, ShapeError, PyValueError, "An array has the wrong number of dimensions or the wrong length.");
    pyo3::create_exception!(predprey_rs, WeightError, PyValueError, "Weights or parameters that cannot be compressed (NaN/Inf, bad budget, bad importance).");
    pyo3::create_exception!(predprey_rs, DtypeError, pyo3::exceptions::PyTypeError, "An array has a dtype the call cannot take.");

    pub fn format(e: format::FormatError) -> PyErr {
        match e {
            // OSError(errno, strerror, filename): Python picks the subclass from errno
            // (FileNotFoundError, PermissionError, IsADirectoryError, ...).
            format::FormatError::Io { path, source } => match source.raw_os_error() {
                Some(errno) => pyo3::exceptions::PyOSError::new_err((errno, source.to_string(), path)),
                None => pyo3::exceptions::PyOSError::new_err(format!("{path}: {source}")),
            },
            other => FormatError::new_err(other.to_string()),
        }
    }
    pub fn quant(e: quant::QuantError) -> PyErr {
        match e {
            quant::QuantError::Shape(m) => ShapeError::new_err(m),
            quant::QuantError::Value(m) => WeightError::new_err(m),
            quant::QuantError::Format(f) => format(f),
        }
    }
    pub fn kernel(e: cpu::KernelError) -> PyErr {
        match e {
            cpu::KernelError::Shape(m) => ShapeError::new_err(m),
        }
    }
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add("FormatError", py.get_type::<FormatError>())?;
        m.add("ShapeError", py.get_type::<ShapeError>())?;
        m.add("WeightError", py.get_type::<WeightError>())?;
        m.add("DtypeError", py.get_type::<DtypeError>())?;
        Ok(())
    }
}

/// A compressed matrix (FORMAT.md). Immutable; cheap to share between threads.
#[pyclass(name = "PackedMatrix", module = "predprey_rs._core", frozen)]
pub struct PyPackedMatrix {
    pub inner: Arc<PackedMatrix>,
}

#[pymethods]
impl PyPackedMatrix {
    /// (N, K): rows (outputs) by columns (inputs).
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.rows, self.inner.cols)
    }
    /// Weights per block along K.
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size
    }
    /// 8 * nbytes / (N * K): every stored byte counted.
    #[getter]
    fn bits_per_weight(&self) -> f64 {
        self.inner.bits_per_weight()
    }
    /// Bytes of all stored arrays (the file body without its header).
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
    /// Number of predators (weights kept exactly in FP16).
    #[getter]
    fn n_outliers(&self) -> usize {
        self.inner.n_outliers()
    }
    /// 2 if any block has a second ternary plane, else 1.
    #[getter]
    fn planes(&self) -> usize {
        self.inner.planes()
    }
    /// Fraction of (group, block) cells that carry a second plane, 0..1.
    #[getter]
    fn plane2_fraction(&self) -> f64 {
        let d = self.inner.dims();
        self.inner.n_p2_entries() as f64 / (d.n_groups * d.n_blocks) as f64
    }
    /// Layout version of this matrix.
    #[getter]
    fn format_version(&self) -> u32 {
        format::FORMAT_VERSION
    }
    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "PackedMatrix(shape=({}, {}), block_size={}, bits_per_weight={:.3}, planes={}, n_outliers={})",
            p.rows, p.cols, p.block_size, p.bits_per_weight(), p.planes(), p.n_outliers()
        )
    }
    /// Writes one matrix to a safetensors file (atomically: temp file + rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(move || inner.save(&path)).map_err(errors::format)
    }
    /// The file bytes `save` would write (safetensors).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.inner.to_safetensors_bytes().map_err(errors::format)?;
        Ok(PyBytes::new(py, &b))
    }
    /// The metadata strings stored with the arrays.
    fn metadata(&self) -> HashMap<String, String> {
        self.inner.metadata()
    }
    /// The ten stored arrays by name as numpy arrays (copies), dtypes as in FORMAT.md.
    fn arrays<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.inner.to_tensors() {
            d.set_item(name, tensor_to_numpy(py, &t)?)?;
        }
        Ok(d)
    }
}

fn tensor_to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape.clone();
    let arr: Bound<'py, PyAny> = match t.dtype {
        Dtype::U8 => t.data.to_vec().into_pyarray(py).into_any(),
        Dtype::U16 => t.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>().into_pyarray(py).into_any(),
        Dtype::U32 => t.data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>().into_pyarray(py).into_any(),
        Dtype::F16 => t.data.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect::<Vec<_>>().into_pyarray(py).into_any(),
    };
    arr.call_method1("reshape", (shape,))
}

fn numpy_to_tensor(name: &str, a: &Bound<'_, PyAny>) -> PyResult<Tensor<'static>> {
    let np = a.py().import("numpy")?;
    let a = np.call_method1("ascontiguousarray", (a,))?;
    let dtype: String = a.getattr("dtype")?.getattr("name")?.extract()?;
    let dt = match dtype.as_str() {
        "uint8" => Dtype::U8,
        "uint16" => Dtype::U16,
        "uint32" => Dtype::U32,
        "float16" => Dtype::F16,
        other => return Err(errors::DtypeError::new_err(format!("array `{name}` has dtype {other}; expected uint8, uint16, uint32 or float16"))),
    };
    let shape: Vec<usize> = a.getattr("shape")?.extract()?;
    let raw: Vec<u8> = a.call_method0("tobytes")?.extract()?;
    let little: bool = np.getattr("little_endian")?.extract()?;
    if !little {
        return Err(PyValueError::new_err("big-endian hosts are not supported"));
    }
    Ok(Tensor { dtype: dt, shape, data: Cow::Owned(raw) })
}

/// Builds a PackedMatrix from its metadata and arrays (as returned by `metadata()` and
/// `arrays()`), validating every rule of FORMAT.md.
#[pyfunction]
fn from_arrays(meta: &Bound<'_, PyDict>, arrays: &Bound<'_, PyDict>) -> PyResult<PyPackedMatrix> {
    // Metadata values as `metadata()` gives them (strings), or integers for the numbers.
    let mut strs = HashMap::new();
    for (k, v) in meta.iter() {
        let k: String = k.extract().map_err(|_| errors::FormatError::new_err(format!("metadata key {k} is not a string")))?;
        let s = if let Ok(s) = v.extract::<String>() {
            s
        } else if v.is_instance_of::<pyo3::types::PyInt>() && !v.is_instance_of::<pyo3::types::PyBool>() {
            v.str()?.to_string()
        } else {
            return Err(errors::FormatError::new_err(format!(
                "metadata `{k}` is {} ({}); expected a string or an integer",
                v.repr()?, v.get_type().name()?
            )));
        };
        strs.insert(k, s);
    }
    // Names first (a stray one is named even when its dtype is not a format dtype), then arrays.
    let items: Vec<(String, Bound<'_, PyAny>)> = arrays.iter().map(|(k, v)| Ok((k.extract::<String>()?, v))).collect::<PyResult<_>>()?;
    format::check_array_names(items.iter().map(|(k, _)| k.as_str())).map_err(errors::format)?;
    let mut map = HashMap::new();
    for (k, v) in items {
        let t = numpy_to_tensor(&k, &v)?;
        map.insert(k, t);
    }
    let p = PackedMatrix::from_tensors(&strs, |n| map.get(n).cloned()).map_err(errors::format)?;
    Ok(PyPackedMatrix { inner: Arc::new(p) })
}

/// Parses bytes written by `PackedMatrix.to_bytes` / `save`.
#[pyfunction]
fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<PyPackedMatrix> {
    let data = data.to_vec();
    let p = py.detach(move || PackedMatrix::from_safetensors_bytes(&data)).map_err(errors::format)?;
    Ok(PyPackedMatrix { inner: Arc::new(p) })
}

/// Reads and validates one matrix from a safetensors file.
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<PyPackedMatrix> {
    let p = py.detach(move || PackedMatrix::load(&path)).map_err(errors::format)?;
    Ok(PyPackedMatrix { inner: Arc::new(p) })
}

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(what: &str, a: &'a numpy::PyReadonlyArray<'_, T, D>) -> PyResult<&'a [T]> {
    // as_slice also accepts Fortran-ordered arrays, whose flat order is the transpose's
    if !a.is_c_contiguous() {
        return Err(errors::ShapeError::new_err(format!("{what} must be C-contiguous (got a strided or Fortran-ordered array)")));
    }
    a.as_slice().map_err(|_| errors::ShapeError::new_err(format!("{what} must be C-contiguous")))
}

/// Compresses float32 weights [N, K] (C-contiguous) into a PackedMatrix within `bits` bits per
/// weight. `importance` is an optional [K] vector of non-negative per-input-channel weights.
#[pyfunction]
#[pyo3(signature = (weight, bits, block_size, importance=None))]
fn compress(py: Python<'_>, weight: PyReadonlyArray2<'_, f32>, bits: f64, block_size: usize, importance: Option<PyReadonlyArray1<'_, f32>>) -> PyResult<PyPackedMatrix> {
    let (n, k) = (weight.shape()[0], weight.shape()[1]);
    let w = contiguous("weight", &weight)?;
    let h = match &importance {
        Some(h) => Some(contiguous("importance", h)?),
        None => None,
    };
    let cfg = QuantConfig::new(bits, block_size);
    let p = py.detach(|| quant::compress(w, n, k, h, &cfg)).map_err(errors::quant)?;
    Ok(PyPackedMatrix { inner: Arc::new(p) })
}

/// The dense matrix W as float32 [N, K].
#[pyfunction]
fn decompress<'py>(py: Python<'py>, p: &PyPackedMatrix) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let inner = p.inner.clone();
    let w = py.detach(move || inner.decompress());
    w.into_pyarray(py).reshape([p.inner.rows, p.inner.cols])
}

fn activations(int8: bool) -> Activations {
    if int8 {
        Activations::Int8
    } else {
        Activations::F32
    }
}

/// y[N] = W x for float32 x[K]; `int8` quantizes x per 32 columns first.
#[pyfunction]
#[pyo3(signature = (p, x, int8=false))]
fn matvec<'py>(py: Python<'py>, p: &PyPackedMatrix, x: PyReadonlyArray1<'py, f32>, int8: bool) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let xs = contiguous("x", &x)?;
    if xs.len() != p.inner.cols {
        return Err(errors::ShapeError::new_err(format!("x has length {}; expected K = {} (the matrix is {}x{})", xs.len(), p.inner.cols, p.inner.rows, p.inner.cols)));
    }
    let inner = p.inner.clone();
    let mut y = vec![0f32; inner.rows];
    py.detach(|| cpu::matvec(&inner, xs, activations(int8), &mut y)).map_err(errors::kernel)?;
    Ok(y.into_pyarray(py))
}

/// Y[B, N] = X[B, K] W^T for float32 X (the nn.Linear convention).
#[pyfunction]
#[pyo3(signature = (p, x, int8=false))]
fn matmul<'py>(py: Python<'py>, p: &PyPackedMatrix, x: PyReadonlyArray2<'py, f32>, int8: bool) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (b, k) = (x.shape()[0], x.shape()[1]);
    if k != p.inner.cols {
        return Err(errors::ShapeError::new_err(format!("X has shape ({b}, {k}); expected (B, K = {})", p.inner.cols)));
    }
    let xs = contiguous("X", &x)?;
    let inner = p.inner.clone();
    let mut y = vec![0f32; b * inner.rows];
    py.detach(|| cpu::matmul(&inner, xs, b, activations(int8), &mut y)).map_err(errors::kernel)?;
    y.into_pyarray(py).reshape([b, p.inner.rows])
}

/// X[B, K] quantized to int8 the way the int8 kernels do it (the one rule, `cpu::quantize_chunk`):
/// each row zero-padded to `padded_cols` (a multiple of 32, >= K), then per 32 columns a scale
/// `max|x| / 127` and codes `round_half_even(x / scale)`. Returns (codes [B, padded_cols] int8,
/// scales [B, padded_cols / 32] float32). For the GPU's int8 path, which must match the CPU's.
#[pyfunction]
fn quantize_activations<'py>(py: Python<'py>, x: PyReadonlyArray2<'py, f32>, padded_cols: usize) -> PyResult<(Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>)> {
    let (b, k) = (x.shape()[0], x.shape()[1]);
    let q = cpu::QUANT_CHUNK;
    if padded_cols < k || padded_cols % q != 0 {
        return Err(errors::ShapeError::new_err(format!("padded_cols is {padded_cols}; expected a multiple of {q} that is at least K = {k}")));
    }
    let xs = contiguous("X", &x)?;
    let nc = padded_cols / q;
    let (mut codes, mut scales) = (vec![0i8; b * padded_cols], vec![0f32; b * nc]);
    py.detach(|| {
        let mut row = vec![0f32; padded_cols];
        for ((xr, qr), sr) in xs.chunks_exact(k.max(1)).zip(codes.chunks_exact_mut(padded_cols)).zip(scales.chunks_exact_mut(nc)) {
            row[..k].copy_from_slice(&xr[..k]);
            for ((ch, qc), s) in row.chunks_exact(q).zip(qr.chunks_exact_mut(q)).zip(sr.iter_mut()) {
                *s = cpu::quantize_chunk(ch, qc);
            }
        }
    });
    Ok((codes.into_pyarray(py).reshape([b, padded_cols])?, scales.into_pyarray(py).reshape([b, nc])?))
}

/// Sets the number of CPU threads the kernels and the quantizer use (0 = all cores).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    cpu::set_num_threads(n).map_err(errors::kernel)
}

/// The number of CPU threads the kernels use now.
#[pyfunction]
fn get_num_threads() -> usize {
    cpu::num_threads()
}

/// Which CPU kernel `matvec` uses on this machine: "avx512-vbmi-vnni", "avx2", "neon-dotprod",
/// "neon" or "scalar".
#[pyfunction]
fn cpu_kernel() -> &'static str {
    cpu::kernel_name()
}

/// The WGSL source of `shaders/<name>`, embedded in the extension at build time.
#[pyfunction]
fn shader_source(name: &str) -> PyResult<&'static str> {
    predprey_core::shaders::source(name).ok_or_else(|| {
        let names: Vec<&str> = predprey_core::shaders::SHADERS.iter().map(|(n, _)| *n).collect();
        pyo3::exceptions::PyKeyError::new_err(format!("no shader named {name:?}; the shaders are {names:?}"))
    })
}

/// The quantizer settings of the block-fit entry points (no budget: the options are given).
fn block_fit_config(joint_iters: usize) -> QuantConfig {
    let mut cfg = QuantConfig::new(0.0, 32);
    cfg.joint_iters = joint_iters;
    cfg
}

/// Fits one block column of many rows with fixed options (for error-feedback calibration).
/// `w`: float32 [N, L] (L <= 256), `h`: float32 [L] importance, `planes`, `npred`: uint8 [N].
/// Returns (s1 [N], s2 [N], t1 int8 [N, L], t2 int8 [N, L], pred float32 [N, L] with NaN where
/// no predator).
#[pyfunction]
#[pyo3(signature = (w, h, planes, npred, joint_iters=4))]
#[allow(clippy::type_complexity)]
fn fit_block<'py>(
    py: Python<'py>, w: PyReadonlyArray2<'py, f32>, h: PyReadonlyArray1<'py, f32>,
    planes: PyReadonlyArray1<'py, u8>, npred: PyReadonlyArray1<'py, u8>, joint_iters: usize,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>, Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>)> {
    let (n, l) = (w.shape()[0], w.shape()[1]);
    let (ws, hs) = (contiguous("w", &w)?, contiguous("h", &h)?);
    let (ps, ns) = (contiguous("planes", &planes)?, contiguous("npred", &npred)?);
    let cfg = block_fit_config(joint_iters);
    let fits = py.detach(|| quant::fit_block_rows(ws, l, hs, ps, ns, &cfg)).map_err(errors::quant)?;
    let (mut t1, mut t2, mut pred) = (Vec::with_capacity(n * l), Vec::with_capacity(n * l), vec![f32::NAN; n * l]);
    for (r, f) in fits.iter().enumerate() {
        t1.extend_from_slice(&f.t1);
        t2.extend_from_slice(&f.t2);
        for (k, v) in &f.preds {
            pred[r * l + k] = v.to_f32();
        }
    }
    let s1: Vec<f32> = fits.iter().map(|f| f.s1).collect();
    let s2: Vec<f32> = fits.iter().map(|f| f.s2).collect();
    Ok((s1.into_pyarray(py), s2.into_pyarray(py), t1.into_pyarray(py).reshape([n, l])?, t2.into_pyarray(py).reshape([n, l])?, pred.into_pyarray(py).reshape([n, l])?))
}

/// One block column of GPTQ-style error feedback (`predprey_core::gptq::quantize_block`).
/// `w`: float32 [N, L] (the block's current weights), `h`: float32 [L] importance, `u`: float32
/// [L, L] the block's diagonal slice of the upper Cholesky factor of the damped inverse
/// Hessian, `planes`, `npred`: uint8 [N]. Returns (s1 [N], s2 [N], t1 int8 [N, L], t2 int8
/// [N, L], pred float32 [N, L] (NaN where no predator), err float32 [N, L] scaled errors for the
/// update of the later columns: W[:, right] -= err @ U[block, right]). `units`: float32 [N] row
/// scales: round the fitted scales to those rows' 8-bit grids before rounding the columns.
#[pyfunction]
#[pyo3(signature = (w, h, u, planes, npred, joint_iters=4, units=None))]
#[allow(clippy::type_complexity)]
fn gptq_block<'py>(
    py: Python<'py>, w: PyReadonlyArray2<'py, f32>, h: PyReadonlyArray1<'py, f32>, u: PyReadonlyArray2<'py, f32>,
    planes: PyReadonlyArray1<'py, u8>, npred: PyReadonlyArray1<'py, u8>, joint_iters: usize, units: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<f32>>, Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>)> {
    let (n, l) = (w.shape()[0], w.shape()[1]);
    if u.shape() != [l, l] {
        return Err(errors::ShapeError::new_err(format!("u has shape {:?}; expected [{l}, {l}] for w of shape [{n}, {l}]", u.shape())));
    }
    let mut ws = contiguous("w", &w)?.to_vec();
    let (hs, us) = (contiguous("h", &h)?, contiguous("u", &u)?);
    let (ps, ns) = (contiguous("planes", &planes)?, contiguous("npred", &npred)?);
    let cfg = block_fit_config(joint_iters);
    let un = match &units { Some(v) => Some(contiguous("units", v)?), None => None };
    let g = py.detach(|| predprey_core::gptq::quantize_block(&mut ws, l, hs, us, ps, ns, un, &cfg)).map_err(errors::quant)?;
    Ok((g.s1.into_pyarray(py), g.s2.into_pyarray(py), g.t1.into_pyarray(py).reshape([n, l])?, g.t2.into_pyarray(py).reshape([n, l])?,
        g.pred.into_pyarray(py).reshape([n, l])?, g.err.into_pyarray(py).reshape([n, l])?))
}

/// `gptq_block` with the scales and predator positions given (`predprey_core::gptq::quantize_block_fixed`):
/// `w` float32 [N, L], `u` float32 [L, L], `s1`, `s2` float32 [N] (s2 = 0: one plane),
/// `is_pred` bool [N, L]. Returns (t1 int8 [N, L], t2 int8 [N, L], pred float32 [N, L], err
/// float32 [N, L]).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn gptq_block_fixed<'py>(
    py: Python<'py>, w: PyReadonlyArray2<'py, f32>, u: PyReadonlyArray2<'py, f32>, s1: PyReadonlyArray1<'py, f32>,
    s2: PyReadonlyArray1<'py, f32>, is_pred: PyReadonlyArray2<'py, bool>,
) -> PyResult<(Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>)> {
    let (n, l) = (w.shape()[0], w.shape()[1]);
    if u.shape() != [l, l] || is_pred.shape() != [n, l] {
        return Err(errors::ShapeError::new_err(format!("u has shape {:?} and is_pred {:?}; expected [{l}, {l}] and [{n}, {l}] for w of shape [{n}, {l}]", u.shape(), is_pred.shape())));
    }
    let mut ws = contiguous("w", &w)?.to_vec();
    let (us, a, b, ip) = (contiguous("u", &u)?, contiguous("s1", &s1)?, contiguous("s2", &s2)?, contiguous("is_pred", &is_pred)?);
    let g = py.detach(|| predprey_core::gptq::quantize_block_fixed(&mut ws, l, us, a, b, ip)).map_err(errors::quant)?;
    Ok((g.t1.into_pyarray(py).reshape([n, l])?, g.t2.into_pyarray(py).reshape([n, l])?,
        g.pred.into_pyarray(py).reshape([n, l])?, g.err.into_pyarray(py).reshape([n, l])?))
}

/// The dense spelling of a matrix: dict with t1, t2 (int8 [N, K]), s1, s2 (float32 [N, nb]),
/// p2 (bool [G, nb]: cells with a second plane), pred (float32 [N, K], NaN = no predator).
#[pyfunction]
fn to_parts<'py>(py: Python<'py>, p: &PyPackedMatrix) -> PyResult<Bound<'py, PyDict>> {
    let inner = p.inner.clone();
    let parts = py.detach(move || inner.to_parts());
    let d = p.inner.dims();
    let (n, k, nb) = (d.rows, d.cols, d.n_blocks);
    let out = PyDict::new(py);
    out.set_item("t1", parts.t1.into_pyarray(py).reshape([n, k])?)?;
    out.set_item("t2", parts.t2.into_pyarray(py).reshape([n, k])?)?;
    out.set_item("s1", parts.s1.into_pyarray(py).reshape([n, nb])?)?;
    out.set_item("s2", parts.s2.into_pyarray(py).reshape([n, nb])?)?;
    out.set_item("p2", parts.p2.into_pyarray(py).reshape([d.n_groups, nb])?)?;
    out.set_item("pred", parts.pred.into_pyarray(py).reshape([n, k])?)?;
    out.set_item("row_scales", parts.row_scales.into_pyarray(py))?;
    Ok(out)
}

/// Packs a dense spelling (see `to_parts`) into a validated PackedMatrix.
#[pyfunction]
#[pyo3(signature = (block_size, t1, s1, p2, t2, s2, pred, row_scales=None))]
#[allow(clippy::too_many_arguments)]
fn from_parts(
    py: Python<'_>, block_size: usize, t1: PyReadonlyArray2<'_, i8>, s1: PyReadonlyArray2<'_, f32>,
    p2: PyReadonlyArray2<'_, bool>, t2: PyReadonlyArray2<'_, i8>, s2: PyReadonlyArray2<'_, f32>,
    pred: PyReadonlyArray2<'_, f32>, row_scales: Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<PyPackedMatrix> {
    let (n, k) = (t1.shape()[0], t1.shape()[1]);
    let parts = format::Parts {
        rows: n, cols: k, block_size,
        t1: contiguous("t1", &t1)?.to_vec(), s1: contiguous("s1", &s1)?.to_vec(),
        p2: contiguous("p2", &p2)?.to_vec(), t2: contiguous("t2", &t2)?.to_vec(),
        s2: contiguous("s2", &s2)?.to_vec(), pred: contiguous("pred", &pred)?.to_vec(),
        row_scales: match &row_scales { Some(u) => contiguous("row_scales", u)?.to_vec(), None => vec![] },
    };
    let p = py.detach(move || PackedMatrix::from_parts(&parts)).map_err(errors::format)?;
    Ok(PyPackedMatrix { inner: Arc::new(p) })
}

/// The priced options of one matrix (see predprey_core::quant::Analysis): lets a caller spend
/// one bit budget over many matrices with a shared price `lam` (error removed per bit).
#[pyclass(name = "Analysis", module = "predprey_rs._core", frozen)]
pub struct PyAnalysis {
    weight: Vec<f32>,
    importance: Option<Vec<f32>>,
    cfg: QuantConfig,
    inner: quant::Analysis,
}

#[pymethods]
impl PyAnalysis {
    /// (N, K).
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.dims.rows, self.inner.dims.cols)
    }
    /// Total stored bits (every array) at price `lam`.
    fn bits(&self, py: Python<'_>, lam: f64) -> f64 {
        py.detach(|| self.inner.total_bits(lam))
    }
    /// Estimated weighted squared error at price `lam` (an upper bound of encode's).
    fn error(&self, py: Python<'_>, lam: f64) -> f64 {
        py.detach(|| self.inner.error(lam))
    }
    /// Bits of the cheapest encoding (plane 1 only).
    fn min_bits(&self) -> f64 {
        self.inner.min_bits()
    }
    /// A price above which nothing beyond plane 1 is bought.
    fn max_lambda(&self) -> f64 {
        self.inner.max_lambda()
    }
    /// The smallest price whose encoding fits `budget_bits` total stored bits.
    fn lambda_for_budget(&self, py: Python<'_>, budget_bits: f64) -> f64 {
        py.detach(|| self.inner.lambda_for_budget(budget_bits))
    }
    /// Encodes with the choices made at price `lam`.
    fn encode(&self, py: Python<'_>, lam: f64) -> PyResult<PyPackedMatrix> {
        let p = py.detach(|| quant::encode(&self.weight, self.importance.as_deref(), &self.inner, lam, &self.cfg))
            .map_err(errors::quant)?;
        Ok(PyPackedMatrix { inner: Arc::new(p) })
    }
}

/// Fits every option of every block of float32 weights [N, K] (C-contiguous); see Analysis.
#[pyfunction]
#[pyo3(signature = (weight, block_size, importance=None))]
fn analyze(py: Python<'_>, weight: PyReadonlyArray2<'_, f32>, block_size: usize, importance: Option<PyReadonlyArray1<'_, f32>>) -> PyResult<PyAnalysis> {
    let (n, k) = (weight.shape()[0], weight.shape()[1]);
    let w = contiguous("weight", &weight)?.to_vec();
    let h = match &importance {
        Some(h) => Some(contiguous("importance", h)?.to_vec()),
        None => None,
    };
    let cfg = QuantConfig::new(0.0, block_size);
    let inner = py.detach(|| quant::Analysis::new(&w, n, k, h.as_deref(), &cfg)).map_err(errors::quant)?;
    Ok(PyAnalysis { weight: w, importance: h, cfg, inner })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<PyPackedMatrix>()?;
    m.add_function(wrap_pyfunction!(compress, m)?)?;
    m.add_function(wrap_pyfunction!(decompress, m)?)?;
    m.add_function(wrap_pyfunction!(matvec, m)?)?;
    m.add_function(wrap_pyfunction!(matmul, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_activations, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(from_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(shader_source, m)?)?;
    m.add_function(wrap_pyfunction!(fit_block, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_block, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_block_fixed, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_class::<PyAnalysis>()?;
    m.add_function(wrap_pyfunction!(to_parts, m)?)?;
    m.add_function(wrap_pyfunction!(from_parts, m)?)?;
    m.add("FORMAT_VERSION", format::FORMAT_VERSION)?;
    m.add("ROWS_PER_GROUP", format::ROWS_PER_GROUP)?;
    m.add("BLOCK_SIZES", format::BLOCK_SIZES.to_vec())?;
    m.add("TENSOR_NAMES", format::TENSOR_NAMES.to_vec())?;
    m.add("MAX_K_U16_COLS", format::MAX_K_U16_COLS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
