//! The aarch64 kernels: NEON with the dot-product extension (the Pi 5's Cortex-A76) and
//! without it (every aarch64 core, the Pi 4's A72 included), for Q8_0 and Q4_0 weights.
//!
//! ARM's byte products are signed by signed: Q8_0's weights are used as they are, Q4_0's nibbles
//! (0-15 for -8 to 7) as small positive bytes, with `-8 x` the activation block's sum added to
//! each block's sums to take the offset back out.

use std::arch::aarch64::*;
use std::arch::asm;

use tract_onnx::prelude::f16;

use super::{QuantizedRow, TileSums, BLOCK, GROUP, PANEL, Q4_0_PANEL_BLOCK, Q8_0_PANEL_BLOCK};

/// `totals += dots x weight scales x x's scale`, for the panel's rows 0-3 and 4-7.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn scale_and_add(totals: &mut [float32x4_t; 2], dots: [int32x4_t; 2], weight_scales: *const f16, x_scale: f32) {
    // SAFETY: this block's eight scales (`Kernel::panels` checked the sizes).
    let weight_scales = unsafe { widen(vld1q_u16(weight_scales.cast::<u16>())) };
    for half in 0..2 {
        totals[half] = vfmaq_f32(totals[half], vcvtq_f32_s32(dots[half]), vmulq_n_f32(weight_scales[half], x_scale));
    }
}

/// Eight f16 as f32, exactly: `fcvtl`/`fcvtl2`, in every ARMv8 core's NEON. Written out because
/// Rust's f16 vector types are not stable yet.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen(halves: uint16x8_t) -> [float32x4_t; 2] {
    let (low, high): (float32x4_t, float32x4_t);
    // SAFETY: registers only.
    unsafe {
        asm!(
            "fcvtl {low:v}.4s, {halves:v}.4h",
            "fcvtl2 {high:v}.4s, {halves:v}.8h",
            halves = in(vreg) halves,
            low = out(vreg) low,
            high = out(vreg) high,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    [low, high]
}

/// Four values of `x`'s block `block` from value `4 group`, in both 32-bit lanes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn group_of(x: &QuantizedRow, block: usize, group: usize) -> int8x8_t {
    // SAFETY: the group lies inside the row (`Kernel::panels` checked its width).
    let values = unsafe { x.quants.as_ptr().add(block * BLOCK + group * GROUP).cast::<i32>().read_unaligned() };
    vreinterpret_s8_s32(vdup_n_s32(values))
}

/// Per activation row, sums of pairs of values for the rows (0, 1), (2, 3), (4, 5), (6, 7) into
/// one block's dot products: rows 0-3 and 4-7, each plus `correction`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn pairs_to_dots(pairs: &[int32x4_t; 4], correction: i32) -> [int32x4_t; 2] {
    let correction = vdupq_n_s32(correction);
    [vaddq_s32(vpaddq_s32(pairs[0], pairs[1]), correction), vaddq_s32(vpaddq_s32(pairs[2], pairs[3]), correction)]
}

/// Q8_0 by widening multiplies (i8 x i8 into i16, at most 128 x 128) added pairwise into i32.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q8_0_neon<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let mut totals = [[vdupq_n_f32(0.0); 2]; M];
    for block in 0..xs[0].scales.len() {
        let mut pairs = [[vdupq_n_s32(0); 4]; M];
        for group in 0..BLOCK / GROUP {
            // SAFETY: 32 bytes of this block's panel.
            let at = unsafe { quants.as_ptr().add(block * Q8_0_PANEL_BLOCK + group * PANEL * GROUP).cast::<i8>() };
            let weights = unsafe { [vld1_s8(at), vld1_s8(at.add(8)), vld1_s8(at.add(16)), vld1_s8(at.add(24))] };
            for m in 0..M {
                let x = unsafe { group_of(&xs[m], block, group) };
                for pair in 0..4 {
                    pairs[m][pair] = vpadalq_s16(pairs[m][pair], vmull_s8(weights[pair], x));
                }
            }
        }
        for m in 0..M {
            let dots = unsafe { pairs_to_dots(&pairs[m], 0) };
            unsafe { scale_and_add(&mut totals[m], dots, scales.as_ptr().add(block * PANEL), xs[m].scales[block]) };
        }
    }
    store(&totals, sums);
}

/// Q4_0 by widening multiplies: each 32 bytes of a panel's block hold group `c` in their low
/// nibbles and group `c + 4` in their high ones.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q4_0_neon<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let nibble = vdup_n_u8(0x0F);
    let mut totals = [[vdupq_n_f32(0.0); 2]; M];
    for block in 0..xs[0].scales.len() {
        let mut pairs = [[vdupq_n_s32(0); 4]; M];
        for chunk in 0..BLOCK / GROUP / 2 {
            // SAFETY: 32 bytes of this block's panel.
            let at = unsafe { quants.as_ptr().add(block * Q4_0_PANEL_BLOCK + chunk * PANEL * GROUP) };
            let packed = unsafe { [vld1_u8(at), vld1_u8(at.add(8)), vld1_u8(at.add(16)), vld1_u8(at.add(24))] };
            let low = packed.map(|p| vreinterpret_s8_u8(vand_u8(p, nibble)));
            let high = packed.map(|p| vreinterpret_s8_u8(vshr_n_u8::<4>(p)));
            for m in 0..M {
                let (x_low, x_high) = unsafe { (group_of(&xs[m], block, chunk), group_of(&xs[m], block, chunk + 4)) };
                for pair in 0..4 {
                    let products = vmlal_s8(vmull_s8(low[pair], x_low), high[pair], x_high);
                    pairs[m][pair] = vpadalq_s16(pairs[m][pair], products);
                }
            }
        }
        for m in 0..M {
            let dots = unsafe { pairs_to_dots(&pairs[m], -8 * xs[m].sums[block]) };
            unsafe { scale_and_add(&mut totals[m], dots, scales.as_ptr().add(block * PANEL), xs[m].scales[block]) };
        }
    }
    store(&totals, sums);
}

