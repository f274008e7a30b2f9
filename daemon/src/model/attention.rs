//! The encoders' attention as one operator, put in place of the exported graph's.
//!
//! The vision graph exports attention as a product of Q and K^T, an additive mask, a softmax and
//! a product with V. Over an image's 2520 patches tract then writes a [heads, 2520, 2520] score
//! tensor per layer (305 MB, mapped fresh and faulted in page by page), and its declutter splits
//! the first product in two at the rotary halves' Concat: measured here, attention was 54% of the
//! image encoder. `EncoderAttention` does the same arithmetic per head and per block of query
//! rows, with the block's scores in a buffer of its own: no large tensor, and sgemm (ndarray's,
//! `matrixmultiply`) on both products. `fuse` replaces the pattern before the graph is
//! decluttered, so bundles stay as they are.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tract_onnx::prelude::tract_ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::block_matrix::threads;
use super::product_threads;

/// Query rows per block: their scores (256 x 2520 f32, 2.6 MB) stay in cache between the two
/// products.
const QUERY_BLOCK: usize = 256;

/// How the exported graph writes both products: batch `a`, heads `b`.
const PRODUCT_AXES: &str = "abmk,abkn->abmn";

/// `softmax(Q K^T + mask) V` per head, for `Q` [1, heads, n, d], `K^T` [1, heads, d, n], an
/// additive `mask` [1, 1, n, n] and `V` [1, heads, n, d].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncoderAttention;

impl Op for EncoderAttention {
    fn name(&self) -> StaticName {
        "EncoderAttention".into()
    }

    op_as_typed_op!();
}

impl EvalOp for EncoderAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, kt, mask, v) = args_4!(inputs);
        let &[1, heads, n, d] = q.shape() else { bail!("attention queries of shape {:?}", q.shape()) };
        ensure!(n > 0 && d > 0, "attention queries of shape {:?}", q.shape());
        ensure!(kt.shape() == [1, heads, d, n], "attention keys of shape {:?} for queries {:?}", kt.shape(), q.shape());
        ensure!(v.shape() == [1, heads, n, d], "attention values of shape {:?} for queries {:?}", v.shape(), q.shape());
        ensure!(mask.shape() == [1, 1, n, n], "attention mask of shape {:?} for {n} positions", mask.shape());
        let (q, kt, v, mask) = (plain(&q)?, plain(&kt)?, plain(&v)?, plain(&mask)?);
        let mut out = vec![0.0f32; heads * n * d];
        // Each claim: one head's block of query rows and its rows of the output.
        let claims = Mutex::new(
            out.chunks_mut(n * d)
                .enumerate()
                .flat_map(|(head, rows)| rows.chunks_mut(QUERY_BLOCK * d).enumerate().map(move |(b, o)| (head, b, o))),
        );
        let failed = AtomicUsize::new(0);
        product_threads::run(threads(), &|| {
            let mut scores = Vec::new();
            loop {
                // A panic elsewhere poisons the lock; the claims themselves are still whole.
                let claimed = claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
                let Some((head, block, out)) = claimed else { break };
                let first = block * QUERY_BLOCK;
                let rows = out.len() / d;
                let q = &q[(head * n + first) * d..(head * n + first + rows) * d];
                let (kt, v) = (&kt[head * d * n..(head + 1) * d * n], &v[head * n * d..(head + 1) * n * d]);
                if attend(q, kt, v, &mask[first * n..(first + rows) * n], (rows, n, d), &mut scores, out).is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ensure!(failed.load(Ordering::Relaxed) == 0, "attention blocks of inconsistent shapes");
        Ok(tvec!(tract_ndarray::ArrayD::from_shape_vec(vec![1, heads, n, d], out)?.into_tensor().into_tvalue()))
    }
}

impl TypedOp for EncoderAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.to_tvec())))
    }

    as_op!();
}

fn plain(tensor: &TValue) -> TractResult<&[f32]> {
    tensor.try_as_plain_ram()?.as_slice::<f32>()
}

