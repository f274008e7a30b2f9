//! `BlockMatMul`, a tract operator for the decoder's projections in Q8_0 or Q4_0
//! (`block_matrix.rs`): `Y = A @ W^T`, A f32 `[.., K]`, W constant `[N, K]`.
//!
//! In the bundle's ONNX it is one of two nodes, as `deploy/models/onnx_tract.py` writes them:
//! - `ai.outpost` `MatMulQ8_0` (`quantize_q8_0`): inputs A, B int8 `[N, K]` (W's values,
//!   row-major), scales float16 `[N, K / 32]` (one per block of 32 along K); attributes K, N.
//!   onnxruntime has no such op: the preparing scripts check the graph with the weights
//!   dequantized to f32, and `daemon/tests/gemma3_270m.rs` checks tract on the graph itself.
//! - `com.microsoft` `MatMulNBits` (`quantize_q4_0`) with bits 4, block size 32 and no zero
//!   points or bias, which is Q4_0: inputs A, B uint8 `[N, K / 32, 16]` (two values a byte, low
//!   nibble first, `q - 8`), scales float `[N * K / 32]` (held in f16, as GGML's Q4_0 holds
//!   them). Other `MatMulNBits` go to tract's own parser, which multiplies them by its
//!   matrix-vector kernel.

use std::sync::{Arc, OnceLock};

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};

use super::block_matrix::{threads, BlockMatrix, BLOCK};

type Parser = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's parser of `MatMulNBits`, for the nodes that are not Q4_0.
static TRACT_MAT_MUL_NBITS: OnceLock<Option<Parser>> = OnceLock::new();

/// Registers the ONNX parsers of `MatMulQ8_0` and `MatMulNBits` with tract's.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    TRACT_MAT_MUL_NBITS.get_or_init(|| onnx.op_register.0.get("MatMulNBits").copied());
    onnx.op_register.insert("MatMulQ8_0", parse_q8_0);
    onnx.op_register.insert("MatMulNBits", parse_n_bits);
}

fn parse_q8_0(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    ensure!(k.is_multiple_of(BLOCK), "MatMulQ8_0 {}: K = {k} is not a multiple of {BLOCK}", node.name);
    Ok((expand(BlockMatMulNode { k, n, format: NodeFormat::Q8_0, matrix: None }), vec![]))
}

fn parse_n_bits(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    let bits: usize = node.get_attr_opt("bits")?.unwrap_or(4);
    let block_size: usize = node.get_attr("block_size")?;
    // Zero points, g_idx and bias are inputs 3 to 5.
    let plain = optional_inputs(node).skip(3).take(3).all(|input| input.is_none());
    if bits == 4 && block_size == BLOCK && k.is_multiple_of(BLOCK) && plain {
        return Ok((expand(BlockMatMulNode { k, n, format: NodeFormat::Q4_0, matrix: None }), vec![]));
    }
    let tract = TRACT_MAT_MUL_NBITS.get().copied().flatten();
    let tract = tract.with_context(|| format!("MatMulNBits {}: {bits} bits in blocks of {block_size}", node.name))?;
    tract(ctx, node)
}

/// How the node holds its weight.
#[derive(Debug, Clone, Copy)]
enum NodeFormat {
    /// int8 values and f16 scales.
    Q8_0,
    /// `MatMulNBits`' nibbles and f32 scales.
    Q4_0,
}

/// The node as parsed, and its weights once read (`read_weights_into_matrices`).
#[derive(Debug, Clone)]
struct BlockMatMulNode {
    k: usize,
    n: usize,
    format: NodeFormat,
    matrix: Option<Arc<BlockMatrix>>,
}

impl Expansion for BlockMatMulNode {
    fn name(&self) -> StaticName {
        match self.format {
            NodeFormat::Q8_0 => "MatMulQ8_0".into(),
            NodeFormat::Q4_0 => "MatMulNBits".into(),
        }
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        let n = self.n.to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for axis in 0..rank - 1 {
                s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
            }
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let weights = match &self.matrix {
            Some(matrix) => matrix.clone(),
            None => {
                let constant = |index: usize, what: &str| {
                    model
                        .outlet_fact(inputs[index])?
                        .konst
                        .clone()
                        .with_context(|| format!("{prefix}: {what} is not a constant"))
                };
                let (weight, scales) = (constant(1, "the weight")?, constant(2, "the scales")?);
                Arc::new(self.matrix(prefix, &weight, &scales)?)
            }
        };
        model.wire_node(prefix, BlockMatMul { weights }, &[inputs[0]])
    }
}

