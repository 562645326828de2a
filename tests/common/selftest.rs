//! Checks of the SIMT simulator's self-test kernels (kernels/simt_selftest.cu), launched through
//! the [`Device`] trait: in the simulator (tests/sim_selftest.rs, every schedule) they check the
//! emulation; on a GPU (tests/gpu.rs) they check the simulator's fragment layouts and shuffle
//! semantics against the hardware. Every reference here is computed independently of the
//! emulation: shuffles from the PTX ISA pseudo-code of `shfl.sync`, mma and ldmatrix from the
//! PTX ISA fragment-layout formulas (see /work/shared/SIMULATOR.md, "Fragment layouts").
//!
//! Inputs are random, seeded from the device's name, so each simulator schedule and seed gets
//! fresh data and a failure names the device that reproduces it. Outputs are poisoned (0xFF:
//! NaN) before each launch, so an element a kernel fails to write never passes.
#![allow(dead_code)]

use half::{bf16, f16};
use lorafuse::device::params::SimtSelftestParams;
use lorafuse::device::sim::SimStats;
use lorafuse::device::{Device, DeviceBuffer, KernelParams, LaunchConfig, ParamBytes};
use lorafuse::testing::TestRng;
use std::sync::Arc;

/// `SimtSelftestParams` as kernel parameters (the library implements the trait only for the
/// parameter structs of its own ops; same layout by `repr(transparent)`).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Params(SimtSelftestParams);
// SAFETY: a transparent wrapper of the bindgen-generated `#[repr(C)]` struct.
unsafe impl KernelParams for Params {}

/// Parameters from optional buffers (absent: null).
pub fn params(
    inp: Option<&DeviceBuffer>,
    out: Option<&DeviceBuffer>,
    fout: Option<&DeviceBuffer>,
    n: i32,
    mode: i32,
) -> SimtSelftestParams {
    SimtSelftestParams {
        in_: inp.map_or(std::ptr::null(), |b| b.ptr().as_ptr()),
        out: out.map_or(std::ptr::null_mut(), |b| b.ptr().as_mut_ptr()),
        fout: fout.map_or(std::ptr::null_mut(), |b| b.ptr().as_mut_ptr()),
        n,
        mode,
    }
}

/// Launches a self-test kernel and waits for it.
///
/// # Safety
/// The buffers in `p` must be large enough for what `kernel` reads and writes with this
/// configuration (see each kernel's comment in kernels/simt_selftest.cu).
pub unsafe fn launch(
    dev: &Arc<dyn Device>,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    dynamic_smem_bytes: u32,
    p: SimtSelftestParams,
) -> lorafuse::Result<()> {
    let cfg = LaunchConfig { grid, block, dynamic_smem_bytes };
    let p = Params(p);
    dev.launch(kernel, &cfg, ParamBytes::new(&p))?;
    dev.synchronize()
}

/// [`launch`] that panics with the device and kernel on error, and returns the simulator's
/// counters of this launch (`None` on a GPU).
///
/// # Safety
/// As [`launch`].
unsafe fn run(
    dev: &Arc<dyn Device>,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    p: SimtSelftestParams,
) -> Option<SimStats> {
    dev.take_stats(); // counters since the last call: start from zero
    launch(dev, kernel, grid, block, smem, p).unwrap_or_else(|e| panic!("{}: {kernel}: {e}", dev.name()));
    dev.take_stats()
}

pub fn upload(dev: &Arc<dyn Device>, words: &[u32]) -> DeviceBuffer {
    DeviceBuffer::from_host(dev, bytemuck::cast_slice(words)).unwrap()
}

/// A buffer of `n` words filled with NaN (0xFFFFFFFF).
pub fn poisoned(dev: &Arc<dyn Device>, n: usize) -> DeviceBuffer {
    let b = DeviceBuffer::new(dev, 4 * n).unwrap();
    b.fill(0xFF).unwrap();
    b
}

pub fn download(b: &DeviceBuffer) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(&b.to_host().unwrap())
}

/// A generator seeded from the device's name (schedule and seed included) and the check.
fn rng(dev: &Arc<dyn Device>, check: &str) -> TestRng {
    let fnv = |h: u64, s: &str| s.bytes().fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    TestRng::new(fnv(fnv(0xcbf2_9ce4_8422_2325, &dev.name()), check))
}

fn words(rng: &mut TestRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.next_u64() as u32).collect()
}

// ---- barriers, indices, reductions ------------------------------------------------------------