/// `acc[i] += w[4i..4i + 4] . x[4 LANE..4 LANE + 4]`: ARMv8.2's `sdot` by element. Written out
/// because Rust's `vdotq_laneq_s32` is not stable yet.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: registers only; the caller's CPU has the dot-product extension.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            lane = const LANE,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// The row's 32 values of block `block`, as two halves of 16.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn block_of(x: &QuantizedRow, block: usize) -> [int8x16_t; 2] {
    // SAFETY: the row's 32 values of this block (`Kernel::panels` checked its width).
    let at = unsafe { x.quants.as_ptr().add(block * BLOCK) };
    unsafe { [vld1q_s8(at), vld1q_s8(at.add(16))] }
}

/// Q8_0 by the dot-product extension: `sdot` against one 32-bit lane of the activation block
/// gives four rows' sums of four products in one instruction.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn q8_0_dot_product<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let mut totals = [[vdupq_n_f32(0.0); 2]; M];
    for block in 0..xs[0].scales.len() {
        let w = unsafe { quants.as_ptr().add(block * Q8_0_PANEL_BLOCK).cast::<i8>() };
        let x: [[int8x16_t; 2]; M] = std::array::from_fn(|m| unsafe { block_of(&xs[m], block) });
        let mut dots = [[vdupq_n_s32(0); 2]; M];
        // Group g: 16 bytes for rows 0-3 and 16 for rows 4-7, against the x values 4g..4g + 4.
        macro_rules! group {
            ($group:literal, $half:literal, $lane:literal) => {
                // SAFETY: 32 bytes of this block's panel.
                let weights = unsafe { [vld1q_s8(w.add($group * 32)), vld1q_s8(w.add($group * 32 + 16))] };
                for m in 0..M {
                    dots[m][0] = unsafe { sdot::<$lane>(dots[m][0], weights[0], x[m][$half]) };
                    dots[m][1] = unsafe { sdot::<$lane>(dots[m][1], weights[1], x[m][$half]) };
                }
            };
        }
        group!(0, 0, 0);
        group!(1, 0, 1);
        group!(2, 0, 2);
        group!(3, 0, 3);
        group!(4, 1, 0);
        group!(5, 1, 1);
        group!(6, 1, 2);
        group!(7, 1, 3);
        for m in 0..M {
            unsafe { scale_and_add(&mut totals[m], dots[m], scales.as_ptr().add(block * PANEL), xs[m].scales[block]) };
        }
    }
    store(&totals, sums);
}

/// Q4_0 by the dot-product extension: chunk `c`'s low nibbles are group `c` (the block's first
/// 16 values, lane `c`), its high nibbles group `c + 4` (the second 16, lane `c`).
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn q4_0_dot_product<const M: usize>(
    quants: &[u8],
    scales: &[f16],
    xs: &[QuantizedRow],
    sums: &mut TileSums,
) {
    let xs = &xs[..M];
    let nibble = vdupq_n_u8(0x0F);
    let mut totals = [[vdupq_n_f32(0.0); 2]; M];
    for block in 0..xs[0].scales.len() {
        let w = unsafe { quants.as_ptr().add(block * Q4_0_PANEL_BLOCK) };
        let x: [[int8x16_t; 2]; M] = std::array::from_fn(|m| unsafe { block_of(&xs[m], block) });
        let mut dots: [[int32x4_t; 2]; M] = std::array::from_fn(|m| [vdupq_n_s32(-8 * xs[m].sums[block]); 2]);
        macro_rules! chunk {
            ($chunk:literal) => {
                // SAFETY: 32 bytes of this block's panel.
                let packed = unsafe { [vld1q_u8(w.add($chunk * 32)), vld1q_u8(w.add($chunk * 32 + 16))] };
                let low = packed.map(|p| vreinterpretq_s8_u8(vandq_u8(p, nibble)));
                let high = packed.map(|p| vreinterpretq_s8_u8(vshrq_n_u8::<4>(p)));
                for m in 0..M {
                    for half in 0..2 {
                        dots[m][half] = unsafe { sdot::<$chunk>(dots[m][half], low[half], x[m][0]) };
                        dots[m][half] = unsafe { sdot::<$chunk>(dots[m][half], high[half], x[m][1]) };
                    }
                }
            };
        }
        chunk!(0);
        chunk!(1);
        chunk!(2);
        chunk!(3);
        for m in 0..M {
            unsafe { scale_and_add(&mut totals[m], dots[m], scales.as_ptr().add(block * PANEL), xs[m].scales[block]) };
        }
    }
    store(&totals, sums);
}

fn store<const M: usize>(totals: &[[float32x4_t; 2]; M], sums: &mut TileSums) {
    for (totals, sums) in totals.iter().zip(sums.iter_mut()) {
        // SAFETY: four f32 into each half of an array of eight.
        unsafe {
            vst1q_f32(sums.as_mut_ptr(), totals[0]);
            vst1q_f32(sums.as_mut_ptr().add(4), totals[1]);
        }
    }
}
