//! The WGSL kernels of `shaders/`, embedded at build time so that every wheel carries them
//! (`predprey_rs._core.shader_source(name)`); the sdist ships the files themselves.
//!
//! A kernel file (`predprey_gemv.wgsl`, `predprey_gemv1.wgsl`, `dense_gemv.wgsl`) is loaded with exactly one reduction
//! file appended: `reduce_subgroup.wgsl` where the adapter has subgroups, else
//! `reduce_workgroup.wgsl`. `copy.wgsl` stands alone. Each file's header states its buffers.

/// (file name, WGSL source) of every shader, in `shaders/`.
pub static SHADERS: &[(&str, &str)] = &[
    ("predprey_gemv.wgsl", include_str!("../../../shaders/predprey_gemv.wgsl")),
    ("predprey_gemv1.wgsl", include_str!("../../../shaders/predprey_gemv1.wgsl")),
    ("dense_gemv.wgsl", include_str!("../../../shaders/dense_gemv.wgsl")),
    ("copy.wgsl", include_str!("../../../shaders/copy.wgsl")),
    ("reduce_subgroup.wgsl", include_str!("../../../shaders/reduce_subgroup.wgsl")),
    ("reduce_workgroup.wgsl", include_str!("../../../shaders/reduce_workgroup.wgsl")),
];

/// The source of shader `name` (a file name of `shaders/`), if it exists.
pub fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
