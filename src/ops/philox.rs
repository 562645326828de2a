//! Philox-4x32-10 counter-based RNG and the LoRA dropout mask built on it.
//!
//! Philox-4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"):
//! multipliers `M0 = 0xD2511F53`, `M1 = 0xCD9E8D57`, key bumps `W0 = 0x9E3779B9`,
//! `W1 = 0xBB67AE85`, 10 rounds. One round on counter `c[0..4]` with key `k[0..2]`:
//! `(hi0, lo0) = M0·c0`, `(hi1, lo1) = M1·c2` (64-bit products), then
//! `c = [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]`; the key is bumped by `(W0, W1)` between rounds.
//!
//! **Dropout convention** (the CUDA kernels and the simulator implement the same, bit for bit):
//! - key = `(seed as u32, (seed >> 32) as u32)`;
//! - for the linear element index `e` of `x` (row-major `[M, K]`, `e = m·K + k`) and a per-call
//!   offset `o: u64`, counter = `((e>>2) as u32, ((e>>2)>>32) as u32, o as u32, (o>>32) as u32)`;
//! - the element's random word is output word `e & 3`;
//! - the element is **kept** iff `word >= t`, `t = min(round(p·2³²), 2³²−1)` (so `p = 0` keeps
//!   everything); kept elements are scaled by `1/(1−p)`.
//!
//! No floating point decides a mask bit, so every backend gets the identical mask, and backward
//! regenerates it instead of storing it.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox-4x32-10 of `counter` under `key`.
///
/// Known answers (Random123 test vectors, checked in the tests below):
/// key (0,0), counter 0 → `6627e8d5 e169c58d bc57ac4c 9b00dbd8`;
/// key and counter all `0xffffffff` → `408f276d 41c83b0e a20bc7c6 6d5451fd`.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Dropout parameters as integers/f32 computed once on the host (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    /// RNG seed (the Philox key).
    pub seed: u64,
    /// Per-call offset (counter words 2–3): distinct for each module, layer and step.
    pub offset: u64,
    /// Keep iff `word >= threshold`.
    pub threshold: u32,
    /// `1/(1−p)`, applied to kept elements.
    pub scale: f32,
}

impl DropoutMask {
    /// The mask for drop probability `p` in `[0, 1)`.
    pub fn new(p: f32, seed: u64, offset: u64) -> Self {
        let t = (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64).max(0.0) as u32;
        DropoutMask { seed, offset, threshold: t, scale: 1.0 / (1.0 - p) }
    }
    /// True when nothing is ever dropped (`p = 0`).
    pub fn is_identity(&self) -> bool {
        self.threshold == 0
    }
    /// The four Philox words for elements `4g .. 4g+4`.
    #[inline]
    pub fn words(&self, group: u64) -> [u32; 4] {
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        philox4x32_10([group as u32, (group >> 32) as u32, self.offset as u32, (self.offset >> 32) as u32], key)
    }
    /// Whether element `e` is kept.
    #[inline]
    pub fn keep(&self, e: u64) -> bool {
        self.words(e >> 2)[(e & 3) as usize] >= self.threshold
    }
    /// Random words of elements `start .. start + out.len()` (`out[i]` belongs to element
    /// `start + i`), computed 32 Philox blocks at a time so the compiler vectorizes them.
    pub fn fill_words(&self, start: u64, out: &mut [u32]) {
        // 32 blocks = four AVX-512 registers per counter word: enough independent multiply chains
        // to hide `vpmuludq`'s latency (2× faster than 16 blocks); 64 spills (measured).
        const LANES: usize = 32;
        let mut e = start;
        let mut i = 0;
        // Unaligned head: element-wise until e is a multiple of 4.
        while i < out.len() && e & 3 != 0 {
            out[i] = self.words(e >> 2)[(e & 3) as usize];
            i += 1;
            e += 1;
        }
        // One dispatch for the whole vectorized middle part.
        let full = (out.len() - i) / (4 * LANES) * (4 * LANES);
        philox_blocks::<LANES>(self, e >> 2, &mut out[i..i + full]);
        i += full;
        e += full as u64;
        if out.len() - i >= 16 {
            // A vectorized block for the tail too (e is a multiple of 4 here).
            let mut tail = [0u32; 4 * LANES];
            philox_blocks::<LANES>(self, e >> 2, &mut tail);
            let rest = out.len() - i;
            out[i..].copy_from_slice(&tail[..rest]);
            i += rest;
        }
        while i < out.len() {
            out[i] = self.words(e >> 2)[(e & 3) as usize];
            i += 1;
            e += 1;
        }
    }

