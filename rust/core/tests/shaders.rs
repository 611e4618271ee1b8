//! The WGSL kernels validate without a GPU (naga), and the decode identity they rely on holds
//! exactly in f32 for every code byte.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use predprey_core::format::{DIGITS, ROWS_PER_GROUP};
use predprey_core::shaders::{source, SHADERS};

fn validate(name: &str, src: &str, caps: Capabilities) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map(|_| ())
        .map_err(|e| format!("{name}: {}", e.emit_to_string(src)))
}

/// What every WebGPU device has: `unpack2x16float` is core WGSL (naga lists it as a capability
/// only for downlevel GL ES targets). Nothing optional (no `shader-f16`, no subgroups).
const CORE: Capabilities = Capabilities::SHADER_FLOAT16_IN_FLOAT32;

fn composed(kernel: &str, reduce: &str) -> String {
    format!("{}\n{}", source(kernel).unwrap(), source(reduce).unwrap())
}

#[test]
fn every_shader_is_embedded_and_has_a_layout_header() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = SHADERS.iter().map(|(n, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded, "shaders/ and SHADERS list different files");
    for (name, src) in SHADERS {
        let head: String = src.lines().take_while(|l| l.starts_with("//")).collect::<Vec<_>>().join("\n");
        assert!(head.contains(name), "{name}: the header comment should name the file");
        assert!(head.contains("@binding(") || *name == "reduce_subgroup.wgsl" || *name == "reduce_workgroup.wgsl",
            "{name}: the header comment should give the buffer layout");
    }
}

#[test]
fn kernels_validate_with_and_without_subgroups() {
    for kernel in ["predprey_gemv.wgsl", "predprey_gemv1.wgsl", "dense_gemv.wgsl"] {
        // the fallback must need no optional capability at all
        validate(kernel, &composed(kernel, "reduce_workgroup.wgsl"), CORE).unwrap();
        validate(kernel, &composed(kernel, "reduce_subgroup.wgsl"), CORE | Capabilities::SUBGROUP).unwrap();
        // and the subgroup variant really does need the capability (so the runtime must choose)
        assert!(validate(kernel, &composed(kernel, "reduce_subgroup.wgsl"), CORE).is_err());
    }
    validate("copy.wgsl", source("copy.wgsl").unwrap(), CORE).unwrap();
}

/// predprey_gemv.wgsl decodes a code byte v with R_i = fma(v - 121, 1/3^i, M) - M
/// (M = 1.5 * 2^23) and t_i = R_i - 3 R_{i+1}; check that this gives DIGITS exactly, with both
/// a fused and an unfused multiply-add (a driver may do either).
#[test]
fn balanced_ternary_decode_is_exact_in_f32() {
    const M: f32 = 12582912.0;
    let inv = [1.0f32, 1.0 / 3.0, 1.0 / 9.0, 1.0 / 27.0, 1.0 / 81.0];
    for v in 0u32..243 {
        let u = f32::from_bits(v | 0x4B00_0000);
        let r0 = u - 8388729.0;
        assert_eq!(r0, v as f32 - 121.0);
        for fused in [true, false] {
            let mut r = [0f32; ROWS_PER_GROUP + 1];
            r[0] = r0;
            for i in 1..ROWS_PER_GROUP {
                r[i] = if fused { r0.mul_add(inv[i], M) - M } else { (r0 * inv[i] + M) - M };
            }
            for i in 0..ROWS_PER_GROUP {
                let t = r[i] - 3.0 * r[i + 1];
                assert_eq!(t, DIGITS[v as usize][i] as f32 - 1.0, "byte {v}, row {i}, fused {fused}");
            }
        }
    }
}
