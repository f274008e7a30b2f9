//! `MatMulQ8_0`, a tract operator for the decoder's projections in Q8_0 (`q8_0.rs`).
//!
//! In the bundle's ONNX it is a node of the `ai.outpost` domain: `Y = A @ W^T` with
//!   A:      float [.., K]
//!   B:      int8 [N, K], constant (W's values, row-major)
//!   scales: float16 [N, K / 32], constant (one per block of 32 along K)
//! and attributes K and N, as `deploy/models/onnx_tract.py` writes it (`quantize_q8_0`).
//! onnxruntime has no such op: the preparing scripts check the graph with the weights
//! dequantized to f32, and `daemon/tests/gemma3_270m.rs` checks tract on the graph itself.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::q8_0::{threads, Q8_0Matrix, BLOCK};

/// Registers the ONNX parser of `MatMulQ8_0` with tract's.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert("MatMulQ8_0", parse);
}

fn parse(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    ensure!(k.is_multiple_of(BLOCK), "MatMulQ8_0 {}: K = {k} is not a multiple of {BLOCK}", node.name);
    Ok((expand(MatMulQ8_0Node { k, n }), vec![]))
}

/// The node as parsed, before its constants are read.
#[derive(Debug, Clone)]
struct MatMulQ8_0Node {
    k: usize,
    n: usize,
}

impl Expansion for MatMulQ8_0Node {
    fn name(&self) -> StaticName {
        "MatMulQ8_0".into()
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
        let (k, n) = (self.k, self.n);
        let constant = |index: usize, what: &str| {
            model
                .outlet_fact(inputs[index])?
                .konst
                .clone()
                .with_context(|| format!("{prefix}: {what} is not a constant"))
        };
        let weights = constant(1, "the int8 weight")?;
        let scales = constant(2, "the scales")?.cast_to::<f16>()?.into_owned();
        ensure!(weights.shape() == [n, k], "{prefix}: the weight is {:?}, not [{n}, {k}]", weights.shape());
        ensure!(
            scales.shape() == [n, k / BLOCK],
            "{prefix}: the scales are {:?}, not [{n}, {}]",
            scales.shape(),
            k / BLOCK
        );
        let quants = weights.try_as_plain_ram()?.as_slice::<i8>()?;
        let matrix = Q8_0Matrix::from_parts(quants, scales.try_as_plain_ram()?.as_slice::<f16>()?, n, k)?;
        model.wire_node(prefix, MatMulQ8_0 { weights: Arc::new(matrix) }, &[inputs[0]])
    }
}

/// `Y = A @ W^T` with W in Q8_0, by `Q8_0Matrix::multiply`.
#[derive(Debug, Clone)]
pub struct MatMulQ8_0 {
    weights: Arc<Q8_0Matrix>,
}

impl PartialEq for MatMulQ8_0 {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl Eq for MatMulQ8_0 {}

impl Op for MatMulQ8_0 {
    fn name(&self) -> StaticName {
        "MatMulQ8_0".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} x {} Q8_0", self.weights.rows(), self.weights.columns())])
    }

    op_as_typed_op!();
}

impl EvalOp for MatMulQ8_0 {
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

impl TypedOp for MatMulQ8_0 {
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

    /// An ONNX model of one MatMulQ8_0 node over `[2, 3, K]` activations.
    fn model(quants: &[i8], scales: &[f16], n: usize, k: usize) -> ModelProto {
        let weight = TensorProto {
            name: "w".into(),
            dims: vec![n as i64, k as i64],
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            raw_data: quants.iter().map(|&q| q as u8).collect(),
            ..Default::default()
        };
        let scale = TensorProto {
            name: "s".into(),
            dims: vec![n as i64, (k / BLOCK) as i64],
            data_type: pb::tensor_proto::DataType::Float16 as i32,
            raw_data: scales.iter().flat_map(|s| s.to_bits().to_le_bytes()).collect(),
            ..Default::default()
        };
        let node = NodeProto {
            name: "proj".into(),
            op_type: "MatMulQ8_0".into(),
            domain: "ai.outpost".into(),
            input: vec!["a".into(), "w".into(), "s".into()],
            output: vec!["y".into()],
            attribute: vec![int_attribute("K", k as i64), int_attribute("N", n as i64)],
            ..Default::default()
        };
        let float = pb::tensor_proto::DataType::Float as i32;
        ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 18 },
                pb::OperatorSetIdProto { domain: "ai.outpost".into(), version: 1 },
            ],
            graph: Some(GraphProto {
                node: vec![node],
                initializer: vec![weight, scale],
                input: vec![value_info("a", float, &[2, 3, k as i64])],
                output: vec![value_info("y", float, &[2, 3, n as i64])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tract_runs_the_node_as_a_product_with_the_dequantized_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, k) = (48, 96);
        let quants: Vec<i8> = (0..n * k).map(|_| rng.random()).collect();
        let scales: Vec<f16> = (0..n * k / BLOCK).map(|_| f16::from_f32(rng.random_range(1e-3..1e-2))).collect();
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let plan = onnx
            .model_for_proto_model(&model(&quants, &scales, n, k))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap();
        let activations: Vec<f32> = (0..2 * 3 * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let input = tract_ndarray::ArrayD::from_shape_vec(vec![2, 3, k], activations.clone()).unwrap().into_tensor();
        let output = plan.run(tvec!(input.into_tvalue())).unwrap().remove(0);
        assert_eq!(output.shape(), [2, 3, n]);
        let got = output.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for (m, x) in activations.chunks_exact(k).enumerate() {
            for row in 0..n {
                let w = (0..k).map(|i| f32::from(quants[row * k + i]) * scales[(row * k + i) / BLOCK].to_f32());
                let exact: f32 = w.clone().zip(x).map(|(w, x)| w * x).sum();
                let scale: f32 = w.zip(x).map(|(w, x)| (w * x).abs()).sum();
                let value = got[m * n + row];
                assert!((value - exact).abs() <= 0.01 * scale, "row {m}, column {row}: {value} vs {exact}");
            }
        }
    }

    #[test]
    fn a_weight_of_the_wrong_shape_is_named() {
        let quants = vec![0i8; 32 * 64];
        let scales = vec![f16::ZERO; 32 * 2];
        let mut onnx = tract_onnx::onnx();
        register(&mut onnx);
        let mut proto = model(&quants, &scales, 32, 64);
        // The node says N = 16, the weight has 32 rows.
        let graph = proto.graph.as_mut().unwrap();
        graph.node[0].attribute[1].i = 16;
        graph.output[0] = value_info("y", pb::tensor_proto::DataType::Float as i32, &[2, 3, 16]);
        let error = onnx.model_for_proto_model(&proto).and_then(|m| m.into_typed()).unwrap_err();
        assert!(format!("{error:#}").contains("the weight is [32, 64], not [16, 64]"), "{error:#}");
    }
}
