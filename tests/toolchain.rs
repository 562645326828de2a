//! What the build script made of `kernels/`: NVRTC compiled every kernel source to PTX, ptxas
//! assembled each kernel for sm_80 and sm_90 without spills, the two readings of the kernel
//! names agree, and the checked-in `src/device/params.rs` is what bindgen makes of
//! `kernels/params.h`.
//!
//! Under the test command (`scripts/test.sh`), `LORAFUSE_REQUIRE_PTX=1` and
//! `LORAFUSE_REQUIRE_BINDGEN=1` make a build without NVRTC or libclang a failure; elsewhere the
//! checks that need them say "skipped" on stderr.

#[path = "../build/kernel_names.rs"]
mod kernel_names;

use lorafuse::device::kernels::{BUILD_DETAIL, BUILD_PATH, MODULES, RESOURCES};
use std::io::Write;

/// `false` (after a visible note) when the build had no PTX and the test command did not ask
/// for it; panics when it did.
fn built_ptx(test: &str) -> bool {
    if BUILD_PATH != "embedded-source" {
        return true;
    }
    if required("LORAFUSE_REQUIRE_PTX") {
        panic!("LORAFUSE_REQUIRE_PTX=1 but the build embedded only sources: {BUILD_DETAIL}");
    }
    skipped(test, BUILD_DETAIL);
    false
}

/// Whether the test command asked for this part of the toolchain (`VAR=1`).
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// A note that the test harness does not capture, so a skip is never silent.
fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}

#[test]
fn nvrtc_compiled_every_kernel_source() {
    assert!(!MODULES.is_empty(), "no kernels/*.cu was embedded");
    if !built_ptx("nvrtc_compiled_every_kernel_source") {
        return;
    }
    for m in MODULES {
        let ptx = m.ptx.unwrap_or_else(|| panic!("{}: no PTX although the build path is {BUILD_PATH}", m.file));
        assert!(ptx.contains(".target sm_80"), "{}: PTX not for compute_80", m.file);
        assert!(!m.kernels.is_empty(), "{}: no extern \"C\" __global__ kernel", m.file);
        // The driver requirement the build states follows from the PTX ISA it got.
        let isa = ptx.lines().find_map(|l| l.strip_prefix(".version ")).expect("PTX has a .version");
        if isa.trim() == "8.4" {
            assert!(BUILD_DETAIL.contains("R550"), "BUILD_DETAIL lacks the minimum driver: {BUILD_DETAIL}");
        }
    }
}

#[test]
fn kernel_names_from_ptx_and_source_agree() {
    for m in MODULES {
        assert_eq!(kernel_names::from_source(m.source), m.kernels, "{}: source scan", m.file);
        if let Some(ptx) = m.ptx {
            assert_eq!(kernel_names::from_ptx(ptx), m.kernels, "{}: PTX .entry directives", m.file);
        }
    }
}

#[test]
fn kernel_name_scan_skips_comments_macros_and_declarations() {
    let source = r#"
        #include "params.h"
        // extern "C" __global__ void commented(int) {}
        /* extern "C" __global__ void blocked(int) {}
           still a comment */
        #define KERNEL(name) \
            extern "C" __global__ void name(int) {}
        extern "C" __global__ void declared_only(const GemmParams p);
        extern "C" __device__ int helper(int x) { return x; }
        extern "C" __global__ void __launch_bounds__(lf::THREADS, (2)) bounded(
            const GemmParams p) {
            helper(1) / 2;
        }
        extern "C"
        __global__ void
        plain(const GemmParams p) {}
    "#;
    assert_eq!(kernel_names::from_source(source), ["bounded", "plain"]);
    let ptx = "\n.version 8.4\n.visible .entry bounded(\n\t.param .align 8 .b8 p[48]\n)\n.entry plain()\n";
    assert_eq!(kernel_names::from_ptx(ptx), ["bounded", "plain"]);
}

#[test]
fn every_kernel_is_spill_free_on_sm80_and_sm90() {
    let test = "every_kernel_is_spill_free_on_sm80_and_sm90";
    if !built_ptx(test) {
        return;
    }
    if RESOURCES.is_empty() && !required("LORAFUSE_REQUIRE_PTX") {
        return skipped(test, BUILD_DETAIL); // NVRTC without ptxas: the build warned
    }
    for kernel in MODULES.iter().flat_map(|m| m.kernels.iter()) {
        for arch in ["sm_80", "sm_90"] {
            let r = RESOURCES
                .iter()
                .find(|r| r.kernel == *kernel && r.arch == arch)
                .unwrap_or_else(|| panic!("no ptxas report for {kernel} on {arch}"));
            assert!(r.registers > 0, "{kernel} on {arch}: ptxas reported no registers");
            assert_eq!((r.spill_store_bytes, r.spill_load_bytes), (0, 0), "{kernel} on {arch} spills");
        }
    }
}

#[test]
fn checked_in_bindings_match_kernels_params_h() {
    let generated = env!("LORAFUSE_BINDGEN_OUT");
    if generated.is_empty() {
        let why = "libclang was not found when the crate was built, so bindgen did not run";
        if required("LORAFUSE_REQUIRE_BINDGEN") {
            panic!("LORAFUSE_REQUIRE_BINDGEN=1 but {why}");
        }
        return skipped("checked_in_bindings_match_kernels_params_h", why);
    }
    let generated = std::fs::read_to_string(generated).expect("bindgen output of the build");
    let checked_in = include_str!("../src/device/params.rs");
    if generated != checked_in {
        let line = generated.lines().zip(checked_in.lines()).position(|(a, b)| a != b);
        panic!(
            "src/device/params.rs differs from bindgen's output for kernels/params.h (first at \
             line {}); regenerate with `LORAFUSE_BLESS_BINDINGS=1 cargo build` and review the diff",
            line.map_or_else(|| "end of the shorter file".into(), |i| (i + 1).to_string())
        );
    }
}