    /// `out[i] = drop(x)[i]` for the elements `x` that start at linear index `start`
    /// (kept: `x·scale`, dropped: 0). `start` need not be a multiple of 4.
    pub fn apply(&self, start: u64, x: &[f32], out: &mut [f32]) {
        if self.is_identity() {
            out.copy_from_slice(x);
            return;
        }
        let mut words = [0u32; 1024];
        for (c, (xs, os)) in x.chunks(1024).zip(out.chunks_mut(1024)).enumerate() {
            let w = &mut words[..xs.len()];
            self.fill_words(start + (c * 1024) as u64, w);
            self.apply_words(w, xs, os, false);
        }
    }

    /// The keep bits of a `[rows, cols]` block from its words ([`Self::fill_words`]): bit `j % 32`
    /// of `bits[i·⌈cols/32⌉ + j/32]` is set iff element `(i, j)` is kept (the layout of
    /// [`crate::ops::matmul::KeepMask`]); bits past `cols` are clear.
    pub fn keep_bits(&self, words: &[u32], cols: usize, bits: &mut [u32]) {
        let t = self.threshold;
        let per_row = cols.div_ceil(32);
        crate::ops::simd::with_simd(|| {
            for (row, out) in words.chunks_exact(cols).zip(bits.chunks_exact_mut(per_row)) {
                for (group, out) in row.chunks(32).zip(out.iter_mut()) {
                    *out = group.iter().enumerate().fold(0u32, |acc, (b, &w)| acc | ((w >= t) as u32) << b);
                }
            }
        });
    }

    /// Dropout of `x` by words from [`Self::fill_words`]: `out[i] = drop(x)[i]`, or
    /// `out[i] += drop(x)[i]` with `accumulate` (the words can then serve several tensors).
    pub fn apply_words(&self, words: &[u32], x: &[f32], out: &mut [f32], accumulate: bool) {
        let (t, sc) = (self.threshold, self.scale);
        let kept = move |w: u32, v: f32| if w >= t { v * sc } else { 0.0 };
        let it = out.iter_mut().zip(x.iter().zip(words));
        crate::ops::simd::with_simd(|| {
            if accumulate {
                it.for_each(|(o, (&v, &w))| *o += kept(w, v));
            } else {
                it.for_each(|(o, (&v, &w))| *o = kept(w, v));
            }
        });
    }
}