/// `__syncthreads` rounds through shared memory and `__syncthreads_count/and/or`.
pub fn barrier(dev: &Arc<dyn Device>) {
    let mut rng = rng(dev, "barrier");
    for (g, b, rounds) in [(3u32, 96u32, 5i32), (2, 1024, 3)] {
        let (gu, bu) = (g as usize, b as usize);
        let input = words(&mut rng, gu * bu);
        let (inp, out) = (upload(dev, &input), poisoned(dev, gu * bu + 4 * gu));
        // SAFETY: in has G·B words, out G·B + 4·G.
        unsafe {
            run(dev, "simt_selftest_barrier", (g, 1, 1), (b, 1, 1), 0, params(Some(&inp), Some(&out), None, rounds, 0))
        };
        let got = download(&out);
        for blk in 0..gu {
            let mut v = input[blk * bu..(blk + 1) * bu].to_vec();
            for r in 0..rounds as usize {
                v = (0..bu).map(|t| v[(t + 1 + r) % bu].wrapping_mul(3).wrapping_add(t as u32)).collect();
            }
            for t in 0..bu {
                assert_eq!(got[blk * bu + t], v[t], "{}: barrier B={b} block {blk} thread {t}", dev.name());
            }
            let o = &got[gu * bu + 4 * blk..][..4];
            // count(t % 3 == 0), and(1), or(t == B-1), and(t != 0)
            assert_eq!(o, [b.div_ceil(3), 1, 1, 0], "{}: __syncthreads_count/and/or, B={b} block {blk}", dev.name());
        }
    }
}

/// threadIdx/blockIdx in a 3-D grid of 3-D blocks.
pub fn index(dev: &Arc<dyn Device>) {
    let (grid, block) = ((2u32, 3u32, 2u32), (4u32, 2u32, 3u32));
    let total = 12 * 24;
    let out = poisoned(dev, 6 * total);
    // SAFETY: 6 words per thread.
    unsafe { run(dev, "simt_selftest_index", grid, block, 0, params(None, Some(&out), None, 0, 0)) };
    let got = download(&out);
    let mut g = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = [tx, ty, tz, bx, by, bz];
                            assert_eq!(got[6 * g..6 * g + 6], want, "{}: indices of thread {g}", dev.name());
                            g += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Block sum through dynamic shared memory, barriers and a shuffle tail; and the simulator's
/// traffic counters.
pub fn reduce(dev: &Arc<dyn Device>) {
    let mut rng = rng(dev, "reduce");
    for (g, b) in [(4u32, 256u32), (3, 64), (2, 1024)] {
        let (gu, bu) = (g as usize, b as usize);
        let input = words(&mut rng, gu * bu);
        let (inp, out) = (upload(dev, &input), poisoned(dev, gu));
        // SAFETY: G·B words in, G out; B·4 bytes of dynamic smem as the kernel needs.
        let st = unsafe {
            run(dev, "simt_selftest_reduce", (g, 1, 1), (b, 1, 1), 4 * b, params(Some(&inp), Some(&out), None, 0, 0))
        };
        let got = download(&out);
        for blk in 0..gu {
            let want = input[blk * bu..(blk + 1) * bu].iter().fold(0u32, |s, &x| s.wrapping_add(x));
            assert_eq!(got[blk], want, "{}: reduce B={b} block {blk}", dev.name());
        }
        if let Some(st) = st {
            let (g, b) = (g as u64, b as u64);
            let want = SimStats {
                bytes_read: 4 * g * b,
                bytes_written: 4 * g,
                blocks: g,
                threads: g * b,
                shuffles: 5 * g, // one warp per block, 5 shuffle steps
                barriers: st.barriers,
                ..SimStats::default()
            };
            assert_eq!(st, want, "{}: reduce B={b} counters", dev.name());
        }
    }
}

// ---- warp collectives -------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Shfl {
    Idx,
    Up,
    Down,
    Bfly,
}

/// `shfl.sync` per the PTX ISA pseudo-code, with CUDA's c operand ((32 - width) << 8 | clamp):
/// the value lane `lane` receives from the warp's `vals` for source operand `b`.
fn ptx_shfl(mode: Shfl, lane: u32, b: u32, width: u32, vals: &[u32]) -> u32 {
    let cval = if matches!(mode, Shfl::Up) { 0 } else { 31 };
    let segmask = (32 - width) & 31;
    let bval = b & 31;
    let max_lane = ((lane & segmask) | (cval & !segmask)) as i32;
    let min_lane = lane & segmask;
    let (j, pval) = match mode {
        Shfl::Up => {
            let j = lane as i32 - bval as i32;
            (j, j >= max_lane)
        }
        Shfl::Down => ((lane + bval) as i32, (lane + bval) as i32 <= max_lane),
        Shfl::Bfly => ((lane ^ bval) as i32, (lane ^ bval) as i32 <= max_lane),
        Shfl::Idx => {
            let j = (min_lane | (bval & !segmask)) as i32;
            (j, j <= max_lane)
        }
    };
    vals[if pval { j as usize } else { lane as usize }]
}

