//! Node-by-node timing of a tract plan, for the profiling examples: each node's time summed
//! per operator, output type and shape.

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

pub struct NodeTimes {
    pub seconds: f64,
    /// `(operator with its output's type and shape, seconds, nodes)`, slowest first.
    pub by_operator: Vec<(String, f64, usize)>,
}

/// Runs `plan` once on `inputs`, timing every node. The inputs are the run's alone, as the
/// runtime's are: an operator that may write one in place (the decoder's cache) finds it so.
pub fn time_nodes(plan: &Arc<TypedRunnableModel>, inputs: TVec<TValue>) -> TractResult<NodeTimes> {
    let mut times: HashMap<String, (f64, usize)> = HashMap::new();
    let mut state = SimpleState::new(plan)?;
    let start = Instant::now();
    state.run_plan_with_eval(inputs, |context, op_state, node, node_inputs| {
        let node_start = Instant::now();
        let outputs = eval(context, op_state, node, node_inputs);
        let name = node.op.name();
        let key = match outputs.as_ref().ok().and_then(|o| o.first()) {
            Some(output) => format!("{name} {:?} {:?}", output.datum_type(), output.shape()),
            None => name.to_string(),
        };
        let entry = times.entry(key).or_default();
        entry.0 += node_start.elapsed().as_secs_f64();
        entry.1 += 1;
        outputs
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut by_operator: Vec<_> = times.into_iter().map(|(key, (secs, nodes))| (key, secs, nodes)).collect();
    by_operator.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(NodeTimes { seconds, by_operator })
}

impl NodeTimes {
    /// The `top` slowest operators, with their share of the run.
    pub fn print(&self, top: usize) {
        let nodes: usize = self.by_operator.iter().map(|(_, _, n)| n).sum();
        println!("  {nodes} nodes");
        for (op, seconds, nodes) in self.by_operator.iter().take(top) {
            let share = seconds / self.seconds * 100.0;
            println!("  {op:<60} {nodes:>4} nodes {:>9.2} ms {share:>5.1}%", seconds * 1e3);
        }
    }
}
