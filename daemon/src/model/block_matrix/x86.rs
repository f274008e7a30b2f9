//! The x86-64 kernels: AVX-512 VNNI and AVX2, for Q8_0 and Q4_0 weights.
//!
//! The weights are the unsigned side of x86's byte products (VNNI's `vpdpbusd`, AVX2's
//! `maddubs` multiply unsigned by signed bytes): Q8_0's are stored offset by 128, Q4_0's nibbles
//! are 0-15 for -8 to 7. Each block's sums start from `-offset x` the activation block's sum,
//! which takes the offset back out.

use std::arch::x86_64::*;

use tract_onnx::prelude::f16;

use super::{QuantizedRow, TileSums, BLOCK, GROUP, PANEL, Q4_0_PANEL_BLOCK, Q8_0_PANEL_BLOCK};

/// Values `4 group .. 4 group + 4` of `x`'s block `block`, in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn broadcast_group(x: &QuantizedRow, block: usize, group: usize) -> __m256i {
    // SAFETY: the group lies inside the row (`Kernel::panels` checked its width).
    _mm256_set1_epi32(unsafe { x.quants.as_ptr().add(block * BLOCK + group * GROUP).cast::<i32>().read_unaligned() })
}

/// `sum + dots x weight scales x x's scale`, lane by lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_and_add(sum: __m256, dots: __m256i, weight_scales: __m256, x_scale: f32) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(weight_scales, _mm256_set1_ps(x_scale)), sum)
}

/// What a block's sums start from: the weights' `offset` times the activation block's sum, taken
/// back out.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn offset_correction(x: &QuantizedRow, block: usize, offset: i32) -> __m256i {
    _mm256_set1_epi32(-offset * x.sums[block])
}

/// Adds each panel's totals, times its block's scales, and stores them: `P` panels' sums of `M`
/// activation rows for one block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_block<const M: usize, const P: usize>(
    totals: &mut [[__m256; M]; P],
    dots: &[[__m256i; M]; P],
    scales: &[f16],
    blocks: usize,
    block: usize,
    xs: &[QuantizedRow],
) {
    for p in 0..P {
        // SAFETY: this block's eight f16 scales of panel `p` (`Kernel::panels` checked the sizes).
        let weight_scales = unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add((p * blocks + block) * PANEL).cast::<__m128i>()))
        };
        for m in 0..M {
            totals[p][m] = unsafe { scale_and_add(totals[p][m], dots[p][m], weight_scales, xs[m].scales[block]) };
        }
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store<const M: usize, const P: usize>(totals: &[[__m256; M]; P], sums: &mut TileSums) {
    for (p, totals) in totals.iter().enumerate() {
        for m in 0..M {
            // SAFETY: eight f32 into an array of `PANEL * TILE_PANELS`, at panel `p`'s place.
            unsafe { _mm256_storeu_ps(sums[m].as_mut_ptr().add(p * PANEL), totals[m]) };
        }
    }
}

/// 32 bytes at `at` of `quants`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(quants: &[u8], at: usize) -> __m256i {
    // SAFETY: the caller's offset lies 32 bytes inside the panels (`Kernel::panels` checked).
    unsafe { _mm256_loadu_si256(quants.as_ptr().add(at).cast::<__m256i>()) }
}

/// Q8_0 by VNNI's `vpdpbusd`, which adds each four products into an i32 lane without
/// saturating. `P` panels at once: AVX-512 has 32 vector registers, room for the sums of two
/// panels against four rows, and each broadcast activation value then serves both.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn q8_0_vnni<const M: usize, const P: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let blocks = xs[0].scales.len();
    let mut totals = [[_mm256_setzero_ps(); M]; P];
    for block in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); M]; P];
        for m in 0..M {
            let correction = unsafe { offset_correction(&xs[m], block, 128) };
            for dots in &mut dots {
                dots[m] = correction;
            }
        }
        for group in 0..BLOCK / GROUP {
            let mut weights = [_mm256_setzero_si256(); P];
            for (p, weights) in weights.iter_mut().enumerate() {
                *weights = unsafe { load(quants, (p * blocks + block) * Q8_0_PANEL_BLOCK + group * PANEL * GROUP) };
            }
            for m in 0..M {
                let x = unsafe { broadcast_group(&xs[m], block, group) };
                for p in 0..P {
                    dots[p][m] = _mm256_dpbusd_epi32(dots[p][m], weights[p], x);
                }
            }
        }
        unsafe { scale_block(&mut totals, &dots, scales, blocks, block, xs) };
    }
    unsafe { store(&totals, sums) };
}

