//! The decoder's key/value cache, grown in place.
//!
//! The exported decoders take each layer's past keys and values as inputs and return them with
//! the new positions appended by a `Concat`: every step copied the whole cache into fresh tensors
//! (0.8 ms of a 17 ms Gemma 3 270M step at 128 positions, and growing with the context).
//! `append_in_place` puts `KvAppend` in place of each such `Concat` whose result only
//! `FusedAttention` reads (and the graph returns). Its output keeps the rows in a `KvRows`
//! buffer with room for more; the runtime hands it back as the next step's past, and the
//! next `KvAppend` writes the new rows after the others, copying the cache only when it
//! outgrows its room (every `GROWTH` positions) or when someone else still holds it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;

use super::attention::{FusedAttention, KeyValues};

/// Room is added this many positions at a time: at most this many positions' worth of memory
/// is held unused (E2B: 37 KB a position over its 15 caching layers), and a long answer copies
/// its cache once per this many tokens.
const GROWTH: usize = 256;

/// Keys or values of one layer, `[kv_heads, capacity, width]`, the first `rows` of each head
/// in use.
#[derive(Clone, Debug)]
struct KvBuffer {
    heads: usize,
    width: usize,
    capacity: usize,
    rows: usize,
    data: Vec<f32>,
}

impl KvBuffer {
    fn new(heads: usize, width: usize) -> Self {
        Self { heads, width, capacity: 0, rows: 0, data: Vec::new() }
    }

    /// Writes `new` (`[heads, count, width]`) after the rows in use, making room first if need be.
    fn append(&mut self, new: &[f32], count: usize) {
        let rows = self.rows + count;
        if rows > self.capacity {
            // At least one row to spare: a prompt is followed by a step of one.
            self.grow((rows + 1).next_multiple_of(GROWTH));
        }
        for (head, new) in new.chunks_exact(count * self.width).enumerate() {
            let start = (head * self.capacity + self.rows) * self.width;
            self.data[start..start + new.len()].copy_from_slice(new);
        }
        self.rows = rows;
    }

    fn grow(&mut self, capacity: usize) {
        let mut data = vec![0.0; self.heads * capacity * self.width];
        for head in 0..self.heads {
            let rows = self.head(head);
            let start = head * capacity * self.width;
            data[start..start + rows.len()].copy_from_slice(rows);
        }
        (self.data, self.capacity) = (data, capacity);
    }

    /// The rows of `head` in use, `[rows, width]`.
    fn head(&self, head: usize) -> &[f32] {
        let start = head * self.capacity * self.width;
        &self.data[start..start + self.rows * self.width]
    }

    fn values(&self) -> impl Iterator<Item = &f32> {
        (0..self.heads).flat_map(|head| self.head(head))
    }
}

/// A cache tensor `[1, kv_heads, rows, width]` whose rows sit in a `KvBuffer` with room to grow.
/// Shared buffers are never written: `KvAppend` copies one that another tensor still holds.
/// Readers other than `FusedAttention` get a plain copy, made on first request.
pub struct KvRows {
    buffer: Arc<KvBuffer>,
    plain: OnceLock<PlainStorage>,
}

impl KvRows {
    fn tensor(buffer: Arc<KvBuffer>) -> Tensor {
        let shape = [1, buffer.heads, buffer.rows, buffer.width];
        Tensor::from_storage(f32::datum_type(), &shape, KvRows { buffer, plain: OnceLock::new() })
    }

    /// Keys or values of `tensor` (`[1, kv_heads, rows, width]`, plain or `KvRows`), and how far
    /// apart its heads' rows start.
    pub fn rows_of(tensor: &Tensor) -> TractResult<(&[f32], usize)> {
        match tensor.storage_as::<KvRows>() {
            Some(rows) => Ok((&rows.buffer.data, rows.buffer.capacity * rows.buffer.width)),
            None => {
                let head = tensor.shape().get(2..).map_or(0, |rows_and_width| rows_and_width.iter().product());
                Ok((tensor.try_as_plain_ram()?.as_slice::<f32>()?, head))
            }
        }
    }

    fn plain(&self) -> TractResult<PlainStorage> {
        let bytes: Vec<u8> = self.buffer.values().flat_map(|value| value.to_ne_bytes()).collect();
        Ok(Blob::from_bytes_alignment(&bytes, vector_size())?.into())
    }
}