/// Philox blocks `g0, g0 + 1, …` of `m`'s stream into `out` (a multiple of `4L` words):
/// `out[4j + lane]` is word `lane` of block `g0 + j`. Computed `L` blocks at a time, lane-parallel
/// (struct of arrays) so it vectorizes; dispatched to AVX-512/AVX2 at run time, since the crate
/// is built for the baseline x86-64 target.
fn philox_blocks<const L: usize>(m: &DropoutMask, g0: u64, out: &mut [u32]) {
    #[inline(always)]
    fn body<const L: usize>(m: &DropoutMask, g0: u64, out: &mut [u32]) {
        // Counter words live in the low halves of u64 lanes: `(c & LO) * M` is then the 32×32→64
        // product `vpmuludq` computes, with no widening or narrowing shuffles between rounds.
        // High halves hold garbage that every use masks off.
        const LO: u64 = 0xffff_ffff;
        let (mut c0, mut c1, mut c2, mut c3) = ([0u64; L], [0u64; L], [m.offset; L], [m.offset >> 32; L]);
        for j in 0..L {
            let g = g0 + j as u64;
            c0[j] = g;
            c1[j] = g >> 32;
        }
        let (mut k0, mut k1) = (m.seed & LO, m.seed >> 32);
        for round in 0..10 {
            if round > 0 {
                k0 = k0.wrapping_add(W0 as u64);
                k1 = k1.wrapping_add(W1 as u64);
            }
            for j in 0..L {
                let p0 = (c0[j] & LO) * M0 as u64;
                let p1 = (c2[j] & LO) * M1 as u64;
                let n0 = (p1 >> 32) ^ c1[j] ^ k0;
                let n2 = (p0 >> 32) ^ c3[j] ^ k1;
                c1[j] = p1;
                c3[j] = p0;
                c0[j] = n0;
                c2[j] = n2;
            }
        }
        for j in 0..L {
            out[4 * j..4 * j + 4].copy_from_slice(&[c0[j] as u32, c1[j] as u32, c2[j] as u32, c3[j] as u32]);
        }
    }
    #[inline(always)]
    fn all<const L: usize>(m: &DropoutMask, g0: u64, out: &mut [u32]) {
        for (j, blk) in out.chunks_exact_mut(4 * L).enumerate() {
            body::<L>(m, g0 + (j * L) as u64, blk);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<const L: usize>(m: &DropoutMask, g0: u64, out: &mut [u32]) {
            all::<L>(m, g0, out)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<const L: usize>(m: &DropoutMask, g0: u64, out: &mut [u32]) {
            all::<L>(m, g0, out)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the enabled feature (checked just above).
            return unsafe { avx512::<L>(m, g0, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { avx2::<L>(m, g0, out) };
        }
    }
    all::<L>(m, g0, out)
}

/// Uniform f32 values in `[0, 1)` from Philox (24-bit mantissa of each word), for weight init.
pub fn uniform(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    let m = DropoutMask::new(0.0, seed, offset);
    let mut out = Vec::with_capacity(n);
    let mut g = 0u64;
    while out.len() < n {
        for w in m.words(g) {
            if out.len() < n {
                out.push((w >> 8) as f32 * (1.0 / 16_777_216.0));
            }
        }
        g += 1;
    }
    out
}

/// Standard-normal f32 values (Box–Muller on [`uniform`] pairs), for `"gaussian"` init.
pub fn normal(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    let u = uniform(seed, offset, n + n % 2);
    let mut out = Vec::with_capacity(n + 1);
    for p in u.chunks(2) {
        let r = (-2.0 * (1.0 - p[0] as f64).ln()).sqrt();
        let th = std::f64::consts::TAU * p[1] as f64;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn apply_matches_keep_at_any_start() {
        let m = DropoutMask::new(0.3, 0x1234_5678_9abc_def0, 77);
        let x: Vec<f32> = (0..23).map(|i| i as f32 + 1.0).collect();
        let mut out = vec![0.0; 23];
        m.apply(5, &x, &mut out);
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            let want = if m.keep(5 + i as u64) { v * m.scale } else { 0.0 };
            assert_eq!(o, want);
        }
    }

    #[test]
    fn vectorized_words_match_scalar() {
        let m = DropoutMask::new(0.1, 0xdead_beef_0123_4567, 1 << 40);
        let ragged = [1usize, 15, 16, 127, 128, 129, 143, 255, 256, 300, 1000].into_iter();
        let cases = ragged.flat_map(|len| (0..8u64).map(move |start| (start * 1021, len)));
        for (start, len) in [(0u64, 200), (3, 200), ((1 << 34) - 5, 200), (8, 688), (1, 70)].into_iter().chain(cases) {
            let mut w = vec![0u32; len];
            m.fill_words(start, &mut w);
            for (i, &v) in w.iter().enumerate() {
                let e = start + i as u64;
                assert_eq!(v, m.words(e >> 2)[(e & 3) as usize], "element {e}");
            }
        }
    }

    #[test]
    fn apply_words_accumulates_kept_elements() {
        let m = DropoutMask::new(0.4, 3, 9);
        let x: Vec<f32> = (0..300).map(|i| i as f32 - 100.0).collect();
        let mut w = vec![0u32; 300];
        m.fill_words(77, &mut w);
        let mut out = vec![1.0f32; 300];
        m.apply_words(&w, &x, &mut out, true);
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            assert_eq!(o, 1.0 + if m.keep(77 + i as u64) { v * m.scale } else { 0.0 });
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(DropoutMask::new(0.0, 1, 0).threshold, 0);
        assert_eq!(DropoutMask::new(0.5, 1, 0).threshold, 1 << 31);
        assert_eq!(DropoutMask::new(0.9999999999, 1, 0).threshold, u32::MAX);
    }
}