/// Q4_0 by VNNI: each 32 bytes of a panel's block hold group `c` in their low nibbles and group
/// `c + 4` in their high ones, so one load gives two groups' weights with an `and` and a shift.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn q4_0_vnni<const M: usize, const P: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let blocks = xs[0].scales.len();
    let nibble = _mm256_set1_epi8(0x0F);
    let mut totals = [[_mm256_setzero_ps(); M]; P];
    for block in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); M]; P];
        for m in 0..M {
            let correction = unsafe { offset_correction(&xs[m], block, 8) };
            for dots in &mut dots {
                dots[m] = correction;
            }
        }
        for chunk in 0..BLOCK / GROUP / 2 {
            let mut low = [_mm256_setzero_si256(); P];
            let mut high = [_mm256_setzero_si256(); P];
            for p in 0..P {
                let packed = unsafe { load(quants, (p * blocks + block) * Q4_0_PANEL_BLOCK + chunk * PANEL * GROUP) };
                low[p] = _mm256_and_si256(packed, nibble);
                high[p] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            }
            for m in 0..M {
                let (x_low, x_high) =
                    unsafe { (broadcast_group(&xs[m], block, chunk), broadcast_group(&xs[m], block, chunk + 4)) };
                for p in 0..P {
                    dots[p][m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(dots[p][m], low[p], x_low), high[p], x_high);
                }
            }
        }
        unsafe { scale_block(&mut totals, &dots, scales, blocks, block, xs) };
    }
    unsafe { store(&totals, sums) };
}

/// Q8_0 without VNNI: `maddubs` multiplies unsigned by signed bytes into pairs of i16, so it
/// takes |w| and x with w's sign (a weight of -128 is right this way: its |w| is the byte 128,
/// while x, within +-127, never overflows), and `madd` with ones widens each four into an i32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0_avx2<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let blocks = xs[0].scales.len();
    let bias = _mm256_set1_epi8(super::Q8_0_WEIGHT_BIAS as i8);
    let ones = _mm256_set1_epi16(1);
    let mut totals = [[_mm256_setzero_ps(); M]; 1];
    for block in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); M]; 1];
        for group in 0..BLOCK / GROUP {
            let weights = unsafe { load(quants, block * Q8_0_PANEL_BLOCK + group * PANEL * GROUP) };
            let weights = _mm256_xor_si256(weights, bias);
            let magnitudes = _mm256_sign_epi8(weights, weights);
            for m in 0..M {
                let x = _mm256_sign_epi8(unsafe { broadcast_group(&xs[m], block, group) }, weights);
                dots[0][m] = _mm256_add_epi32(dots[0][m], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, x), ones));
            }
        }
        unsafe { scale_block(&mut totals, &dots, scales, blocks, block, xs) };
    }
    unsafe { store(&totals, sums) };
}

/// Q4_0 without VNNI: the nibbles (0-15) are `maddubs`'s unsigned side as they are; a low and a
/// high group's pairs (each within 2 x 15 x 127) add in i16 before `madd` widens them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0_avx2<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let blocks = xs[0].scales.len();
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut totals = [[_mm256_setzero_ps(); M]; 1];
    for block in 0..blocks {
        let mut dots = [[_mm256_setzero_si256(); M]; 1];
        for m in 0..M {
            dots[0][m] = unsafe { offset_correction(&xs[m], block, 8) };
        }
        for chunk in 0..BLOCK / GROUP / 2 {
            let packed = unsafe { load(quants, block * Q4_0_PANEL_BLOCK + chunk * PANEL * GROUP) };
            let low = _mm256_and_si256(packed, nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            for m in 0..M {
                let (x_low, x_high) =
                    unsafe { (broadcast_group(&xs[m], block, chunk), broadcast_group(&xs[m], block, chunk + 4)) };
                let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_low), _mm256_maddubs_epi16(high, x_high));
                dots[0][m] = _mm256_add_epi32(dots[0][m], _mm256_madd_epi16(pairs, ones));
            }
        }
        unsafe { scale_block(&mut totals, &dots, scales, blocks, block, xs) };
    }
    unsafe { store(&totals, sums) };
}
