//! Attention as one operator, put in place of the exported graph's: the image encoder's and the
//! text decoder's.
//!
//! The graphs export attention as a product of Q and K^T, an optional scale, an additive mask, a
//! softmax and a product with V. Over an image's 2520 patches tract then writes a
//! [heads, 2520, 2520] score tensor per layer (305 MB, mapped fresh and faulted in page by page),
//! and its declutter splits the first product in two at the rotary halves' Concat: measured here,
//! attention was 54% of the image encoder. In the decoder, a 512-token prompt's scores are
//! computed whole although the causal mask hides half of them, and the mask, scale and softmax
//! are passes of their own over [heads, 512, 512]: a quarter of Gemma 3's prefill.
//! `FusedAttention` does the same arithmetic per head and per block of query rows, with the
//! block's scores in a buffer of its own, over only the keys the mask leaves to some row of the
//! block: no large tensor, no work on masked keys, and sgemm (ndarray's, `matrixmultiply`) on
//! both products, or plain dot products for a decode step's few rows. In the decoder it reads
//! the cache's keys and values as they are, one KV head for several query heads, where the graph
//! copied them out per query head (and K transposed) at every step. `fuse` replaces the pattern before the graph is decluttered, so bundles stay as
//! they are.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tract_onnx::prelude::tract_ndarray::{linalg::general_mat_mul, s, ArrayView2, ArrayViewMut2};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::block_matrix::threads;
use super::kv_cache::KvRows;
use super::product_threads;

/// Query rows per block in the image encoder: their scores (256 x 2520 f32, 2.6 MB) stay in
/// cache between the two products.
pub const IMAGE_QUERY_BLOCK: usize = 256;
/// Query rows per block in the decoder: small enough that a causal prompt's early blocks skip
/// most keys (64 rows of a 512-token prompt: 56% of the scores instead of 100%).
pub const TEXT_QUERY_BLOCK: usize = 64;
/// Blocks of at most this many query rows (a decode step's) over a cache attend row by row.
const FEW_ROWS: usize = 4;

/// How the exported graphs write both products: batch `a`, heads `b`.
const PRODUCT_AXES: &str = "abmk,abkn->abmn";

/// A mask value at or below this hides its key: `f32::MIN` is what the exporters write, and a
/// score plus it is far below any row's largest, so its probability is exactly 0.
const MASKED: f32 = f32::MIN / 2.0;

/// `softmax(scale Q K^T + mask) V` per head, for `Q` [1, heads, queries, d], keys and values as
/// `layout` says, and an additive `mask` [1, 1, queries, keys].
///
/// Keys the mask hides from every row of a block (at or below `MASKED`) are left out of that
/// block's products and softmax. Each is 0 in the softmax it is left out of, unless it leaves a
/// row with no visible key at all: such a row (no causal or padding mask makes one) is then
/// spread over the block's visible keys rather than over all of them.
#[derive(Debug, Clone)]
pub struct FusedAttention {
    /// Multiplies the scores before the mask is added: Gemma 3's `query_pre_attn_scalar^-0.5`,
    /// 1 where the graph has no scale.
    pub scale: f32,
    pub query_block: usize,
    pub layout: KeyValues,
}

/// How `FusedAttention` takes its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValues {
    /// `K^T` [1, heads, d, keys] and `V` [1, heads, keys, d]: one of each per query head (the
    /// vision graph).
    PerHead,
    /// `K` and `V` [1, kv_heads, keys, d] as the decoder's cache holds them, each KV head shared
    /// by `heads / kv_heads` query heads in turn (grouped-query attention).
    Shared,
}

// tract compares operators whole (`Eq`): the scale compares by its bits.
impl PartialEq for FusedAttention {
    fn eq(&self, other: &Self) -> bool {
        self.scale.to_bits() == other.scale.to_bits()
            && self.query_block == other.query_block
            && self.layout == other.layout
    }
}