impl BlockMatMulNode {
    /// Our matrix from the node's weight and scales constants.
    fn matrix(&self, prefix: &str, weights: &Tensor, scales: &Tensor) -> TractResult<BlockMatrix> {
        let (k, n) = (self.k, self.n);
        Ok(match self.format {
            NodeFormat::Q8_0 => {
                let scales = scales.cast_to::<f16>()?;
                ensure!(weights.shape() == [n, k], "{prefix}: the weight is {:?}, not [{n}, {k}]", weights.shape());
                ensure!(
                    scales.shape() == [n, k / BLOCK],
                    "{prefix}: the scales are {:?}, not [{n}, {}]",
                    scales.shape(),
                    k / BLOCK
                );
                let quants = weights.try_as_plain_ram()?.as_slice::<i8>()?;
                BlockMatrix::from_parts(quants, scales.try_as_plain_ram()?.as_slice::<f16>()?, n, k)?
            }
            NodeFormat::Q4_0 => {
                let scales = scales.cast_to::<f32>()?;
                let blocks = k / BLOCK;
                ensure!(
                    weights.shape() == [n, blocks, BLOCK / 2],
                    "{prefix}: the weight is {:?}, not [{n}, {blocks}, {}]",
                    weights.shape(),
                    BLOCK / 2
                );
                ensure!(scales.len() == n * blocks, "{prefix}: {} scales, not {n} x {blocks}", scales.len());
                let nibbles = weights.try_as_plain_ram()?.as_slice::<u8>()?;
                BlockMatrix::from_q4_0_parts(nibbles, scales.try_as_plain_ram()?.as_slice::<f32>()?, n, k)?
            }
        })
    }
}

/// Reads every `MatMulQ8_0` and Q4_0 `MatMulNBits` weight into our matrix before `into_typed`,
/// one node at a time, and empties each weight constant no other node reads. Otherwise tract's
/// constants and our matrices are all held side by side until the optimiser prunes the
/// constants: a graph's weights twice (an E2B-shaped vision graph: 397 MB for 226 MB of Q8_0).
pub fn read_weights_into_matrices(model: &mut InferenceModel) -> TractResult<()> {
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(parsed) =
            node.op_as::<Box<dyn Expansion>>().and_then(|op| op.as_any().downcast_ref::<BlockMatMulNode>())
        else {
            continue;
        };
        let constant = |index: usize| {
            let outlet = *node.inputs.get(index)?;
            Some((outlet, model.nodes[outlet.node].op_as::<Const>()?.val().clone()))
        };
        // Anything else (a missing input, one that is not a constant) is left to the type
        // checks and `wire`, which name what is wrong.
        let (Some((weight_outlet, weight)), Some((_, scales))) = (constant(1), constant(2)) else {
            continue;
        };
        let matrix = Arc::new(parsed.matrix(&node.name, &weight, &scales)?);
        let read = BlockMatMulNode { matrix: Some(matrix), ..parsed.clone() };
        model.nodes[id].op = expand(read);
        if model.outlet_successors(weight_outlet).len() == 1 {
            // The constant is held by its op and by its output's fact: both let go of it here.
            let empty = Tensor::zero_dt(weight.datum_type(), &[0])?;
            drop(weight);
            model.nodes[weight_outlet.node].op = Box::new(Const::new(empty.clone().into_arc_tensor())?);
            model.set_outlet_fact(weight_outlet, InferenceFact::from(empty))?;
        }
    }
    Ok(())
}

/// `Y = A @ W^T` with W in Q8_0 or Q4_0, by `BlockMatrix::multiply`.
#[derive(Debug, Clone)]
pub struct BlockMatMul {
    weights: Arc<BlockMatrix>,
}

impl PartialEq for BlockMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl Eq for BlockMatMul {}

impl Op for BlockMatMul {
    fn name(&self) -> StaticName {
        format!("MatMul{}", self.weights.format()).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} x {} {}", self.weights.rows(), self.weights.columns(), self.weights.format())])
    }

    op_as_typed_op!();
}

impl EvalOp for BlockMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let activations = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut shape: TVec<usize> = input.shape().into();
        if let Some(last) = shape.last_mut() {
            *last = self.weights.rows();
        }
        let mut out = vec![0.0f32; shape.iter().product()];
        self.weights.multiply(activations, &mut out, threads())?;
        Ok(tvec!(tract_ndarray::ArrayD::from_shape_vec(&*shape, out)?.into_tensor().into_tvalue()))
    }
}

