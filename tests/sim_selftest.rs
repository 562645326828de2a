//! The simulator self-tests (kernels/simt_selftest.cu) through the `Device` trait: the checks of
//! tests/common/selftest.rs (also run on a GPU by tests/gpu.rs) under every schedule, and the
//! kernel bugs and launches a GPU would refuse, which the simulator must return as errors.

mod common;

use common::selftest::{self, launch, params, poisoned, upload, CHECKS};
use lorafuse::device::sim::{Schedule, Sim};
use lorafuse::device::{Device, KernelParams, LaunchConfig, ParamBytes};
use std::sync::Arc;

fn sim(s: Schedule) -> Arc<dyn Device> {
    Arc::new(Sim::new(s))
}

fn run_all(s: Schedule) {
    let dev = sim(s);
    for (name, check) in CHECKS {
        println!("{s:?}: {name}");
        check(&dev);
    }
}

#[test]
fn selftests_lockstep() {
    run_all(Schedule::Lockstep);
}

#[test]
fn selftests_random_schedules() {
    run_all(Schedule::Random(1));
    run_all(Schedule::Random(2));
}

#[test]
fn selftests_warp_ahead_schedules() {
    run_all(Schedule::WarpAhead(1));
    run_all(Schedule::WarpAhead(2));
}

const DIVERGE: &str = "simt_selftest_diverge";

/// Launches simt_selftest_diverge (`mode`: its deliberate bug, see the kernel) and returns the
/// error message; panics if the launch succeeds.
fn diverge_error(dev: &Arc<dyn Device>, mode: i32, threads: u32) -> String {
    // SAFETY: out is null, so the kernel writes nothing.
    let r = unsafe { launch(dev, DIVERGE, (1, 1, 1), (threads, 1, 1), 0, params(None, None, None, 0, mode)) };
    r.expect_err(&format!("{DIVERGE} mode {mode}: the bug went unreported")).to_string()
}

fn assert_names(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message \"{msg}\" lacks \"{n}\"");
    }
}

/// The line `below` lines under the one of kernels/simt_selftest.cu that holds `text`, as the
/// simulator names it.
fn site(text: &str, below: usize) -> String {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/simt_selftest.cu")).unwrap();
    let line = src.lines().position(|l| l.contains(text)).unwrap_or_else(|| panic!("no line has {text:?}")) + 1 + below;
    format!("simt_selftest.cu:{line}")
}

#[test]
fn divergent_barrier_names_kernel_and_both_lines() {
    let (first, second) = (site("if (t < 32) __syncthreads();", 0), site("else __syncthreads();", 0));
    let msg = diverge_error(&sim(Schedule::Lockstep), 0, 64);
    // In lockstep order thread 0 is first at its barrier.
    let want =
        format!("{DIVERGE}: block (0,0,0) thread 32 reached __syncthreads at {second} while thread 0 waits at {first}");
    assert!(msg.starts_with(&format!("kernel {DIVERGE}: ")) && msg.contains(&want), "\"{msg}\" is not \"...{want}\"");
    // Any order names both sites.
    for s in [Schedule::Random(3), Schedule::WarpAhead(3)] {
        let msg = diverge_error(&sim(s), 0, 64);
        assert_names(&msg, &[DIVERGE, &first, &second]);
    }
}