impl Eq for FusedAttention {}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "FusedAttention".into()
    }

    op_as_typed_op!();
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, mask, v) = args_4!(inputs);
        let &[1, heads, queries, d] = q.shape() else { bail!("attention queries of shape {:?}", q.shape()) };
        let (kv_heads, keys, k_shape) = match self.layout {
            KeyValues::PerHead => {
                let keys = k.shape().get(3).copied().unwrap_or(0);
                (heads, keys, [1, heads, d, keys])
            }
            KeyValues::Shared => {
                let (kv_heads, keys) = (k.shape().get(1).copied().unwrap_or(0), k.shape().get(2).copied().unwrap_or(0));
                (kv_heads, keys, [1, kv_heads, keys, d])
            }
        };
        ensure!(queries > 0 && d > 0 && keys > 0, "attention of {queries} queries over {keys} keys of width {d}");
        ensure!(
            k.shape() == k_shape && kv_heads > 0 && heads % kv_heads == 0,
            "attention keys of shape {:?} for queries {:?}",
            k.shape(),
            q.shape()
        );
        ensure!(
            v.shape() == [1, kv_heads, keys, d],
            "attention values of shape {:?} for keys {:?}",
            v.shape(),
            k.shape()
        );
        ensure!(
            mask.shape() == [1, 1, queries, keys],
            "attention mask of shape {:?} for {queries} queries and {keys} keys",
            mask.shape()
        );
        let (q, mask) = (plain(&q)?, plain(&mask)?);
        // The decoder's cache may sit in buffers with room to grow, its heads further apart.
        let ((k, k_stride), (v, v_stride)) = match self.layout {
            KeyValues::PerHead => ((plain(&k)?, d * keys), (plain(&v)?, keys * d)),
            KeyValues::Shared => (KvRows::rows_of(&k)?, KvRows::rows_of(&v)?),
        };
        let group = heads / kv_heads;
        if self.layout == KeyValues::Shared && queries <= FEW_ROWS {
            let cache = Cache { k, k_stride, v, v_stride, kv_heads, keys, d };
            let out = attend_over_cache(q, mask, &cache, heads, queries, self.scale)?;
            return Ok(tvec!(tract_ndarray::ArrayD::from_shape_vec(vec![1, heads, queries, d], out)?
                .into_tensor()
                .into_tvalue()));
        }
        let mut out = vec![0.0f32; heads * queries * d];
        let block = self.query_block.max(1);
        // Each claim: one head's block of query rows and its rows of the output. The last
        // blocks of a causal prompt see the most keys: they go first, so that no thread is left
        // with a large one at the end.
        let claims = Mutex::new(out.chunks_mut(queries * d).enumerate().flat_map(|(head, rows)| {
            rows.chunks_mut(block * d).enumerate().rev().map(move |(b, o)| (head, b * block, o))
        }));
        let failed = AtomicUsize::new(0);
        let (scale, layout) = (self.scale, self.layout);
        product_threads::run(threads(), &|| {
            let mut scores = Vec::new();
            loop {
                // A panic elsewhere poisons the lock; the claims themselves are still whole.
                let claimed = claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
                let Some((head, first, out)) = claimed else { break };
                let rows = out.len() / d;
                let kv_head = head / group;
                let block = Block {
                    q: &q[(head * queries + first) * d..(head * queries + first + rows) * d],
                    k: &k[kv_head * k_stride..kv_head * k_stride + keys * d],
                    v: &v[kv_head * v_stride..kv_head * v_stride + keys * d],
                    mask: &mask[first * keys..(first + rows) * keys],
                    shape: (rows, keys, d),
                };
                if block.attend(scale, layout, &mut scores, out).is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ensure!(failed.load(Ordering::Relaxed) == 0, "attention blocks of inconsistent shapes");
        Ok(tvec!(tract_ndarray::ArrayD::from_shape_vec(vec![1, heads, queries, d], out)?.into_tensor().into_tvalue()))
    }
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.to_tvec())))
    }

    as_op!();
}

fn plain(tensor: &TValue) -> TractResult<&[f32]> {
    tensor.try_as_plain_ram()?.as_slice::<f32>()
}

