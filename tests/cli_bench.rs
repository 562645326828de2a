//! `lorafuse bench`: the alternated timing of the LoRA linear against the plain linear, on the
//! CPU and (through the same launch code a GPU runs) on the simulator.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lorafuse");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).arg("bench").args(args).output().unwrap()
}

/// The table's rows as (dropout, variant, median ms, ratio), after checking the header lines.
fn rows(out: &Output, shape: &str, floor: &str) -> Vec<(String, String, f64, f64)> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains(shape), "{stdout}");
    assert_eq!(lines[1], format!("FLOP floor of the ratio: {floor}"), "{stdout}");
    lines[3..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "{stdout}");
            (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

/// Every row has a positive time; the reference variant's ratio is exactly 1 and the others'
/// are their time over it.
fn check_ratios(rows: &[(String, String, f64, f64)], reference: &str) {
    for (p, variant, ms, ratio) in rows {
        let base = rows.iter().find(|r| &r.0 == p && r.1 == reference).expect("reference row").2;
        assert!(*ms > 0.0 && ratio.is_finite(), "{rows:?}");
        // Both times are printed to 4 decimals (±5e-5 ms), the ratio to 3.
        let rounding = 5e-4 + 5e-5 * (1.0 + ratio) / base;
        assert!((ratio - ms / base).abs() <= rounding * 1.01, "{variant}: {rows:?}");
    }
}

#[test]
fn cpu_rows_per_dropout_with_ratio_and_floor() {
    let out = run(&["--m", "20", "--k", "33", "--n", "17", "--r", "3", "--dropout", "0,0.5", "--iters", "2"]);
    // 1 + 3·r·(k + n) / (2·n·k) = 1 + 450 / 1122.
    let rows = rows(&out, "M=20 K=33 N=17 r=3", "1.401");
    let names: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(names, [("0.00", "plain"), ("0.00", "fused"), ("0.50", "plain"), ("0.50", "fused")]);
    check_ratios(&rows, "plain");
}

/// The device path end to end on the simulator: uploads, the base GEMMs, both fused forward
/// strategies with the fused backward, and the unfused sequence all launch and are timed.
#[test]
fn sim_runs_every_device_variant() {
    let out = run(&["--backend", "sim", "--m", "40", "--k", "72", "--n", "56", "--r", "8", "--iters", "1"]);
    let rows = rows(&out, "M=40 K=72 N=56 r=8", "1.381");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("SIMT simulator"));
    let names: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    let want: Vec<(&str, &str)> =
        ["0.00", "0.10"].iter().flat_map(|p| ["base", "split", "single_pass", "unfused"].map(|v| (*p, v))).collect();
    assert_eq!(names, want);
    check_ratios(&rows, "base");
    // Past the single-pass kernel's rank limit only the split strategy runs.
    let out =
        run(&["--backend", "sim", "--m", "8", "--k", "16", "--n", "8", "--r", "72", "--iters", "1", "--dropout", "0"]);
    let variants: Vec<String> = rows_unchecked(&out);
    assert_eq!(variants, ["base", "split", "unfused"], "{}", String::from_utf8_lossy(&out.stderr));
}

fn rows_unchecked(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(3)
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(String::from)
        .collect()
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let out = run(&["--dropout", "0.1,1.0", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("dropout") && err.contains("1 is not in [0, 1)"), "{err}");
    assert!(out.stdout.is_empty(), "nothing is timed before the arguments are checked");
    for args in [&["--r", "0"][..], &["--m", "-3"], &["--iters", "0"], &["--dropout", "x"], &["--backend", "tpu"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run(&["--m", "100000", "--k", "100000", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("GiB") && !err.contains("panicked"), "{err}");
}

/// Asking for a GPU where there is none is an error that says why, not a CPU run in disguise.
#[test]
fn cuda_without_a_device_says_why() {
    if lorafuse::device::cuda::unavailable_reason().is_none() {
        println!("cuda_without_a_device_says_why: skipped: a CUDA device is present");
        return;
    }
    let out = run(&["--backend", "cuda", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("device") && out.stdout.is_empty(), "{err}");
}
