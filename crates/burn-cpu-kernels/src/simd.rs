//! The vector instruction sets the kernels are compiled for, chosen at run time.
//!
//! The crate is built for baseline x86-64 (SSE2). Its element-wise loops and transforms are
//! written once, as plain Rust over fixed-size lanes, and [`dispatch!`] compiles a copy of
//! each for AVX2 and one for AVX-512 (with 32 vector registers and 512-bit vectors); the
//! kernels take AVX2 where the CPU has it ([`Simd::detect`] says why not AVX-512). The copies
//! execute the same operations in the same order (Rust does not fuse a multiplication and an
//! addition unless asked), so every path gives the same bits; the tests run each path the CPU
//! has against the baseline.

/// A vector instruction set with a compiled path in this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Simd {
    /// What every x86-64 CPU has (SSE2), and every other architecture's default.
    Baseline,
    /// AVX2 with FMA (Intel Haswell, AMD Zen and later).
    Avx2,
    /// AVX-512 F, VL, BW and DQ (Intel Skylake-SP, AMD Zen 4 and later). Built and tested;
    /// [`Simd::detect`] does not choose it yet.
    #[cfg_attr(not(test), allow(dead_code))]
    Avx512,
}

impl Simd {
    /// The instruction set the kernels run with on this CPU: AVX2 where it has it, else the
    /// baseline. The AVX-512 copies are built and tested but not chosen: on an AMD EPYC of
    /// the Zen 4 generation they ran ResNet-18 (CIFAR, batch 64) at 152 and 132 images/s in
    /// inference where the AVX2 ones ran at 184 and 187, and trained at 40 and 39 where AVX2
    /// trained at 46 and 48 (BENCHMARKS.md, "What we tried").
    pub(crate) fn detect() -> Self {
        if Simd::Avx2.is_available() {
            Simd::Avx2
        } else {
            Simd::Baseline
        }
    }

    /// Every instruction set this CPU has, narrowest first (the tests run each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        [Simd::Baseline, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|simd| simd.is_available())
            .collect()
    }

    /// Whether this CPU has the set (std caches the answer: a load and a test).
    fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Simd::Baseline => true,
                Simd::Avx2 => has!("avx2") && has!("fma"),
                Simd::Avx512 => {
                    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Simd::Baseline
        }
    }
}

/// `$function(args)` compiled for the instruction set `$simd`: a copy of `$function` (which
/// must be `#[inline(always)]`, as must what it calls) inlined into a function built with the
/// set's target features, one copy a set. Arguments are typed as the copies take them:
/// `dispatch!(simd, lane_sums(a: &[f32] = x, ...) -> [f64; 2])`.
///
/// A `Simd` other than the baseline comes only from [`Simd::detect`] or, in the tests,
/// `Simd::available`, so the CPU has the instructions it enables.
macro_rules! dispatch {
    ($simd:expr, $($function:ident)::+ ($($arg:ident: $ty:ty = $value:expr),* $(,)?) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn avx2($($arg: $ty),*) -> $ret {
            $($function)::+($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")]
        fn avx512($($arg: $ty),*) -> $ret {
            $($function)::+($($arg),*)
        }
        match $simd {
            // SAFETY: the CPU has the set (see above).
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Simd::Avx2 => unsafe { avx2($($value),*) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Simd::Avx512 => unsafe { avx512($($value),*) },
            _ => $($function)::+($($value),*),
        }
    }};
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_always_there_and_detection_takes_avx2_at_most() {
        let available = Simd::available();
        assert_eq!(available[0], Simd::Baseline);
        assert!(available.is_sorted());
        assert!(available.contains(&Simd::detect()) && Simd::detect() <= Simd::Avx2);
        println!("instruction sets on this CPU: {available:?}");
    }
}