/// One block: `out = softmax(q kt + mask) v`, `rows` query rows against `n` keys of width `d`.
fn attend(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    mask: &[f32],
    (rows, n, d): (usize, usize, usize),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<(), tract_ndarray::ShapeError> {
    scores.resize(rows * n, 0.0);
    let mut block = ArrayViewMut2::from_shape((rows, n), &mut scores[..])?;
    general_mat_mul(1.0, &ArrayView2::from_shape((rows, d), q)?, &ArrayView2::from_shape((d, n), kt)?, 0.0, &mut block);
    for (row, mask) in scores.chunks_exact_mut(n).zip(mask.chunks_exact(n)) {
        for (score, mask) in row.iter_mut().zip(mask) {
            *score += mask;
        }
        softmax(row);
    }
    let probabilities = ArrayView2::from_shape((rows, n), &scores[..])?;
    let mut out = ArrayViewMut2::from_shape((rows, d), out)?;
    general_mat_mul(1.0, &probabilities, &ArrayView2::from_shape((n, d), v)?, 0.0, &mut out);
    Ok(())
}

/// `row` in place: `exp(x - max) / sum`, written in 16 lanes so that it vectorizes.
fn softmax(row: &mut [f32]) {
    let max = reduce(row, f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let scale = 1.0 / reduce(row, 0.0, |a, b| a + b);
    for x in row.iter_mut() {
        *x *= scale;
    }
}

fn reduce(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, x);
        }
    }
    lanes.into_iter().fold(rest, &f)
}

/// `e^x` for `x <= 0` within 2 ulp (Cephes' polynomial on `x - n ln 2`), and 0 below
/// `FLUSHED_BELOW`. Written without a float-to-integer cast, which, saturating in Rust, would
/// keep the loop from vectorizing.
fn exp(x: f32) -> f32 {
    let flushed = x < FLUSHED_BELOW;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // Adding 1.5 x 2^23 leaves the integer n in the low bits of the mantissa.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let value = f32::from_bits(n_bits.wrapping_add(127) << 23) * y;
    if flushed {
        0.0
    } else {
        value
    }
}

/// Scores this far below a row's largest weigh nothing (e^-64 is 1.6e-28 of it) and are 0: a
/// masked padding patch's e^-87, divided by the row's sum, was a subnormal, and products with
/// subnormals run many times slower on x86. A 4:3 picture (2394 patches of 2520) took 20 s to
/// encode on 2 cores, 11 s with them flushed.
const FLUSHED_BELOW: f32 = -64.0;

