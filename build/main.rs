//! Build script: turns `kernels/*.cu` into
//! - PTX for `compute_80`, assembled by ptxas for sm_80 and sm_90 as a check (spills fail the
//!   build), with a resource report ([`ptx`]); or, with no CUDA compiler, embedded sources for
//!   NVRTC at first use;
//! - Rust parameter structs from `kernels/params.h` via bindgen, checked against the committed
//!   copy ([`bindings`]);
//! - a host C++ static library: the same kernels compiled against the SIMT simulator ([`sim`]).

mod bindings;
mod ptx;
mod sim;

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = root.join("kernels");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=kernels");
    if let Err(e) = ptx::run(&root, &kernels, &out) {
        fail(&format!("PTX build: {e}"));
    }
    if let Err(e) = bindings::run(&root, &kernels, &out) {
        fail(&format!("bindings: {e}"));
    }
    if let Err(e) = sim::run(&root, &kernels, &out) {
        fail(&format!("simulator build: {e}"));
    }
}

/// Stops the build with a readable message (cargo shows stderr of a failed build script).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