/// The keys and values `[kv_heads, keys, d]` of a decoder's cache, each head's rows `*_stride`
/// values apart.
struct Cache<'a> {
    k: &'a [f32],
    k_stride: usize,
    v: &'a [f32],
    v_stride: usize,
    kv_heads: usize,
    keys: usize,
    d: usize,
}

/// Keys one thread takes at the least in a decode step: fewer are not worth a hand-off.
const KEYS_PER_PART: usize = 64;

/// `softmax(scale Q K^T + mask) V` for a decode step's few query rows (`[heads, queries, d]`)
/// over the cache. The query heads that share a KV head are taken together, key by key, so
/// each key and value is read once, not once per query head (E2B: 8 heads to a KV head, whose
/// cache outgrows a Pi's 512 KiB L2 after a few hundred positions). Threads take parts of the
/// keys, each a softmax of its own (largest score, sum, weighted values), merged after.
fn attend_over_cache(
    q: &[f32],
    mask: &[f32],
    cache: &Cache,
    heads: usize,
    queries: usize,
    scale: f32,
) -> TractResult<Vec<f32>> {
    let Cache { kv_heads, keys, d, .. } = *cache;
    let group = heads / kv_heads;
    let seen = Block { q, k: &[], v: &[], mask, shape: (queries, keys, d) }.visible_keys();
    let parts = threads().div_ceil(kv_heads).min(seen.len().div_ceil(KEYS_PER_PART)).max(1);
    let part_keys = seen.len().div_ceil(parts);
    // Per KV head and part: the largest score, the sum and the weighted values of each of its
    // query rows (its heads' rows, head by head).
    let rows = group * queries;
    let partial = rows * (d + 2);
    let mut partials = vec![0.0f32; kv_heads * parts * partial];
    let claims = Mutex::new(partials.chunks_mut(partial).enumerate().map(|(claim, out)| {
        let start = (seen.start + claim % parts * part_keys).min(seen.end);
        (claim / parts, start..(start + part_keys).min(seen.end), out)
    }));
    product_threads::run(threads(), &|| {
        let mut scores = Vec::new();
        loop {
            // A panic elsewhere poisons the lock; the claims themselves are still whole.
            let claimed = claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
            let Some((kv_head, range, out)) = claimed else { break };
            let q = &q[kv_head * rows * d..(kv_head + 1) * rows * d];
            attend_part(q, mask, cache, kv_head, range, scale, &mut scores, out);
        }
    });
    let mut out = vec![0.0f32; heads * queries * d];
    for (kv_head, out) in out.chunks_exact_mut(rows * d).enumerate() {
        let parts = &partials[kv_head * parts * partial..(kv_head + 1) * parts * partial];
        for (row, out) in out.chunks_exact_mut(d).enumerate() {
            let largest = parts.chunks_exact(partial).map(|part| part[row]).fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for part in parts.chunks_exact(partial) {
                let (max, sum) = (part[row], part[rows + row]);
                let values = &part[2 * rows + row * d..2 * rows + (row + 1) * d];
                let weight = exp(max - largest);
                total += weight * sum;
                for (out, value) in out.iter_mut().zip(values) {
                    *out += weight * value;
                }
            }
            let scale = 1.0 / total;
            out.iter_mut().for_each(|x| *x *= scale);
        }
    }
    Ok(out)
}