/// Replaces each `EinSum(Q, K^T) + mask -> Softmax -> EinSum(P, V)` of `model` (f32, batch
/// of one, the mask [1, 1, n, n]) with `EncoderAttention`; returns how many. Run it before
/// declutter, which splits the first product.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let softmaxes: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| {
            node.op_as::<Softmax>().is_some_and(|s| {
                s.kind == SoftmaxKind::Softmax && s.axes.as_slice() == [3] && s.quant_output_dt.is_none()
            })
        })
        .map(|node| node.id)
        .collect();
    let mut fused = 0;
    for softmax in softmaxes {
        let Some((inputs, output)) = attention_around(model, softmax)? else { continue };
        let mut patch = TypedModelPatch::default();
        let taps = inputs.iter().map(|&input| patch.tap_model(model, input)).collect::<TractResult<TVec<_>>>()?;
        let name = format!("{}.attention", model.node(output.node).name);
        let wired = patch.wire_node(name, EncoderAttention, &taps)?;
        patch.shunt_outside(model, output, wired[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// The inputs (Q, K^T, mask, V) and the output of the attention whose softmax is `softmax`, if
/// the nodes around it are that pattern with the shapes `EncoderAttention` takes.
fn attention_around(model: &TypedModel, softmax: usize) -> TractResult<Option<([OutletId; 4], OutletId)>> {
    let node = model.node(softmax);
    let add = model.node(node.inputs[0].node);
    if add.op_as::<TypedBinOp>().is_none_or(|op| op.0.name() != "Add") {
        return Ok(None);
    }
    let scores = model.node(add.inputs[0].node);
    let [successor] = node.outputs[0].successors.as_slice() else { return Ok(None) };
    let product = model.node(successor.node);
    let is_product = |node: &TypedNode| node.op_as::<EinSum>().is_some_and(|e| e.axes.to_string() == PRODUCT_AXES);
    if !is_product(scores) || !is_product(product) || successor.slot != 0 {
        return Ok(None);
    }
    let inputs = [scores.inputs[0], scores.inputs[1], add.inputs[1], product.inputs[1]];
    let facts = inputs.iter().map(|&i| model.outlet_fact(i)).collect::<TractResult<TVec<_>>>()?;
    let shapes: Option<TVec<TVec<usize>>> = facts
        .iter()
        .map(|fact| fact.shape.as_concrete().filter(|_| fact.datum_type == f32::datum_type()).map(TVec::from))
        .collect();
    let Some(shapes) = shapes else { return Ok(None) };
    let &[1, heads, n, d] = shapes[0].as_slice() else { return Ok(None) };
    let fits = shapes[1].as_slice() == [1, heads, d, n]
        && shapes[2].as_slice() == [1, 1, n, n]
        && shapes[3].as_slice() == [1, heads, n, d];
    Ok(fits.then_some((inputs, OutletId::new(product.id, 0))))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// `softmax(q k^T + mask) v` in f64, position by position.
    fn reference(q: &[f32], kt: &[f32], mask: &[f32], v: &[f32], (heads, n, d): (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0.0; heads * n * d];
        for head in 0..heads {
            for i in 0..n {
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| f64::from(q[(head * n + i) * d + c]) * f64::from(kt[(head * d + c) * n + j]))
                            .sum();
                        dot + f64::from(mask[i * n + j])
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..d {
                    let value: f64 = (0..n).map(|j| weights[j] * f64::from(v[(head * n + j) * d + c])).sum();
                    out[(head * n + i) * d + c] = (value / total) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn blocks_of_queries_give_the_attention_of_the_whole() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // More positions than a block, and not a whole number of blocks; every fourth key masked.
        let (heads, n, d) = (3, QUERY_BLOCK + 37, 16);
        let mut values = |count: usize| -> Vec<f32> { (0..count).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (q, kt, v) = (values(heads * n * d), values(heads * d * n), values(heads * n * d));
        let mask: Vec<f32> = (0..n * n).map(|i| if i % 4 == 3 { f32::MIN } else { 0.0 }).collect();
        let tensor = |shape: &[usize], values: &[f32]| tensor1(values).into_shape(shape).unwrap().into_tvalue();
        let inputs = tvec!(
            tensor(&[1, heads, n, d], &q),
            tensor(&[1, heads, d, n], &kt),
            tensor(&[1, 1, n, n], &mask),
            tensor(&[1, heads, n, d], &v)
        );
        for threads in [1, 2] {
            crate::model::use_threads(threads);
            let out = EncoderAttention.eval(&EvalContext::out_of_plan(), inputs.clone()).unwrap();
            let got = out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            let want = reference(&q, &kt, &mask, &v, (heads, n, d));
            for (index, (got, want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{threads} threads, {index}: {got} vs {want}"
                );
            }
        }
        crate::model::use_threads(1);
    }

    #[test]
    fn exp_is_within_a_few_ulp_over_the_softmax_range() {
        for i in 0..=6400 {
            let x = -(i as f32) * 0.01;
            let (got, want) = (exp(x), f64::from(x).exp());
            assert!((f64::from(got) - want).abs() <= 3.0 * f64::from(f32::EPSILON) * want, "e^{x}: {got} vs {want}");
        }
        assert!(exp(f32::MIN) == 0.0 && exp(0.0) == 1.0);
    }

    #[test]
    fn masked_scores_give_probabilities_of_zero_not_subnormals() {
        let mut row: Vec<f32> = (0..40).map(|i| if i % 3 == 0 { f32::MIN } else { (i % 7) as f32 * 0.1 }).collect();
        softmax(&mut row);
        assert!(row.iter().all(|&p| p == 0.0 || p.is_normal()), "{row:?}");
        assert!(row.iter().step_by(3).all(|&p| p == 0.0));
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn every_attention_of_the_tiny_vision_graph_is_fused() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/vision.onnx");
        let model = crate::model::load_graph(&path).unwrap();
        let count = model.symbols.sym("num_patches");
        let mut model = model.set_symbols(&HashMap::from([(count, TDim::Val(36))])).unwrap();
        let softmaxes = model.nodes().iter().filter(|node| node.op_is::<Softmax>()).count();
        assert!(softmaxes > 0);
        assert_eq!(fuse(&mut model).unwrap(), softmaxes);
        assert_eq!(model.nodes().iter().filter(|node| node.op_is::<EncoderAttention>()).count(), softmaxes);
    }
}
