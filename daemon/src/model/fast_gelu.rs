//! `com.microsoft` `FastGelu`, GELU's tanh form `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
//! as tract's `GeluApproximate`: one vectorised pass (tract-linalg's AVX/NEON GELU kernel).
//!
//! `deploy/models/onnx_tract.py` (`fuse_tanh_gelu`) writes the node where the exporter spelled
//! the formula out in eight nodes, each a pass over the MLP's width. tract's own parser spells it
//! out again, so ours replaces it for the bias-free form; one with a bias input goes to tract's.

use std::sync::OnceLock;

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::nn::gelu_approximate::gelu_approximate;
use tract_onnx::tract_hir::internal::*;

type Parser = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's parser of `FastGelu`, for the nodes with a bias.
static TRACT_FAST_GELU: OnceLock<Option<Parser>> = OnceLock::new();

/// Registers our parser of `FastGelu` with tract's.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    TRACT_FAST_GELU.get_or_init(|| onnx.op_register.0.get("FastGelu").copied());
    onnx.op_register.insert("FastGelu", parse);
}

fn parse(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let bias = optional_inputs(node).nth(1).flatten();
    if bias.is_none() {
        // `false`: the cube, as the formula has it (tract's `true` squares instead).
        return Ok((gelu_approximate(false).into_hir(), vec![]));
    }
    let tract = TRACT_FAST_GELU.get().copied().flatten();
    tract.with_context(|| format!("FastGelu {}: no parser for its bias input", node.name))?(ctx, node)
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::{
        tensor_shape_proto::{dimension, Dimension},
        type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
        ValueInfoProto,
    };
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::math::Tanh;
    use tract_onnx::tract_core::ops::nn::GeluApproximate;

    const WIDTH: usize = 64;
    const FLOAT: i32 = 1;

    fn tanh_gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    }

    fn vector(name: &str) -> ValueInfoProto {
        let dim = Dimension { value: Some(dimension::Value::DimValue(WIDTH as i64)), ..Default::default() };
        let tensor = type_proto::Tensor { elem_type: FLOAT, shape: Some(TensorShapeProto { dim: vec![dim] }) };
        let r#type = TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() };
        ValueInfoProto { name: name.into(), r#type: Some(r#type), ..Default::default() }
    }

    /// `y = FastGelu(x[, bias])` over WIDTH values, as the preparing scripts write the node.
    fn graph(bias: Option<&[f32]>) -> ModelProto {
        let mut node = NodeProto {
            op_type: "FastGelu".into(),
            domain: "com.microsoft".into(),
            name: "gelu".into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let mut initializer = vec![];
        if let Some(bias) = bias {
            node.input.push("bias".into());
            initializer.push(TensorProto {
                name: "bias".into(),
                dims: vec![WIDTH as i64],
                data_type: FLOAT,
                float_data: bias.to_vec(),
                ..Default::default()
            });
        }
        let graph = GraphProto {
            node: vec![node],
            initializer,
            input: vec![vector("x")],
            output: vec![vector("y")],
            ..Default::default()
        };
        let opsets = [("", 18), ("com.microsoft", 1)]
            .map(|(domain, version)| OperatorSetIdProto { domain: domain.into(), version });
        ModelProto { ir_version: 8, opset_import: opsets.to_vec(), graph: Some(graph), ..Default::default() }
    }

    fn optimised(proto: &ModelProto) -> TypedModel {
        let mut onnx = tract_onnx::onnx();
        super::register(&mut onnx);
        onnx.model_for_proto_model(proto).and_then(|m| m.into_optimized()).unwrap()
    }

    fn is_gelu(node: &TypedNode) -> bool {
        node.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<GeluApproximate>())
    }

    #[test]
    fn fast_gelu_gives_the_tanh_formula_with_and_without_a_bias() {
        let x: Vec<f32> = (0..WIDTH).map(|i| (i as f32 - 32.0) * 0.25).collect();
        let bias: Vec<f32> = (0..WIDTH).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        for bias in [None, Some(bias.as_slice())] {
            let model = optimised(&graph(bias));
            // Ours is one operator; tract's, for a bias, the formula spelled out.
            assert_eq!(model.nodes().iter().any(is_gelu), bias.is_none(), "{model}");
            let outputs = model.into_runnable().unwrap().run(tvec!(tensor1(&x).into_tvalue())).unwrap();
            let y = crate::model::values::<f32>(&outputs[0]).unwrap();
            for (i, (&x, &y)) in x.iter().zip(y).enumerate() {
                let expected = tanh_gelu(f64::from(x + bias.map_or(0.0, |b| b[i])));
                assert!((f64::from(y) - expected).abs() < 1e-5 * expected.abs().max(1.0), "x {x}: {y} vs {expected}");
            }
        }
    }

    #[test]
    fn the_tiny_decoders_gelus_are_one_operator_each() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/decoder.onnx");
        let proto = tract_onnx::onnx().proto_model_for_path(&path).unwrap();
        let count = |op: &str| proto.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == op).count();
        // The final logits' soft cap is a Tanh of its own.
        let (fast_gelus, tanhs) = (count("FastGelu"), count("Tanh"));
        assert!(fast_gelus > 0);
        let model = crate::model::load_graph(&path).unwrap().into_optimized().unwrap();
        assert_eq!(model.nodes().iter().filter(|node| is_gelu(node)).count(), fast_gelus);
        let tanh = |node: &&TypedNode| node.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<Tanh>());
        assert_eq!(model.nodes().iter().filter(tanh).count(), tanhs);
    }
}