/// One part of `attend_over_cache`: the query rows `q` (`[rows, d]`, the heads sharing
/// `kv_head`, each with the mask's rows) over the keys `range`, into `out`: each row's largest
/// score, then each row's sum of `e^(score - largest)`, then each row's values weighted by them.
#[allow(clippy::too_many_arguments)]
fn attend_part(
    q: &[f32],
    mask: &[f32],
    cache: &Cache,
    kv_head: usize,
    range: Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (keys, d, width) = (cache.keys, cache.d, range.len());
    let rows = q.len() / d;
    let queries = mask.len() / keys;
    let k = &cache.k[kv_head * cache.k_stride..][range.start * d..range.end * d];
    let v = &cache.v[kv_head * cache.v_stride..][range.start * d..range.end * d];
    scores.clear();
    scores.resize(rows * width, 0.0);
    for (key_index, key) in k.chunks_exact(d).enumerate() {
        for (row, query) in q.chunks_exact(d).enumerate() {
            let masked = mask[(row % queries) * keys + range.start + key_index];
            scores[row * width + key_index] = scale * dot(query, key) + masked;
        }
    }
    let (maxima, rest) = out.split_at_mut(rows);
    let (sums, weighted) = rest.split_at_mut(rows);
    for ((row, max), sum) in scores.chunks_exact_mut(width).zip(maxima.iter_mut()).zip(sums.iter_mut()) {
        *max = reduce(row, f32::NEG_INFINITY, f32::max);
        for x in row.iter_mut() {
            *x = exp(*x - *max);
        }
        *sum = reduce(row, 0.0, |a, b| a + b);
    }
    weighted.fill(0.0);
    for (key_index, value) in v.chunks_exact(d).enumerate() {
        for (row, out) in weighted.chunks_exact_mut(d).enumerate() {
            let p = scores[row * width + key_index];
            if p != 0.0 {
                for (out, value) in out.iter_mut().zip(value) {
                    *out += p * value;
                }
            }
        }
    }
}

/// One head's block of query rows and what they attend over.
struct Block<'a> {
    /// [rows, d]
    q: &'a [f32],
    /// [d, keys] (`KeyValues::PerHead`) or [keys, d] (`KeyValues::Shared`)
    k: &'a [f32],
    /// [keys, d]
    v: &'a [f32],
    /// [rows, keys]
    mask: &'a [f32],
    /// (rows, keys, d)
    shape: (usize, usize, usize),
}

