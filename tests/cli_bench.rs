//! `lorafuse bench`: the alternated CPU timing of the LoRA linear against the plain linear.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lorafuse");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).arg("bench").args(args).output().unwrap()
}

#[test]
fn prints_a_row_per_dropout_with_ratio_and_floor() {
    let out = run(&["--m", "20", "--k", "33", "--n", "17", "--r", "3", "--dropout", "0,0.5", "--iters", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("M=20 K=33 N=17 r=3"), "{stdout}");
    let rows: Vec<Vec<&str>> = stdout.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, p) in rows.iter().zip(["0.00", "0.50"]) {
        assert_eq!(row[0], p, "{stdout}");
        let (plain, fused, ratio): (f64, f64, f64) =
            (row[1].parse().unwrap(), row[3].parse().unwrap(), row[5].parse().unwrap());
        assert!(plain > 0.0 && fused > 0.0 && ratio.is_finite() && ratio > 0.0, "{stdout}");
        // 1 + 3·r·(k + n) / (2·n·k) = 1 + 450 / 1122.
        assert_eq!(row[6], "1.401", "{stdout}");
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let out = run(&["--dropout", "0.1,1.0", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("dropout") && err.contains("1 is not in [0, 1)"), "{err}");
    assert!(out.stdout.is_empty(), "nothing is timed before the arguments are checked");
    for args in [&["--r", "0"][..], &["--m", "-3"], &["--iters", "0"], &["--dropout", "x"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run(&["--m", "100000", "--k", "100000", "--iters", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("GiB") && !err.contains("panicked"), "{err}");
}