#[test]
fn kernel_bugs_are_errors() {
    let dev = sim(Schedule::Lockstep);
    let exit_wait = format!(
        "block (0,0,0) thread 5 exited while thread 0 waits at __syncthreads at {}",
        site("if (t == 5) return;", 1)
    );
    let cases: &[(i32, u32, &[&str])] = &[
        (1, 64, &[&exit_wait]),
        (
            2,
            64,
            &[
                "thread 0 waits at __shfl_xor_sync (mask 0xffffffff) at simt_selftest.cu:",
                "but lane 7 (thread 7) exited",
            ],
        ),
        (3, 64, &["waits at __syncwarp (mask 0xffffffff)", "lane 16 (thread 16) waits at __syncthreads"]),
        (4, 64, &["__ballot_sync", "__shfl_sync"]),
        (5, 64, &["excludes the calling lane"]),
        (6, 64, &["not 16-byte aligned"]),
        (7, 48, &["needs all 32 lanes"]),
        (8, 64, &["width 3"]),
    ];
    for &(mode, threads, needles) in cases {
        let msg = diverge_error(&dev, mode, threads);
        assert_names(&msg, &[DIVERGE]);
        assert_names(&msg, needles);
    }
    // The runtime recovers from the faults: the same device still runs a correct kernel.
    selftest::reduce(&dev);
}

#[test]
fn launches_a_gpu_would_refuse_are_errors() {
    let dev = sim(Schedule::Lockstep);
    let err = |kernel: &str, grid, block, smem| {
        // SAFETY: every one of these is refused before any thread runs.
        let r = unsafe { launch(&dev, kernel, grid, block, smem, params(None, None, None, 0, 0)) };
        r.expect_err(&format!("{kernel} {grid:?} {block:?} {smem} B: launched")).to_string()
    };
    assert_names(&err(DIVERGE, (1, 1, 1), (2048, 1, 1), 0), &[DIVERGE, "block of 2048 threads exceeds 1024"]);
    assert_names(&err(DIVERGE, (1, 1, 1), (1, 1, 65), 0), &["exceeds (1024,1024,64)"]);
    assert_names(&err(DIVERGE, (1, 65536, 1), (32, 1, 1), 0), &["exceeds (2147483647,65535,65535)"]);
    assert_names(&err(DIVERGE, (1, 1, 1), (0, 1, 1), 0), &["zero dimension"]);
    // Refused by the Rust side (static + dynamic, from ptxas' report) or by the runtime.
    assert_names(&err(DIVERGE, (1, 1, 1), (32, 1, 1), 300_000), &["shared memory", "300000", "232448"]);
    assert_names(&err("no_such_kernel", (1, 1, 1), (32, 1, 1), 0), &["no_such_kernel: unknown kernel"]);

    // The wrong parameter struct for the kernel (40 bytes, not SimtSelftestParams' 32).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Wrong([u64; 5]);
    // SAFETY: plain repr(C) data.
    unsafe impl KernelParams for Wrong {}
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), dynamic_smem_bytes: 0 };
    // SAFETY: refused before any thread runs.
    let r = unsafe { dev.launch(DIVERGE, &cfg, ParamBytes::new(&Wrong([0; 5]))) };
    assert_names(&r.expect_err("wrong params launched").to_string(), &["params size 40 != 32"]);
}

/// Several threads launching at once on shared devices (as cargo's parallel tests do).
#[test]
fn concurrent_launches() {
    let devs = [sim(Schedule::Lockstep), sim(Schedule::Random(5)), sim(Schedule::WarpAhead(6))];
    std::thread::scope(|scope| {
        for i in 0..4u32 {
            let dev = &devs[i as usize % devs.len()];
            scope.spawn(move || {
                let (g, b) = (16u32, 256u32);
                let inp = upload(dev, &vec![i + 1; (g * b) as usize]);
                for rep in 0..3 {
                    let out = poisoned(dev, g as usize);
                    // SAFETY: G·B words in, G out, B·4 bytes of dynamic smem.
                    unsafe {
                        launch(
                            dev,
                            "simt_selftest_reduce",
                            (g, 1, 1),
                            (b, 1, 1),
                            4 * b,
                            params(Some(&inp), Some(&out), None, 0, 0),
                        )
                    }
                    .unwrap();
                    let got = selftest::download(&out);
                    assert!(got.iter().all(|&x| x == b * (i + 1)), "launcher {i} rep {rep}: {got:?}");
                }
            });
        }
    });
}
