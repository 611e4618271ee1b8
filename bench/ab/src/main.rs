//! Same-process A/B of two versions of predprey-core, `old` and `new` (`bench/ab.sh` builds it
//! twice: a git revision against the working tree, and the roles swapped). The two are called
//! alternately, round by round, so that this VM's slow and fast minutes fall on both alike; the
//! figure to read is the median of the per-round ratios old/new (> 1: new is faster).
//! Separate processes, alternated, moved by +-10 % here. What this resolves, measured with
//! identical code on both sides (session 13, Zen 4 VM, 4096 x 14336 int8, one thread): one
//! order alone read 0.926-1.032 (code placement and where the matrices land in memory, below);
//! both orders combined (`bench/ab.sh`'s last line) 1.004-1.040. Differences under ~4 % are
//! not resolved.
//!
//!     bench/ab.sh [REV] compress [ROWS COLS BITS ROUNDS]
//!     bench/ab.sh [REV] matvec [ROWS COLS THREADS int8|f32 ROUNDS]
//!
//! `PAUSE_MS=10 bench/ab.sh matvec ...`: each round times a block of 10 calls after a pause of
//! that many milliseconds (workers gone to sleep), instead of a long warm run.

use std::time::Instant;

/// Student-t(5) weights (heavy tails, as bench/cpu_matvec.py), a fixed xorshift stream.
fn student_t5(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut uni = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut normal = move || (-2.0 * uni().ln()).sqrt() * (std::f64::consts::TAU * uni()).cos();
    (0..n).map(|_| {
        let z = normal();
        let chi2: f64 = (0..5).map(|_| normal().powi(2)).sum();
        (z / (chi2 / 5.0).sqrt()) as f32
    }).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

fn p90(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[(s.len() * 9 / 10).min(s.len() - 1)]
}

fn report(what: &str, unit: f64, digits: usize, to: &[f64], tn: &[f64]) {
    let ratio: Vec<f64> = to.iter().zip(tn).map(|(a, b)| a / b).collect();
    let mn = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "{what}: old min {:.d$} med {:.d$} p90 {:.d$} | new min {:.d$} med {:.d$} p90 {:.d$} | old/new per round: median {:.3} (min {:.3}, max {:.3}, {} rounds)",
        mn(to) * unit, median(to) * unit, p90(to) * unit, mn(tn) * unit, median(tn) * unit, p90(tn) * unit,
        median(&ratio), mn(&ratio), ratio.iter().cloned().fold(0.0, f64::max), ratio.len(), d = digits
    );
}

fn arg<T: std::str::FromStr>(a: &[String], i: usize, d: T) -> T {
    a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mode = a.get(1).map(String::as_str).unwrap_or("compress");
    let (rows, cols) = (arg(&a, 2, 4096usize), arg(&a, 3, 14336usize));
    let w = student_t5(rows * cols, 0x9E3779B97F4A7C15);
    match mode {
        "compress" => {
            let bits = arg(&a, 4, 3.0f64);
            let rounds = arg(&a, 5, 10usize);
            let (mut to, mut tn) = (vec![], vec![]);
            for r in 0..rounds {
                for which in [r % 2, 1 - r % 2] {
                    let t = Instant::now();
                    if which == 0 {
                        let p = old::quant::compress(&w, rows, cols, None, &old::quant::QuantConfig::new(bits, 64)).unwrap();
                        to.push(t.elapsed().as_secs_f64());
                        drop(p);
                    } else {
                        let p = new::quant::compress(&w, rows, cols, None, &new::quant::QuantConfig::new(bits, 64)).unwrap();
                        tn.push(t.elapsed().as_secs_f64());
                        drop(p);
                    }
                }
            }
            report(&format!("compress {rows}x{cols} at {bits} bits, all threads (s)"), 1.0, 3, &to, &tn);
        }
        "matvec" => {
            let threads = arg(&a, 4, 0usize);
            let int8 = a.get(5).map(|s| s != "f32").unwrap_or(true);
            let rounds = arg(&a, 6, 20usize);
            new::cpu::set_num_threads(threads).unwrap();
            old::cpu::set_num_threads(threads).unwrap();
            // Two copies of each, made in the order old, new, new, old, and used in turn: where
            // a matrix lands in memory depends on when it is made (of two, the one compressed
            // first read 2-7 % slower here, identical code), so neither version gets the better
            // placements.
            let old_packed = || old::quant::compress(&w, rows, cols, None, &old::quant::QuantConfig::new(3.0, 64)).unwrap();
            let new_packed = || new::quant::compress(&w, rows, cols, None, &new::quant::QuantConfig::new(3.0, 64)).unwrap();
            let (po1, pn1, pn2, po2) = (old_packed(), new_packed(), new_packed(), old_packed());
            let x: Vec<f32> = student_t5(cols, 7).iter().map(|v| v * 0.3).collect();
            let mut y = vec![0f32; rows];
            let (an, ao) = if int8 {
                (new::cpu::Activations::Int8, old::cpu::Activations::Int8)
            } else {
                (new::cpu::Activations::F32, old::cpu::Activations::F32)
            };
            let calls = ((2e8 / (rows * cols) as f64).ceil() as usize).max(1);
            let pause = std::time::Duration::from_millis(std::env::var("PAUSE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
            let (mut to, mut tn) = (vec![], vec![]);
            for r in 0..rounds {
                let (po, pn) = if r % 4 < 2 { (&po1, &pn1) } else { (&po2, &pn2) };
                for which in [r % 2, 1 - r % 2] {
                    let mut go = |n: usize| {
                        for _ in 0..n {
                            if which == 0 {
                                old::cpu::matvec(po, &x, ao, &mut y).unwrap();
                            } else {
                                new::cpu::matvec(pn, &x, an, &mut y).unwrap();
                            }
                        }
                    };
                    // PAUSE_MS: a block of 10 calls after a pause (cold workers, as between
                    // the layers of a model), instead of a warm-up and a long run.
                    let n = if pause.is_zero() {
                        go(calls / 4 + 1);
                        calls
                    } else {
                        std::thread::sleep(pause);
                        10
                    };
                    let t = Instant::now();
                    go(n);
                    let dt = t.elapsed().as_secs_f64() / n as f64;
                    if which == 0 { to.push(dt) } else { tn.push(dt) }
                }
            }
            let what = format!("matvec {rows}x{cols} {} threads={threads} (us)", if int8 { "int8" } else { "f32" });
            report(&what, 1e6, 1, &to, &tn);
        }
        m => {
            eprintln!("unknown mode {m}; expected compress or matvec");
            std::process::exit(2);
        }
    }
}