/// A plain cache tensor `[1, kv_heads, rows, width]` as `KvAppend` leaves one: its rows in a
/// buffer with room for more.
pub fn with_room(plain: Tensor) -> TractResult<Tensor> {
    let &[1, heads, _, width] = plain.shape() else { bail!("a cache of shape {:?}", plain.shape()) };
    let none = Tensor::zero::<f32>(&[1, heads, 0, width])?;
    let mut grown = KvAppend.eval(&EvalContext::out_of_plan(), tvec!(plain.into_tvalue(), none.into_tvalue()))?;
    Ok(grown.remove(0).into_tensor())
}

/// Whether `tensor`'s rows are kept in a buffer that grows in place.
pub fn grows_in_place(tensor: &Tensor) -> bool {
    tensor.storage_as::<KvRows>().is_some()
}

impl PartialEq for KvRows {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.buffer, &other.buffer);
        (a.heads, a.rows, a.width) == (b.heads, b.rows, b.width) && a.values().eq(b.values())
    }
}

impl Eq for KvRows {}

impl fmt::Debug for KvRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.buffer;
        write!(f, "KvRows({} heads x {} of {} rows x {})", b.heads, b.rows, b.capacity, b.width)
    }
}

impl fmt::Display for KvRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl TensorStorage for KvRows {
    fn byte_len(&self) -> usize {
        self.buffer.heads * self.buffer.rows * self.buffer.width * size_of::<f32>()
    }

    fn is_empty(&self) -> bool {
        self.byte_len() == 0
    }

    fn deep_clone(&self) -> Box<dyn TensorStorage> {
        // Sharing the buffer is a copy: no one writes a shared buffer.
        Box::new(KvRows { buffer: self.buffer.clone(), plain: OnceLock::new() })
    }

    fn as_plain_ram(&self) -> Option<&PlainStorage> {
        None
    }

    fn as_plain_ram_mut(&mut self) -> Option<&mut PlainStorage> {
        None
    }

    fn into_plain_ram(self: Box<Self>) -> Option<PlainStorage> {
        let KvRows { buffer, plain } = *self;
        plain.into_inner().or_else(|| KvRows { buffer, plain: OnceLock::new() }.plain().ok())
    }

    fn materialize_plain_ram(&self) -> TractResult<&PlainStorage> {
        if let Some(plain) = self.plain.get() {
            return Ok(plain);
        }
        let plain = self.plain()?;
        Ok(self.plain.get_or_init(|| plain))
    }

    fn dyn_hash(&self, mut state: &mut dyn Hasher) {
        let b = &self.buffer;
        (b.heads, b.rows, b.width).hash(&mut state);
        for value in b.values() {
            value.to_bits().hash(&mut state);
        }
    }

    fn exotic_fact(&self, _shape: &[usize]) -> TractResult<Option<Box<dyn ExoticFact>>> {
        Ok(None)
    }

    /// Its datum type and shape say what it holds: it reads as any `[1, heads, rows, width]` f32.
    fn is_exotic(&self) -> bool {
        false
    }
}

/// `Concat` of a layer's past keys or values (`[1, kv_heads, past, width]`, plain or `KvRows`)
/// and its new ones along the positions, as `KvRows`; in place where the past is `KvRows` with
/// room and held by no one else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvAppend;

impl Op for KvAppend {
    fn name(&self) -> StaticName {
        "KvAppend".into()
    }

    op_as_typed_op!();
}

impl EvalOp for KvAppend {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (past, new) = args_2!(inputs);
        let &[1, heads, _, width] = past.shape() else { bail!("a cache of shape {:?}", past.shape()) };
        let &[1, new_heads, count, new_width] = new.shape() else { bail!("new cache rows of shape {:?}", new.shape()) };
        ensure!(
            (new_heads, new_width) == (heads, width) && width > 0,
            "new cache rows of shape {:?} after a cache of {:?}",
            new.shape(),
            past.shape()
        );
        let shared = past.storage_as::<KvRows>().map(|rows| rows.buffer.clone());
        let mut buffer = match shared {
            Some(buffer) => buffer,
            None => {
                let mut buffer = KvBuffer::new(heads, width);
                let rows = past.shape()[2];
                if rows > 0 {
                    buffer.append(past.try_as_plain_ram()?.as_slice::<f32>()?, rows);
                }
                Arc::new(buffer)
            }
        };
        // The past's tensor is dropped first: the buffer is then ours alone unless someone else
        // (a caller keeping a copy of the cache) holds it, and `make_mut` copies it only then.
        drop(past);
        if count > 0 {
            Arc::make_mut(&mut buffer).append(new.try_as_plain_ram()?.as_slice::<f32>()?, count);
        }
        Ok(tvec!(KvRows::tensor(buffer).into_tvalue()))
    }
}