/// `__shfl*_sync` at every width, float and 64-bit shuffles, and two half-warp masks.
pub fn shuffle(dev: &Arc<dyn Device>) {
    let (g, b) = (2u32, 64u32);
    let n = (g * b) as usize;
    let input = words(&mut rng(dev, "shuffle"), n);
    let (inp, out) = (upload(dev, &input), poisoned(dev, 24 * n));
    // SAFETY: one word in and 24 out per thread.
    let st = unsafe {
        run(dev, "simt_selftest_shuffle", (g, 1, 1), (b, 1, 1), 0, params(Some(&inp), Some(&out), None, 0, 0))
    };
    let got = download(&out);
    for gid in 0..n {
        let lane = (gid % 32) as u32;
        let warp = &input[gid - lane as usize..][..32];
        let o = &got[24 * gid..][..24];
        let name = dev.name();
        let mut k = 0;
        for width in [32, 16, 8, 4, 2] {
            for (mode, b, what) in
                [(Shfl::Idx, 7 * lane + 3, "idx"), (Shfl::Up, 3, "up"), (Shfl::Down, 5, "down"), (Shfl::Bfly, 5, "xor")]
            {
                let want = ptx_shfl(mode, lane, b, width, warp);
                assert_eq!(o[k], want, "{name}: shfl {what} width {width} thread {gid}");
                k += 1;
            }
        }
        let l = lane as usize;
        assert_eq!(o[20], warp[l ^ 1], "{name}: float shuffle thread {gid}");
        let src = warp[l ^ 16];
        assert_eq!([o[21], o[22]], [src ^ 0xabcdef, src], "{name}: 64-bit shuffle thread {gid}");
        assert_eq!(o[23], warp[l ^ 1], "{name}: half-warp-mask shuffle thread {gid}");
    }
    if let Some(st) = st {
        assert_eq!(st.shuffles, 24 * n as u64 / 32, "{}: shuffle count", dev.name());
    }
}

/// `__ballot_sync`, `__any_sync`, `__all_sync` (full and half-warp masks) and `__syncwarp`.
pub fn vote(dev: &Arc<dyn Device>) {
    let n = 128;
    let mut input = words(&mut rng(dev, "vote"), n);
    // warp 0 all true, warp 1 all false, warps 2-3 random
    input[..32].iter_mut().for_each(|x| *x |= 1);
    input[32..64].iter_mut().for_each(|x| *x &= !1);
    let (inp, out) = (upload(dev, &input), poisoned(dev, 5 * n));
    // SAFETY: one word in and 5 out per thread.
    unsafe {
        run(dev, "simt_selftest_vote", (1, 1, 1), (n as u32, 1, 1), 0, params(Some(&inp), Some(&out), None, 0, 0))
    };
    let got = download(&out);
    for gid in 0..n {
        let lane = gid % 32;
        let ballot = (0..32).fold(0u32, |m, l| m | (input[gid - lane + l] & 1) << l);
        let half = if lane < 16 { 0x0000_ffff } else { 0xffff_0000 };
        let want = [ballot, (ballot != 0) as u32, (ballot == !0) as u32, ballot & half, 1];
        assert_eq!(got[5 * gid..5 * gid + 5], want, "{}: votes of thread {gid} (ballot {ballot:08x})", dev.name());
    }
}