impl Block<'_> {
    /// `out = softmax(scale q kt + mask) v` over the keys some row of the block sees.
    fn attend(
        &self,
        scale: f32,
        layout: KeyValues,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> Result<(), tract_ndarray::ShapeError> {
        let (rows, keys, d) = self.shape;
        let seen = self.visible_keys();
        if layout == KeyValues::Shared && rows <= FEW_ROWS {
            self.attend_row_by_row(scale, seen, scores, out);
            return Ok(());
        }
        let width = seen.len();
        scores.resize(rows * width, 0.0);
        let mut block = ArrayViewMut2::from_shape((rows, width), &mut scores[..])?;
        let kt = match layout {
            KeyValues::PerHead => ArrayView2::from_shape((d, keys), self.k)?.slice_move(s![.., seen.clone()]),
            KeyValues::Shared => {
                ArrayView2::from_shape((keys, d), self.k)?.slice_move(s![seen.clone(), ..]).reversed_axes()
            }
        };
        general_mat_mul(scale, &ArrayView2::from_shape((rows, d), self.q)?, &kt, 0.0, &mut block);
        for (row, mask) in scores.chunks_exact_mut(width).zip(self.mask.chunks_exact(keys)) {
            for (score, mask) in row.iter_mut().zip(&mask[seen.clone()]) {
                *score += mask;
            }
            softmax(row);
        }
        let probabilities = ArrayView2::from_shape((rows, width), &scores[..])?;
        let v = ArrayView2::from_shape((keys, d), self.v)?;
        let mut out = ArrayViewMut2::from_shape((rows, d), out)?;
        general_mat_mul(1.0, &probabilities, &v.slice(s![seen, ..]), 0.0, &mut out);
        Ok(())
    }

    /// `attend` for a few rows of queries over keys and values laid out `[keys, d]`: dot products
    /// and sums of rows, where sgemm would pack the cache's keys and values for each row (a
    /// decode step's attention took 113 us a layer that way on Gemma 3 270M, for 1 query over
    /// 129 keys).
    fn attend_row_by_row(&self, scale: f32, seen: Range<usize>, scores: &mut Vec<f32>, out: &mut [f32]) {
        let (_, keys, d) = self.shape;
        let (k, v) = (&self.k[seen.start * d..seen.end * d], &self.v[seen.start * d..seen.end * d]);
        scores.resize(seen.len(), 0.0);
        for ((q, mask), out) in self.q.chunks_exact(d).zip(self.mask.chunks_exact(keys)).zip(out.chunks_exact_mut(d)) {
            for ((score, key), mask) in scores.iter_mut().zip(k.chunks_exact(d)).zip(&mask[seen.clone()]) {
                *score = scale * dot(q, key) + mask;
            }
            softmax(scores);
            out.fill(0.0);
            for (&p, value) in scores.iter().zip(v.chunks_exact(d)) {
                if p != 0.0 {
                    for (out, value) in out.iter_mut().zip(value) {
                        *out += p * value;
                    }
                }
            }
        }
    }

    /// The keys from the first to the last that the mask leaves to some row; all of them where
    /// it hides every key from every row.
    fn visible_keys(&self) -> Range<usize> {
        let keys = self.shape.1;
        let (mut start, mut end) = (keys, 0);
        for row in self.mask.chunks_exact(keys) {
            if let Some(first) = row[..start].iter().position(|&m| m > MASKED) {
                start = first;
            }
            if let Some(last) = row[end..].iter().rposition(|&m| m > MASKED) {
                end = end + last + 1;
            }
        }
        if start < end {
            start..end
        } else {
            0..keys
        }
    }
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

/// `a . b` in 16 lanes, so that it vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + rest
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

/// Replaces each `EinSum(Q, K^T) [* scale] + mask -> Softmax -> EinSum(P, V)` of `model` (f32,
/// batch of one, the mask [1, 1, queries, keys], a scalar constant scale) with
/// `FusedAttention` of `query_block` rows; returns how many. Where K^T and V are a cache's K
/// and V repeated per query head (and K transposed), it takes the cache's. Run it before
/// declutter, which splits the first product.
pub fn fuse(model: &mut TypedModel, query_block: usize) -> TractResult<usize> {
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
        let Some((inputs, scale, layout, output)) = attention_around(model, softmax)? else { continue };
        let mut patch = TypedModelPatch::default();
        let taps = inputs.iter().map(|&input| patch.tap_model(model, input)).collect::<TractResult<TVec<_>>>()?;
        let name = format!("{}.attention", model.node(output.node).name);
        let wired = patch.wire_node(name, FusedAttention { scale, query_block, layout }, &taps)?;
        patch.shunt_outside(model, output, wired[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// What `fuse` puts in place of one attention: the inputs (Q, K or K^T, mask, V), the scale,
/// how keys and values are laid out, and the output it replaces.
type Attention = ([OutletId; 4], f32, KeyValues, OutletId);

/// The attention whose softmax is `softmax`, if the nodes around it are that pattern with the
/// shapes `FusedAttention` takes.
fn attention_around(model: &TypedModel, softmax: usize) -> TractResult<Option<Attention>> {
    let node = model.node(softmax);
    let add = model.node(node.inputs[0].node);
    if !is_binary(add, "Add") {
        return Ok(None);
    }
    let mut scores = model.node(add.inputs[0].node);
    let mut scale = 1.0;
    if is_binary(scores, "Mul") {
        let Some((product, factor)) = scaled(model, scores)? else { return Ok(None) };
        (scores, scale) = (product, factor);
    }
    let [successor] = node.outputs[0].successors.as_slice() else { return Ok(None) };
    let product = model.node(successor.node);
    let is_product = |node: &TypedNode| node.op_as::<EinSum>().is_some_and(|e| e.axes.to_string() == PRODUCT_AXES);
    if !is_product(scores) || !is_product(product) || successor.slot != 0 {
        return Ok(None);
    }
    let inputs = [scores.inputs[0], scores.inputs[1], add.inputs[1], product.inputs[1]];
    let facts = inputs.iter().map(|&i| model.outlet_fact(i)).collect::<TractResult<TVec<_>>>()?;
    if facts.iter().any(|fact| fact.datum_type != f32::datum_type() || fact.rank() != 4) {
        return Ok(None);
    }
    let [q, kt, mask, v] = [0, 1, 2, 3].map(|i| facts[i].shape.dims());
    let (heads, queries, d, keys) = (&q[1], &q[2], &q[3], &kt[3]);
    let one = TDim::Val(1);
    let fits = q[0] == one
        && kt == [one.clone(), heads.clone(), d.clone(), keys.clone()]
        && mask == [one.clone(), one.clone(), queries.clone(), keys.clone()]
        && v == [one.clone(), heads.clone(), keys.clone(), d.clone()];
    if !fits {
        return Ok(None);
    }
    let output = OutletId::new(product.id, 0);
    let shared = (cache_before_repeat(model, inputs[1], true), cache_before_repeat(model, inputs[3], false));
    if let (Some(k), Some(v)) = shared {
        let (k_shape, v_shape) = (model.outlet_fact(k)?.shape.dims(), model.outlet_fact(v)?.shape.dims());
        let kv_heads = &k_shape[1];
        let divides = matches!((heads.as_i64(), kv_heads.as_i64()), (Some(h), Some(kv)) if kv > 0 && h % kv == 0);
        if divides && k_shape == [one, kv_heads.clone(), keys.clone(), d.clone()] && v_shape == k_shape {
            return Ok(Some(([inputs[0], k, inputs[2], v], scale, KeyValues::Shared, output)));
        }
    }
    Ok(Some((inputs, scale, KeyValues::PerHead, output)))
}

/// The cache tensor [1, kv_heads, keys, d] that `outlet` repeats per query head, as the
/// exported `repeat_kv` does: a new axis after the KV heads, broadcast along it, merged into
/// the heads' axis; then, for keys (`transposed`), the last two axes swapped.
fn cache_before_repeat(model: &TypedModel, outlet: OutletId, transposed: bool) -> Option<OutletId> {
    let mut node = model.node(outlet.node);
    let axis_op = |node: &TypedNode| node.op_as::<AxisOp>().cloned();
    if transposed {
        if !matches!(axis_op(node)?, AxisOp::Move(2, 3) | AxisOp::Move(3, 2)) {
            return None;
        }
        node = model.node(node.inputs[0].node);
    }
    // One KV head leaves its axis of 1 to be removed; more are merged with the repeats.
    match axis_op(node)? {
        AxisOp::Rm(1) => {}
        AxisOp::Reshape(1, from, to) if from.len() == 2 && to.len() == 1 => {}
        _ => return None,
    }
    node = model.node(node.inputs[0].node);
    node.op_as::<MultiBroadcastTo>()?;
    node = model.node(node.inputs[0].node);
    (axis_op(node)? == AxisOp::Add(2)).then_some(node.inputs[0])
}

fn is_binary(node: &TypedNode, name: &str) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|op| op.0.name() == name)
}

/// The other operand and the factor of `mul`, a product with a scalar f32 constant.
fn scaled<'m>(model: &'m TypedModel, mul: &TypedNode) -> TractResult<Option<(&'m TypedNode, f32)>> {
    for (constant, other) in [(1, 0), (0, 1)] {
        let fact = model.outlet_fact(mul.inputs[constant])?;
        if let Some(value) = fact.konst.as_ref().filter(|k| k.len() == 1 && k.datum_type() == f32::datum_type()) {
            let factor = value.cast_to_scalar::<f32>()?;
            return Ok(Some((model.node(mul.inputs[other].node), factor)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Heads, queries, keys and width of one attention.
    #[derive(Clone, Copy)]
    struct Shape {
        heads: usize,
        kv_heads: usize,
        queries: usize,
        keys: usize,
        d: usize,
    }

    /// `softmax(scale q k^T + mask) v` in f64, position by position, over every key; `k` and
    /// `v` laid out as `layout` says.
    fn reference(q: &[f32], k: &[f32], mask: &[f32], v: &[f32], attention: &FusedAttention, shape: Shape) -> Vec<f32> {
        let Shape { heads, kv_heads, queries, keys, d } = shape;
        let key = |head: usize, c: usize, j: usize| match attention.layout {
            KeyValues::PerHead => k[(head * d + c) * keys + j],
            KeyValues::Shared => k[(head / (heads / kv_heads) * keys + j) * d + c],
        };
        let value = |head: usize, j: usize, c: usize| v[(head / (heads / kv_heads) * keys + j) * d + c];
        let mut out = vec![0.0; heads * queries * d];
        for head in 0..heads {
            for i in 0..queries {
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| f64::from(q[(head * queries + i) * d + c]) * f64::from(key(head, c, j)))
                            .sum();
                        dot * f64::from(attention.scale) + f64::from(mask[i * keys + j])
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for c in 0..d {
                    let value: f64 = (0..keys).map(|j| weights[j] * f64::from(value(head, j, c))).sum();
                    out[(head * queries + i) * d + c] = (value / total) as f32;
                }
            }
        }
        out
    }

    /// `FusedAttention` on random Q, K and V against `reference`, on one, two and three threads.
    fn check(attention: &FusedAttention, shape: Shape, mask: &[f32], seed: u64) {
        let Shape { heads, kv_heads, queries, keys, d } = shape;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut values = |count: usize| -> Vec<f32> { (0..count).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (q, k, v) = (values(heads * queries * d), values(kv_heads * d * keys), values(kv_heads * keys * d));
        let tensor = |shape: &[usize], values: &[f32]| tensor1(values).into_shape(shape).unwrap().into_tvalue();
        let k_shape = match attention.layout {
            KeyValues::PerHead => [1, heads, d, keys],
            KeyValues::Shared => [1, kv_heads, keys, d],
        };
        let inputs = tvec!(
            tensor(&[1, heads, queries, d], &q),
            tensor(&k_shape, &k),
            tensor(&[1, 1, queries, keys], mask),
            tensor(&[1, kv_heads, keys, d], &v)
        );
        let want = reference(&q, &k, mask, &v, attention, shape);
        for threads in [1, 2, 3] {
            crate::model::use_threads(threads);
            let out = attention.eval(&EvalContext::out_of_plan(), inputs.clone()).unwrap();
            let got = out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            for (index, (got, want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{threads} threads, {index}: {got} vs {want}"
                );
            }
        }
        crate::model::use_threads(1);
    }

    /// The mask of `queries` new positions after `past` cached ones, each seeing itself and the
    /// `window - 1` positions before it.
    fn causal_mask(past: usize, queries: usize, window: usize) -> Vec<f32> {
        let keys = past + queries;
        (0..queries * keys)
            .map(|index| {
                let (position, key) = (past + index / keys, index % keys);
                if key <= position && position - key < window {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect()
    }

    #[test]
    fn blocks_of_queries_give_the_attention_of_the_whole() {
        // More positions than a block, and not a whole number of blocks; every fourth score masked.
        let n = IMAGE_QUERY_BLOCK + 37;
        let shape = Shape { heads: 3, kv_heads: 3, queries: n, keys: n, d: 16 };
        let mask: Vec<f32> = (0..n * n).map(|i| if i % 4 == 3 { f32::MIN } else { 0.0 }).collect();
        let attention = FusedAttention { scale: 1.0, query_block: IMAGE_QUERY_BLOCK, layout: KeyValues::PerHead };
        check(&attention, shape, &mask, 5);
    }

    #[test]
    fn a_causal_prompt_after_a_cache_skips_only_keys_no_row_sees() {
        // 150 new positions after 70 cached ones, a sliding window of 100, blocks of 64 rows: the
        // blocks see different ranges of keys, and the window hides the first keys from later rows.
        // Six query heads on two KV heads of the cache.
        let (past, queries, window) = (70, 150, 100);
        let keys = past + queries;
        let shape = Shape { heads: 6, kv_heads: 2, queries, keys, d: 8 };
        let mask = causal_mask(past, queries, window);
        let attention = FusedAttention { scale: 0.3, query_block: TEXT_QUERY_BLOCK, layout: KeyValues::Shared };
        check(&attention, shape, &mask, 6);
        // One new position (a decode step) and no mask at all, on one KV head and on as many as
        // there are query heads.
        check(&attention, Shape { heads: 4, kv_heads: 1, queries: 1, keys: 9, d: 8 }, &[0.0; 9], 7);
        check(&attention, Shape { heads: 4, kv_heads: 4, queries: 1, keys: 9, d: 8 }, &[0.0; 9], 8);
        // Three new positions (row by row, not sgemm) of a width that is not a whole number of
        // lanes, the sliding window hiding the first keys.
        let (past, queries, window) = (37, 3, 30);
        let keys = past + queries;
        let mask = causal_mask(past, queries, window);
        check(&attention, Shape { heads: 4, kv_heads: 2, queries, keys, d: 40 }, &mask, 9);
    }

    #[test]
    fn a_decode_step_over_a_long_cache_is_split_among_threads_and_merged() {
        let attention = FusedAttention { scale: 0.2, query_block: TEXT_QUERY_BLOCK, layout: KeyValues::Shared };
        // E2B's eight query heads on one KV head, one new position past a sliding window of 512:
        // the first keys hidden, the rest in parts of at least `KEYS_PER_PART`.
        let (past, window) = (699, 512);
        let mask = causal_mask(past, 1, window);
        check(&attention, Shape { heads: 8, kv_heads: 1, queries: 1, keys: past + 1, d: 32 }, &mask, 10);
        // Two new positions, two KV heads, a part that holds a row's only visible keys.
        let mask = causal_mask(298, 2, 3);
        check(&attention, Shape { heads: 8, kv_heads: 2, queries: 2, keys: 300, d: 16 }, &mask, 11);
    }

    #[test]
    fn a_block_sees_from_its_first_visible_key_to_its_last() {
        let (rows, keys) = (2, 6);
        let hidden = f32::MIN;
        let mask = [hidden, hidden, 0.0, hidden, hidden, hidden, hidden, hidden, hidden, -3.0, 0.0, hidden];
        let block = Block { q: &[], k: &[], v: &[], mask: &mask, shape: (rows, keys, 1) };
        assert_eq!(block.visible_keys(), 2..5);
        let nothing_seen = [hidden; 12];
        let block = Block { mask: &nothing_seen, ..block };
        assert_eq!(block.visible_keys(), 0..keys);
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

    /// Fuses every attention of `model`, each taking its keys and values as `layout`.
    fn fused_in(mut model: TypedModel, query_block: usize, layout: KeyValues) {
        let softmaxes = model.nodes().iter().filter(|node| node.op_is::<Softmax>()).count();
        assert!(softmaxes > 0);
        assert_eq!(fuse(&mut model, query_block).unwrap(), softmaxes);
        let fused: Vec<&FusedAttention> =
            model.nodes().iter().filter_map(|node| node.op_as::<FusedAttention>()).collect();
        assert_eq!(fused.len(), softmaxes);
        assert!(fused.iter().all(|op| op.layout == layout && op.query_block == query_block), "{fused:?}");
    }

    fn tiny_graph(name: &str) -> TypedModel {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny").join(name);
        crate::model::load_graph(&path).unwrap()
    }

    #[test]
    fn every_attention_of_the_tiny_vision_graph_is_fused() {
        let model = tiny_graph("vision.onnx");
        let count = model.symbols.sym("num_patches");
        let model = model.set_symbols(&HashMap::from([(count, TDim::Val(36))])).unwrap();
        fused_in(model, IMAGE_QUERY_BLOCK, KeyValues::PerHead);
    }

    #[test]
    fn every_attention_of_the_tiny_decoder_is_fused_over_its_cache_with_its_lengths_symbolic() {
        fused_in(tiny_graph("decoder.onnx"), TEXT_QUERY_BLOCK, KeyValues::Shared);
    }
}