impl TypedOp for KvAppend {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        TypedConcat { axis: 2 }.output_facts(inputs)
    }

    as_op!();
}

/// Replaces each `Concat` of a past cache input and new rows (along the positions) whose result
/// only `FusedAttention` reads, as its keys or values, and the graph returns, with `KvAppend`;
/// returns how many. Run it after `attention::fuse`: what the exported graph did with the
/// cache before is no longer read, and left out of the count.
pub fn append_in_place(model: &mut TypedModel) -> TractResult<usize> {
    let live: std::collections::HashSet<usize> = model.eval_order()?.into_iter().collect();
    let inputs: Vec<OutletId> = model.input_outlets()?.to_vec();
    let outputs: Vec<OutletId> = model.output_outlets()?.to_vec();
    let mut concats = Vec::new();
    for node in model.nodes() {
        let Some(concat) = node.op_as::<TypedConcat>() else { continue };
        let [past, _] = node.inputs.as_slice() else { continue };
        let past_node = model.node(past.node);
        let only_read_here = inputs.contains(past) && past_node.outputs[0].successors.len() == 1;
        let read_by_attention = node.outputs[0].successors.iter().filter(|s| live.contains(&s.node)).all(|s| {
            model.node(s.node).op_as::<FusedAttention>().is_some_and(|a| a.layout == KeyValues::Shared)
                && (s.slot == 1 || s.slot == 3)
        });
        let read = node.outputs[0].successors.iter().any(|s| live.contains(&s.node))
            || outputs.contains(&OutletId::new(node.id, 0));
        if concat.axis == 2 && only_read_here && read_by_attention && read && model.outlet_fact(*past)?.rank() == 4 {
            concats.push(node.id);
        }
    }
    for &concat in &concats {
        let node = model.node(concat);
        let (name, node_inputs) = (node.name.clone(), node.inputs.clone());
        let mut patch = TypedModelPatch::default();
        let taps = node_inputs.iter().map(|&input| patch.tap_model(model, input)).collect::<TractResult<TVec<_>>>()?;
        let wired = patch.wire_node(format!("{name}.in_place"), KvAppend, &taps)?;
        patch.shunt_outside(model, OutletId::new(concat, 0), wired[0])?;
        patch.apply(model)?;
    }
    Ok(concats.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, heads, rows, width]` values that say where they are: head, row and column.
    fn rows(heads: usize, first: usize, count: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (0..heads * count * width)
            .map(|i| {
                let (head, row, column) = (i / (count * width), first + i / width % count, i % width);
                (head * 100_000 + row * 100 + column) as f32
            })
            .collect();
        tensor1(&values).into_shape(&[1, heads, count, width]).unwrap()
    }

    fn append(past: TValue, new: Tensor) -> TValue {
        KvAppend.eval(&EvalContext::out_of_plan(), tvec!(past, new.into_tvalue())).unwrap().remove(0)
    }

    fn buffer_address(tensor: &Tensor) -> *const f32 {
        tensor.storage_as::<KvRows>().unwrap().buffer.data.as_ptr()
    }

    #[test]
    fn appending_gives_the_concatenation_and_writes_in_place_until_the_room_is_used() {
        let (heads, width) = (2, 3);
        let mut cache = rows(heads, 0, 0, width).into_tvalue();
        let mut address = None;
        let mut copies = 0;
        for (first, count) in [(0, 5), (5, 1), (6, 1), (7, 200), (207, 48), (255, 1), (256, 1), (257, 1)] {
            cache = append(cache, rows(heads, first, count, width));
            assert!(grows_in_place(&cache));
            assert_eq!(cache.shape(), [1, heads, first + count, width]);
            // Read as a plain tensor, through tract's own accessors.
            assert_eq!(values::<f32>(&cache), values::<f32>(&rows(heads, 0, first + count, width)));
            let now = buffer_address(&cache);
            copies += usize::from(address.is_some_and(|before| before != now));
            address = Some(now);
        }
        // Only the step to 256 rows needed more room: one row is always kept to spare.
        assert_eq!(copies, 1);
    }

    fn values<T: Datum>(tensor: &Tensor) -> Vec<T> {
        tensor.try_as_plain_ram().unwrap().as_slice::<T>().unwrap().to_vec()
    }

    #[test]
    fn a_cache_someone_else_holds_is_copied_not_written() {
        let cache = append(rows(1, 0, 3, 4).into_tvalue(), rows(1, 3, 1, 4));
        let kept = cache.clone();
        let longer = append(cache, rows(1, 4, 1, 4));
        assert_eq!(kept.shape(), [1, 1, 4, 4]);
        assert_eq!(values::<f32>(&kept), values::<f32>(&rows(1, 0, 4, 4)));
        assert_eq!(values::<f32>(&longer), values::<f32>(&rows(1, 0, 5, 4)));
        assert_ne!(buffer_address(&kept), buffer_address(&longer));
        // And a tensor deep-cloned by tract reads the same.
        assert_eq!(values::<f32>(&kept.deep_clone()), values::<f32>(&kept));
    }

    #[test]
    fn rows_of_another_shape_or_of_no_width_are_an_error_not_a_panic() {
        let append = |past: Tensor, new: Tensor| {
            KvAppend.eval(&EvalContext::out_of_plan(), tvec!(past.into_tvalue(), new.into_tvalue()))
        };
        assert!(append(rows(1, 0, 3, 4), rows(2, 3, 1, 4)).is_err());
        assert!(append(rows(1, 0, 3, 4), rows(1, 3, 1, 5)).is_err());
        assert!(append(rows(1, 0, 0, 0), rows(1, 0, 1, 0)).is_err());
        assert!(with_room(tensor1(&[1.0f32, 2.0])).is_err());
    }

    #[test]
    fn attention_reads_a_growing_cache_as_it_reads_a_plain_one() {
        let (heads, kv_heads, width) = (4, 2, 8);
        let attention = FusedAttention { scale: 0.3, query_block: 64, layout: KeyValues::Shared };
        let (k, v) = (rows(kv_heads, 0, 10, width), rows(kv_heads, 0, 10, width));
        let grown = |t: &Tensor| append(rows(kv_heads, 0, 0, width).into_tvalue(), t.clone());
        let scaled = |t: Tensor, by: f32| {
            let values: Vec<f32> = values::<f32>(&t).iter().map(|x| (x * by).sin()).collect();
            tensor1(&values).into_shape(t.shape()).unwrap()
        };
        let (k, v) = (scaled(k, 1e-3), scaled(v, 7e-4));
        let q = scaled(rows(heads, 0, 2, width), 3e-3);
        let mask = tensor1(&[0.0f32; 20]).into_shape(&[1, 1, 2, 10]).unwrap();
        let run = |k: TValue, v: TValue| {
            let inputs = tvec!(q.clone().into_tvalue(), k, mask.clone().into_tvalue(), v);
            values::<f32>(&attention.eval(&EvalContext::out_of_plan(), inputs).unwrap()[0])
        };
        let (k_grown, v_grown) = (grown(&k), grown(&v));
        assert!(k_grown.storage_as::<KvRows>().unwrap().buffer.capacity > 10);
        assert_eq!(run(k_grown, v_grown), run(k.into_tvalue(), v.into_tvalue()));
    }

    #[test]
    fn every_cache_of_the_tiny_decoder_grows_in_place() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/decoder.onnx");
        let mut model = crate::model::load_graph(&path).unwrap();
        crate::model::fuse_attention(&mut model, crate::model::TEXT_QUERY_BLOCK).unwrap();
        // The embeddings and per-layer inputs, then a past key and value per caching layer.
        let caches = model.inputs.len() - 2;
        assert_eq!(append_in_place(&mut model).unwrap(), caches);
        let plan = model.into_optimized().unwrap();
        // Declutter and codegen leave them be.
        assert_eq!(plan.nodes().iter().filter(|n| n.op_is::<KvAppend>()).count(), caches);
    }
}
