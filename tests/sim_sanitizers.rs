//! Tests of the SIMT simulator itself (kernels/simt.h, src/device/sim/): the C++ programs under
//! tests/sim/ are built with the system `c++` (g++ 12), plainly and with AddressSanitizer or
//! ThreadSanitizer, and run. They check that
//! - the self-tests pass under every schedule (plain build);
//! - ASan catches an out-of-bounds global write and static and dynamic shared-memory overflows;
//! - TSan reports a planted missing `__syncthreads`, and the random and warp-ahead schedules
//!   make it give wrong results;
//! - correct kernels (self-tests, kernels/gemm.cu) run clean under ASan and TSan;
//! - deleting any one `__syncthreads();` from the GEMM (kernels/gemm.cu and the kernel headers
//!   it includes) is detected by some schedule or by TSan, while the unmodified GEMM passes.
//!
//! Sizes are small: TSan runs about 15x slower. Run with `--nocapture` to see the programs'
//! output (error messages, per-schedule results, the mutation table).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("simt");
    fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum San {
    None,
    Address,
    Thread,
}

impl San {
    fn flags(self) -> &'static [&'static str] {
        match self {
            San::None => &["-O2"],
            San::Address => &["-O1", "-fsanitize=address"],
            San::Thread => &["-O1", "-fsanitize=thread"],
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            San::None => "plain",
            San::Address => "asan",
            San::Thread => "tsan",
        }
    }
}