impl TypedOp for BlockMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        if let Some(last) = shape.last_mut() {
            *last = self.weights.rows().to_dim();
        }
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tract_onnx::pb::{self, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

    use super::*;

    fn value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        let dim = |d: i64| Dimension { value: Some(Value::DimValue(d)), ..Default::default() };
        ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type,
                    shape: Some(pb::TensorShapeProto { dim: dims.iter().map(|&d| dim(d)).collect() }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn int_attribute(name: &str, value: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            i: value,
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            ..Default::default()
        }
    }

    fn tensor(name: &str, dims: &[usize], data_type: pb::tensor_proto::DataType, raw_data: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        }
    }

    /// An ONNX model of one node over `[2, 3, K]` activations: `a` in, `y` out.
    fn model(node: NodeProto, initializer: Vec<TensorProto>, n: usize, k: usize) -> ModelProto {
        let float = pb::tensor_proto::DataType::Float as i32;
        ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 18 },
                pb::OperatorSetIdProto { domain: "ai.outpost".into(), version: 1 },
                pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 },
            ],
            graph: Some(GraphProto {
                node: vec![node],
                initializer,
                input: vec![value_info("a", float, &[2, 3, k as i64])],
                output: vec![value_info("y", float, &[2, 3, n as i64])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One MatMulQ8_0 node.
    fn q8_0_model(quants: &[i8], scales: &[f16], n: usize, k: usize) -> ModelProto {
        use pb::tensor_proto::DataType;
        let weight = tensor("w", &[n, k], DataType::Int8, quants.iter().map(|&q| q as u8).collect());
        let scales = scales.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect();
        let node = NodeProto {
            name: "proj".into(),
            op_type: "MatMulQ8_0".into(),
            domain: "ai.outpost".into(),
            input: vec!["a".into(), "w".into(), "s".into()],
            output: vec!["y".into()],
            attribute: vec![int_attribute("K", k as i64), int_attribute("N", n as i64)],
            ..Default::default()
        };
        model(node, vec![weight, tensor("s", &[n, k / BLOCK], DataType::Float16, scales)], n, k)
    }

    /// One MatMulNBits node with 4-bit weights in blocks of `block_size`.
    fn n_bits_model(nibbles: &[u8], scales: &[f32], n: usize, k: usize, block_size: usize) -> ModelProto {
        use pb::tensor_proto::DataType;
        let weight = tensor("w", &[n, k / block_size, block_size / 2], DataType::Uint8, nibbles.to_vec());
        let scales = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let node = NodeProto {
            name: "proj".into(),
            op_type: "MatMulNBits".into(),
            domain: "com.microsoft".into(),
            input: vec!["a".into(), "w".into(), "s".into()],
            output: vec!["y".into()],
            attribute: vec![
                int_attribute("K", k as i64),
                int_attribute("N", n as i64),
                int_attribute("bits", 4),
                int_attribute("block_size", block_size as i64),
            ],
            ..Default::default()
        };
        model(node, vec![weight, tensor("s", &[n * k / block_size], DataType::Float, scales)], n, k)
    }

    /// Runs the model on random `[2, 3, K]` activations; checks every output against `weight(row,
    /// column)`'s f32 product, within 8-bit activations' error, and gives the plan's op names.
    fn check_against_f32(proto: &ModelProto, n: usize, k: usize, weight: impl Fn(usize, usize) -> f32) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let plan = onnx
            .model_for_proto_model(proto)
            .and_then(|mut model| {
                read_weights_into_matrices(&mut model)?;
                model.into_optimized()
            })
            .unwrap();
        let ops = plan.nodes().iter().map(|node| node.op().name().to_string()).collect();
        let plan = plan.into_runnable().unwrap();
        let activations: Vec<f32> = (0..2 * 3 * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let input = tract_ndarray::ArrayD::from_shape_vec(vec![2, 3, k], activations.clone()).unwrap().into_tensor();
        let output = plan.run(tvec!(input.into_tvalue())).unwrap().remove(0);
        assert_eq!(output.shape(), [2, 3, n]);
        let got = output.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for (m, x) in activations.chunks_exact(k).enumerate() {
            for row in 0..n {
                let w = (0..k).map(|column| weight(row, column));
                let exact: f32 = w.clone().zip(x).map(|(w, x)| w * x).sum();
                let scale: f32 = w.zip(x).map(|(w, x)| (w * x).abs()).sum();
                let value = got[m * n + row];
                assert!((value - exact).abs() <= 0.01 * scale, "row {m}, column {row}: {value} vs {exact}");
            }
        }
        ops
    }

    #[test]
    fn tract_runs_the_q8_0_node_as_a_product_with_the_dequantized_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, k) = (48, 96);
        let quants: Vec<i8> = (0..n * k).map(|_| rng.random()).collect();
        let scales: Vec<f16> = (0..n * k / BLOCK).map(|_| f16::from_f32(rng.random_range(1e-3..1e-2))).collect();
        let ops = check_against_f32(&q8_0_model(&quants, &scales, n, k), n, k, |row, column| {
            f32::from(quants[row * k + column]) * scales[(row * k + column) / BLOCK].to_f32()
        });
        assert!(ops.contains(&"MatMulQ8_0".to_string()), "{ops:?}");
    }

    /// `MatMulNBits`' weight at `row`, `column` in blocks of `block_size`.
    fn n_bits_weight(nibbles: &[u8], scales: &[f32], k: usize, block_size: usize, row: usize, column: usize) -> f32 {
        let at = row * k + column;
        let byte = nibbles[at / 2];
        let q = if at.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 };
        (f32::from(q) - 8.0) * scales[at / block_size]
    }

    #[test]
    fn tract_runs_q4_0_n_bits_nodes_on_our_kernels_and_others_on_its_own() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (n, k) = (40, 128);
        let nibbles: Vec<u8> = (0..n * k / 2).map(|_| rng.random()).collect();
        for (block_size, ours) in [(32, true), (16, false)] {
            let scales: Vec<f32> = (0..n * k / block_size).map(|_| rng.random_range(1e-3..1e-2)).collect();
            let ops = check_against_f32(&n_bits_model(&nibbles, &scales, n, k, block_size), n, k, |row, column| {
                n_bits_weight(&nibbles, &scales, k, block_size, row, column)
            });
            assert_eq!(ops.contains(&"MatMulQ4_0".to_string()), ours, "blocks of {block_size}: {ops:?}");
        }
    }

    #[test]
    fn a_weight_of_the_wrong_shape_is_named() {
        let quants = vec![0i8; 32 * 64];
        let scales = vec![f16::ZERO; 32 * 2];
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let mut proto = q8_0_model(&quants, &scales, 32, 64);
        // The node says N = 16, the weight has 32 rows.
        let graph = proto.graph.as_mut().unwrap();
        graph.node[0].attribute[1].i = 16;
        graph.output[0] = value_info("y", pb::tensor_proto::DataType::Float as i32, &[2, 3, 16]);
        let error = onnx.model_for_proto_model(&proto).and_then(|m| m.into_typed()).unwrap_err();
        assert!(format!("{error:#}").contains("the weight is [32, 64], not [16, 64]"), "{error:#}");
        // Read before typing, the same.
        let mut model = onnx.model_for_proto_model(&proto).unwrap();
        let error = read_weights_into_matrices(&mut model).unwrap_err();
        assert!(format!("{error:#}").contains("the weight is [32, 64], not [16, 64]"), "{error:#}");
    }

    #[test]
    fn a_node_without_its_scales_is_an_error_not_a_panic() {
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let mut proto = q8_0_model(&[0; 32 * 64], &[f16::ZERO; 32 * 2], 32, 64);
        proto.graph.as_mut().unwrap().node[0].input.truncate(2);
        let mut model = onnx.model_for_proto_model(&proto).unwrap();
        read_weights_into_matrices(&mut model).unwrap();
        assert!(model.into_typed().is_err());
    }

    #[test]
    fn weights_read_into_matrices_leave_no_constant_behind() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (n, k) = (64, 256);
        let quants: Vec<i8> = (0..n * k).map(|_| rng.random()).collect();
        let scales: Vec<f16> = (0..n * k / BLOCK).map(|_| f16::from_f32(rng.random_range(1e-3..1e-2))).collect();
        let nibbles: Vec<u8> = (0..n * k / 2).map(|_| rng.random()).collect();
        let n_bits_scales: Vec<f32> = scales.iter().map(|s| s.to_f32()).collect();
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let biggest_constant = |model: &TypedModel| {
            model.nodes().iter().filter_map(|node| node.op_as::<Const>()).map(|c| c.val().len()).max().unwrap_or(0)
        };
        for proto in [q8_0_model(&quants, &scales, n, k), n_bits_model(&nibbles, &n_bits_scales, n, k, BLOCK)] {
            let read_first = onnx
                .model_for_proto_model(&proto)
                .and_then(|mut model| {
                    read_weights_into_matrices(&mut model)?;
                    model.into_typed()
                })
                .unwrap();
            // Only the scales are left (one per 32 weights); typed straight away, the weight is
            // there too.
            assert_eq!(biggest_constant(&read_first), n * k / BLOCK);
            let typed = onnx.model_for_proto_model(&proto).and_then(|m| m.into_typed()).unwrap();
            assert!(biggest_constant(&typed) >= n * k / 2);
        }
    }
}