/// Float and integer atomics from every thread of 37 blocks.
pub fn atomics(dev: &Arc<dyn Device>) {
    let (g, b) = (37u32, 96u32);
    let n = g * b;
    let mut init = [0u32; 8];
    init[2] = !0; // atomicMin target
    let out = upload(dev, &init);
    let fout = upload(dev, &[0, 0]); // 0.0f
                                     // SAFETY: 8 words out (the 64-bit counter at word 4 is 8-byte aligned), 2 floats fout.
    unsafe { run(dev, "simt_selftest_atomics", (g, 1, 1), (b, 1, 1), 0, params(None, Some(&out), Some(&fout), 0, 0)) };
    let (o, f) = (download(&out), download(&fout));
    let f = [f32::from_bits(f[0]), f32::from_bits(f[1])];
    // Every partial sum is an integer or quarter below 2^24: exact in any order.
    let fsum: u32 = (0..n).map(|i| i % 8).sum();
    assert_eq!(f, [0.25 * n as f32, fsum as f32], "{}: float atomicAdd", dev.name());
    let name = dev.name();
    assert_eq!(o[0], n, "{name}: atomicAdd");
    assert_eq!(o[1], n - 1, "{name}: atomicMax");
    assert_eq!(o[2], 5, "{name}: atomicMin");
    assert_eq!(o[3], n, "{name}: atomicCAS loop");
    assert_eq!((o[5] as u64) << 32 | o[4] as u64, (n as u64) << 32 | n as u64, "{name}: 64-bit atomicAdd");
    assert!(o[6] < n, "{name}: atomicExch left {}", o[6]);
    assert_eq!(o[7], n % 10, "{name}: atomicInc with limit 9");
}

// ---- tensor-core fragments --------------------------------------------------------------------

/// PTX ISA mma.m16n8k16 fragment layouts (g = lane / 4, t = lane % 4): (row, col) of element i of
/// lane's A (16×16), B (16×8, K×N) and C/D (16×8) fragment; element i sits in register i / 2, the
/// low half for even i.
fn a_elem(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + if i % 4 >= 2 { 8 } else { 0 }, 2 * (lane % 4) + i % 2 + if i >= 4 { 8 } else { 0 })
}
fn b_elem(lane: usize, i: usize) -> (usize, usize) {
    (2 * (lane % 4) + i % 2 + if i >= 2 { 8 } else { 0 }, lane / 4)
}
fn c_elem(lane: usize, i: usize) -> (usize, usize) {
    (lane / 4 + if i >= 2 { 8 } else { 0 }, 2 * (lane % 4) + i % 2)
}

/// Tolerance relative to Σ|terms| of each dot product. Products of 16-bit values are exact in
/// f32; the emulation then rounds each of its 16 additions (≤ 1e-6), a tensor core may
/// truncate while aligning to the largest term (a few ulps more). A wrong layout puts a wrong
/// term in the sum: an error of order 1e-1 of Σ|terms|.
const MMA_TOL: f64 = 1e-5;

/// One warp-wide mma per problem on random fragments, `f16` or bf16, with d a separate array or
/// aliasing c.
fn mma(dev: &Arc<dyn Device>, f16_inputs: bool) {
    let mut rng = rng(dev, if f16_inputs { "mma_f16" } else { "mma_bf16" });
    // Rounds to the 16-bit type: the bits, and the value the hardware multiplies.
    let to16 = |x: f32| -> (u32, f32) {
        if f16_inputs {
            let h = f16::from_f32(x);
            (h.to_bits() as u32, h.to_f32())
        } else {
            let h = bf16::from_f32(x);
            (h.to_bits() as u32, h.to_f32())
        }
    };
    let problems = 6usize;
    for in_place in [false, true] {
        let mode = f16_inputs as i32 | (in_place as i32) << 1;
        let mut input = vec![0u32; 320 * problems];
        let (mut want, mut mag) = (vec![0f64; 128 * problems], vec![0f64; 128 * problems]);
        for q in 0..problems {
            let mut draw =
                |n: usize| -> Vec<(u32, f32)> { (0..n).map(|_| to16(rng.range(-2.0, 2.0) as f32)).collect() };
            let (a, b) = (draw(16 * 16), draw(16 * 8)); // A row-major 16×16, B row-major K×N 16×8
            let c: Vec<f32> = (0..16 * 8).map(|_| rng.range(-2.0, 2.0) as f32).collect();
            for l in 0..32 {
                let f = &mut input[320 * q + 10 * l..][..10];
                for i in 0..8 {
                    let (r, col) = a_elem(l, i);
                    f[i / 2] |= a[16 * r + col].0 << (16 * (i % 2));
                }
                for i in 0..4 {
                    let (k, col) = b_elem(l, i);
                    f[4 + i / 2] |= b[8 * k + col].0 << (16 * (i % 2));
                }
                for i in 0..4 {
                    let (r, col) = c_elem(l, i);
                    f[6 + i] = c[8 * r + col].to_bits();
                    let terms = (0..16).map(|k| a[16 * r + k].1 as f64 * b[8 * k + col].1 as f64);
                    want[128 * q + 4 * l + i] = c[8 * r + col] as f64 + terms.clone().sum::<f64>();
                    mag[128 * q + 4 * l + i] = (c[8 * r + col] as f64).abs() + terms.map(f64::abs).sum::<f64>();
                }
            }
        }
        let (inp, out) = (upload(dev, &input), poisoned(dev, 128 * problems));
        // SAFETY: 320 words in and 128 out per problem; whole warps, 2 per block.
        let st = unsafe {
            run(
                dev,
                "simt_selftest_mma",
                (problems.div_ceil(2) as u32, 1, 1),
                (64, 1, 1),
                0,
                params(Some(&inp), Some(&out), None, problems as i32, mode),
            )
        };
        let got = download(&out);
        for (i, &bits) in got.iter().enumerate() {
            let d = f32::from_bits(bits) as f64;
            let (q, l, reg) = (i / 128, i % 128 / 4, i % 4);
            // NaN compares false: an unwritten or NaN output fails
            assert!(
                (d - want[i]).abs() <= MMA_TOL * mag[i],
                "{}: mma {} {}: problem {q} lane {l} d[{reg}] (row {}, col {}) = {d} != {}",
                dev.name(),
                if f16_inputs { "f16" } else { "bf16" },
                if in_place { "in place" } else { "d separate" },
                c_elem(l, reg).0,
                c_elem(l, reg).1,
                want[i]
            );
        }
        if let Some(st) = st {
            assert_eq!(st.mma, problems as u64, "{}: mma count", dev.name());
        }
    }
}