/// Compiles `sources` (C++, whatever their extension) into `out` with the simulator's host
/// flags (SIMULATOR.md): `-std=c++17 -fno-strict-aliasing -Wno-unknown-pragmas`.
fn compile(out: &Path, san: San, sources: &[PathBuf], kernel_dir: &Path, object_only: bool) {
    let mut cmd = Command::new("c++");
    cmd.args(["-std=c++17", "-g", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wall", "-Wextra"])
        .arg("-fno-omit-frame-pointer")
        .args(san.flags())
        .arg("-I")
        .arg(kernel_dir)
        .arg("-I")
        .arg(root().join("src/device/sim"));
    if object_only {
        cmd.arg("-c");
    }
    cmd.arg("-x").arg("c++");
    for s in sources.iter().filter(|s| s.extension().is_none_or(|e| e != "o")) {
        cmd.arg(s);
    }
    cmd.arg("-x").arg("none");
    for s in sources.iter().filter(|s| s.extension().is_some_and(|e| e == "o")) {
        cmd.arg(s);
    }
    if !object_only {
        cmd.arg("-lpthread");
    }
    cmd.arg("-o").arg(out);
    let res = cmd.output().expect("running the system C++ compiler `c++` (g++ 12 expected)");
    assert!(res.status.success(), "compiling {} failed:\n{}", out.display(), String::from_utf8_lossy(&res.stderr));
}

/// The named test program, built once per sanitizer and shared by the tests of this binary.
fn program(name: &'static str, san: San) -> PathBuf {
    type Cache = Mutex<HashMap<(&'static str, San), Arc<OnceLock<PathBuf>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cell = CACHE.get_or_init(Default::default).lock().unwrap().entry((name, san)).or_default().clone();
    cell.get_or_init(|| {
        let (k, t) = (root().join("kernels"), root().join("tests/sim"));
        let runtime = root().join("src/device/sim/simt_runtime.cpp");
        let sources: Vec<PathBuf> = match name {
            // One translation unit holding the runtime and several .cu files, as the crate's
            // build does it.
            "selftest" => {
                let unity = work_dir().join(format!("selftest_unity_{}.cpp", san.suffix()));
                let inc = |p: PathBuf| format!("#include \"{}\"\n", p.display());
                let text = [runtime, k.join("simt_selftest.cu"), t.join("bench_kernels.cu"), k.join("gemm.cu")]
                    .into_iter()
                    .map(inc)
                    .collect::<String>();
                fs::write(&unity, text).unwrap();
                vec![unity, t.join("selftest_driver.cpp")]
            }
            "planted" => {
                vec![runtime, t.join("planted_oob.cu"), t.join("planted_missing_sync.cu"), t.join("planted_driver.cpp")]
            }
            "gemm" => vec![runtime, k.join("gemm.cu"), t.join("gemm_driver.cpp")],
            "runtime_object" => vec![runtime],
            _ => unreachable!(),
        };
        let ext = if name == "runtime_object" { "o" } else { "bin" };
        let out = work_dir().join(format!("{name}_{}.{ext}", san.suffix()));
        compile(&out, san, &sources, &k, name == "runtime_object");
        out
    })
    .clone()
}

fn run(exe: &Path, args: &[&str]) -> Output {
    let go = |mut cmd: Command| {
        // Leak checking is not what these tests are about (the worker pool lives forever).
        cmd.env("ASAN_OPTIONS", "detect_leaks=0")
            .env("TSAN_OPTIONS", "exitcode=66")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
    };
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let o = go(cmd);
    // GCC 12's TSan cannot cope with the address-space randomisation of recent kernels.
    if String::from_utf8_lossy(&o.stderr).contains("unexpected memory mapping") {
        let mut cmd = Command::new("setarch");
        cmd.args([std::env::consts::ARCH, "-R"]).arg(exe).args(args);
        return go(cmd);
    }
    o
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Whether a sanitizer report names `file_line`; true as well when the report has no source
/// locations at all (no symbolizer, i.e. neither llvm-symbolizer nor addr2line, installed).
fn report_names(report: &str, file_line: &str) -> bool {
    report.contains(file_line) || !(report.contains(".cu:") || report.contains(".cpp:"))
}

fn assert_clean(exe: &Path, args: &[&str]) {
    let o = run(exe, args);
    let t = text(&o);
    println!("{} {}:\n{t}", exe.display(), args.join(" "));
    assert!(o.status.success(), "{} {} failed:\n{t}", exe.display(), args.join(" "));
    assert!(!t.contains("Sanitizer"), "{} {} reported:\n{t}", exe.display(), args.join(" "));
}

#[test]
fn selftests_pass_under_all_schedules() {
    assert_clean(&program("selftest", San::None), &[]);
}

fn assert_asan_catches(cmd: &str, kind: &str, line_of: &str) {
    let o = run(&program("planted", San::Address), &[cmd]);
    let t = text(&o);
    println!("{t}");
    assert!(!o.status.success(), "{cmd}: ASan did not abort:\n{t}");
    assert!(t.contains(&format!("ERROR: AddressSanitizer: {kind}")), "{cmd}: expected {kind}:\n{t}");
    // The report points at the faulty statement of the kernel.
    let src = fs::read_to_string(root().join("tests/sim/planted_oob.cu")).unwrap();
    let line = src.lines().position(|l| l.contains(line_of)).unwrap() + 1;
    assert!(
        report_names(&t, &format!("planted_oob.cu:{line}")),
        "{cmd}: report does not name planted_oob.cu:{line}:\n{t}"
    );
}

#[test]
fn asan_catches_out_of_bounds_global_write() {
    assert_asan_catches("oob_global", "heap-buffer-overflow", "case 0:");
}

#[test]
fn asan_catches_static_shared_overflow() {
    assert_asan_catches("oob_static", "global-buffer-overflow", "case 1:");
}

#[test]
fn asan_catches_dynamic_shared_overflow() {
    assert_asan_catches("oob_dyn", "heap-buffer-overflow", "default:");
}

#[test]
fn tsan_reports_missing_syncthreads() {
    let exe = program("planted", San::Thread);
    let o = run(&exe, &["race"]);
    let t = text(&o);
    println!("{t}");
    assert!(t.contains("WARNING: ThreadSanitizer: data race"), "TSan missed the race:\n{t}");
    assert!(report_names(&t, "planted_missing_sync.cu:"), "the report does not name the kernel:\n{t}");
    assert_clean(&exe, &["race", "fixed"]);
}

#[test]
fn schedules_expose_missing_syncthreads() {
    assert_clean(&program("planted", San::None), &["schedules"]);
}

#[test]
fn asan_clean_on_correct_kernels() {
    assert_clean(&program("selftest", San::Address), &["--quick"]);
    assert_clean(&program("gemm", San::Address), &["128", "128", "192", "--seeds", "1"]);
    assert_clean(&program("planted", San::Address), &["race", "fixed"]);
}

#[test]
fn tsan_clean_on_correct_kernels() {
    assert_clean(&program("selftest", San::Thread), &["--quick"]);
    assert_clean(&program("gemm", San::Thread), &["128", "128", "128", "--seeds", "1"]);
}

/// kernels/gemm.cu and the kernel headers it includes (directly or not), simt.h and params.h
/// aside.
fn gemm_sources() -> Vec<String> {
    let dir = root().join("kernels");
    let mut files = vec!["gemm.cu".to_string()];
    let mut i = 0;
    while i < files.len() {
        let src = fs::read_to_string(dir.join(&files[i])).unwrap();
        for l in src.lines() {
            let Some(rest) = l.trim().strip_prefix("#include \"") else { continue };
            let name = rest.split('"').next().unwrap().to_string();
            if name != "simt.h" && name != "params.h" && dir.join(&name).exists() && !files.contains(&name) {
                files.push(name);
            }
        }
        i += 1;
    }
    files
}

#[test]
fn gemm_barrier_deletions_are_detected() {
    const BARRIER: &str = "__syncthreads();";
    let kernels = root().join("kernels");
    assert!(kernels.join("gemm.cu").exists(), "kernels/gemm.cu is missing");
    // The unmodified kernel passes every schedule.
    assert_clean(&program("gemm", San::None), &["128", "128", "192"]);

    let mut sites = vec![];
    for f in gemm_sources() {
        let src = fs::read_to_string(kernels.join(&f)).unwrap();
        sites.extend(src.match_indices(BARRIER).map(|(at, _)| (f.clone(), at, src[..at].matches('\n').count() + 1)));
    }
    assert!(!sites.is_empty(), "no {BARRIER} found in {:?}", gemm_sources());
    let (rt_plain, rt_tsan) = (program("runtime_object", San::None), program("runtime_object", San::Thread));

    let results: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = sites
            .iter()
            .enumerate()
            .map(|(n, (file, at, line))| {
                let (rt_plain, rt_tsan, kernels) = (&rt_plain, &rt_tsan, &kernels);
                s.spawn(move || {
                    // A copy of kernels/ with this one barrier deleted.
                    let dir = work_dir().join(format!("mutant{n}"));
                    let _ = fs::remove_dir_all(&dir);
                    fs::create_dir_all(&dir).unwrap();
                    for e in fs::read_dir(kernels).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_file() {
                            fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
                        }
                    }
                    let mut src = fs::read_to_string(kernels.join(file)).unwrap();
                    src.replace_range(*at..at + BARRIER.len(), "/* mutation: barrier deleted */;");
                    fs::write(dir.join(file), src).unwrap();

                    let site = format!("{file}:{line}");
                    let sources =
                        |rt: &PathBuf| vec![dir.join("gemm.cu"), root().join("tests/sim/gemm_driver.cpp"), rt.clone()];
                    let exe = dir.join("gemm_plain.bin");
                    compile(&exe, San::None, &sources(rt_plain), &dir, false);
                    let o = run(&exe, &["128", "128", "192"]);
                    if !o.status.success() {
                        let wrong: Vec<_> =
                            text(&o).lines().filter(|l| !l.contains(": ok")).map(str::to_string).collect();
                        return (site, format!("detected by schedules: {}", wrong.join("; ")));
                    }
                    let exe = dir.join("gemm_tsan.bin");
                    compile(&exe, San::Thread, &sources(rt_tsan), &dir, false);
                    let t = text(&run(&exe, &["128", "128", "128", "--seeds", "0"]));
                    if t.contains("ThreadSanitizer: data race") {
                        (site, "detected by TSan only".to_string())
                    } else {
                        (site, format!("NOT DETECTED\n{t}"))
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (site, r) in &results {
        println!("deleting the {BARRIER} at {site}: {r}");
    }
    let missed: Vec<_> = results.iter().filter(|(_, r)| r.starts_with("NOT DETECTED")).collect();
    assert!(missed.is_empty(), "undetected barrier deletions: {missed:#?}");
}
