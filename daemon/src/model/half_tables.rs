//! Tables that graphs read by row, held in f16 where that keeps their values.
//!
//! Gemma 4's image encoder looks patch positions up in a `[2, 10240, 768]` f32 table: 63 MB,
//! a sixth of what the vision plan holds while a picture is encoded. The checkpoint's weights
//! are bf16, and f16 holds every bf16 value of the table's range exactly: its 11 significant
//! bits to bf16's 8, from 2^-14 up. Below that f16 rounds to 2^-24, a change of at most 3e-8 in
//! a value. `halve_tables` stores such tables in f16 and widens the rows each lookup gathers.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::konst::Const;

/// Smaller tables are left as they are: their bytes do not matter.
const MIN_TABLE_BYTES: usize = 1 << 20;

/// f16's smallest normal value: below it, f16 keeps 2^-24 steps.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// Stores each f32 constant of at least `MIN_TABLE_BYTES` that only Gathers read (as their
/// table) in f16, where every value is one f16 holds (or one below its normal range), with a
/// cast of the gathered rows back to f32; returns how many.
pub fn halve_tables(model: &mut TypedModel) -> TractResult<usize> {
    let mut tables = Vec::new();
    for node in model.nodes() {
        let Some(konst) = node.op_as::<Const>() else { continue };
        let table = konst.val();
        let successors = &node.outputs[0].successors;
        let read_by_row =
            !successors.is_empty() && successors.iter().all(|s| s.slot == 0 && model.node(s.node).op_is::<Gather>());
        if table.datum_type() == f32::datum_type() && table.len() * 4 >= MIN_TABLE_BYTES && read_by_row {
            let values = table.try_as_plain_ram()?;
            if values.as_slice::<f32>()?.iter().all(|&v| kept_in_f16(v)) {
                tables.push(node.id);
            }
        }
    }
    for &table in &tables {
        let node = model.node(table);
        let values = node.op_as::<Const>().context("a table that is not a constant")?.val().clone();
        let half: Vec<f16> = values.try_as_plain_ram()?.as_slice::<f32>()?.iter().map(|&v| f16::from_f32(v)).collect();
        let half = tract_ndarray::ArrayD::from_shape_vec(values.shape(), half)?.into_tensor();
        let mut patch = TypedModelPatch::default();
        let halved = patch.add_const(format!("{}.f16", node.name), half)?;
        for successor in node.outputs[0].successors.clone() {
            let gather = model.node(successor.node);
            let indices = patch.tap_model(model, gather.inputs[1])?;
            let rows = patch.wire_node(format!("{}.f16", gather.name), gather.op.clone(), &[halved, indices])?;
            let widened = patch.wire_node(format!("{}.f32", gather.name), cast(f32::datum_type()), &rows)?;
            patch.shunt_outside(model, OutletId::new(gather.id, 0), widened[0])?;
        }
        patch.apply(model)?;
    }
    Ok(tables.len())
}

fn kept_in_f16(value: f32) -> bool {
    value.abs() < F16_MIN_NORMAL || f16::from_f32(value).to_f32() == value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Gather(table, indices)` along axis 0, the rows `[rows, 256]` of `table` (f32).
    fn lookup(table: &[f32], rows: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let indices = model.add_source("indices", i64::fact([3])).unwrap();
        let table = tensor1(table).into_shape(&[rows, 256]).unwrap();
        let table = model.add_const("table", table).unwrap();
        let gathered = model.wire_node("gather", Gather::new(0), &[table, indices]).unwrap();
        model.select_output_outlets(&gathered).unwrap();
        model
    }

    fn run(model: TypedModel) -> Vec<f32> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan.run(tvec!(tensor1(&[2i64, 0, 1023]).into_tvalue())).unwrap();
        out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn a_table_of_bf16_values_is_held_in_f16_and_looked_up_the_same() {
        // Values of 8 significant bits, as bf16 holds them, of either sign, from 2^-20 to 2^10.
        let rows = 1024;
        let table: Vec<f32> = (0..rows * 256)
            .map(|i| {
                let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
                sign * (128 + i % 128) as f32 * 2f32.powi((i % 31) as i32 - 27)
            })
            .collect();
        assert!(table.iter().any(|v| v.abs() < F16_MIN_NORMAL));
        let mut model = lookup(&table, rows);
        let want = run(model.clone());
        assert_eq!(halve_tables(&mut model).unwrap(), 1);
        let got = run(model.clone());
        for (got, want) in got.iter().zip(&want) {
            let tolerance = if want.abs() < F16_MIN_NORMAL { 3e-8 } else { 0.0 };
            assert!((got - want).abs() <= tolerance, "{got} vs {want}");
        }
        let optimised = model.into_optimized().unwrap();
        let tables: Vec<DatumType> =
            optimised.nodes().iter().filter_map(|n| n.op_as::<Const>()).map(|c| c.val().datum_type()).collect();
        assert_eq!(tables, [f16::datum_type()], "the f32 table is gone");
    }

    #[test]
    fn a_table_f16_would_round_is_left_in_f32() {
        let table: Vec<f32> = (0..1024 * 256).map(|i| 0.1 + i as f32 * 1e-3).collect();
        let mut model = lookup(&table, 1024);
        assert_eq!(halve_tables(&mut model).unwrap(), 0);
    }
}