/// `mma.m16n8k16.row.col.f32.bf16.bf16.f32` fragment layout.
pub fn mma_bf16(dev: &Arc<dyn Device>) {
    mma(dev, false);
}

/// `mma.m16n8k16.row.col.f32.f16.f16.f32` fragment layout.
pub fn mma_f16(dev: &Arc<dyn Device>) {
    mma(dev, true);
}

/// `ldmatrix.m8n8` x1, x2, x4, each with and without `.trans`, with scattered row addresses.
pub fn ldmatrix(dev: &Arc<dyn Device>) {
    let mut rng = rng(dev, "ldmatrix");
    let problems = 4usize;
    for mode in 0..6 {
        let (nmat, trans) = (1usize << (mode % 3), mode >= 3);
        let input = words(&mut rng, 128 * problems);
        let (inp, out) = (upload(dev, &input), poisoned(dev, 128 * problems));
        // SAFETY: 128 words in and out per problem; whole warps, 2 per block.
        let st = unsafe {
            run(
                dev,
                "simt_selftest_ldmatrix",
                (problems.div_ceil(2) as u32, 1, 1),
                (64, 1, 1),
                0,
                params(Some(&inp), Some(&out), None, problems as i32, mode),
            )
        };
        let got = download(&out);
        let what = ["x1", "x2", "x4"][mode as usize % 3];
        for q in 0..problems {
            // Element (r, c) of matrix j: row r came from the address lane 8j + r passed, which is
            // input row (5·(8j + r) + 3) % 32 (4 words = 8 b16 per row, low half first).
            let m = |j: usize, r: usize, c: usize| -> u32 {
                let src = (5 * (8 * j + r) + 3) % 32;
                (input[128 * q + 4 * src + c / 2] >> (16 * (c % 2))) & 0xffff
            };
            for l in 0..32 {
                let (row, col) = (l / 4, 2 * (l % 4));
                for j in 0..4 {
                    // registers beyond the matrix count keep the kernel's 0
                    let want = match (j < nmat, trans) {
                        (false, _) => 0,
                        (true, false) => m(j, row, col) | m(j, row, col + 1) << 16,
                        (true, true) => m(j, col, row) | m(j, col + 1, row) << 16,
                    };
                    let g = got[128 * q + 4 * l + j];
                    assert_eq!(
                        g,
                        want,
                        "{}: ldmatrix {what}{} problem {q} lane {l} reg {j}: {g:08x} != {want:08x}",
                        dev.name(),
                        if trans { ".trans" } else { "" }
                    );
                }
            }
        }
        if let Some(st) = st {
            assert_eq!(st.ldmatrix, problems as u64, "{}: ldmatrix count", dev.name());
        }
    }
}

pub type Check = fn(&Arc<dyn Device>);

/// Every check above, for the simulator tests (tests/gpu.rs lists them one by one).
pub const CHECKS: &[(&str, Check)] = &[
    ("barrier", barrier),
    ("index", index),
    ("reduce", reduce),
    ("shuffle", shuffle),
    ("vote", vote),
    ("atomics", atomics),
    ("mma_bf16", mma_bf16),
    ("mma_f16", mma_f16),
    ("ldmatrix", ldmatrix),
];
