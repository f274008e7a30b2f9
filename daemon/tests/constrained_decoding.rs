//! Constrained decoding on the tiny random-weight Gemma 4 bundle: a model that writes noise (its
//! weights are random, sampled at temperature 1) still gives a valid `SceneObservation` and
//! well-typed tool calls every time under the constraint, and none without it.

use std::path::{Path, PathBuf};

use outpost::model::{
    ConstraintError, Grammar, Model, ModelError, Question, Sampling, ToolDeclaration, ToolParameter, ToolSet,
};
use outpost::report::SceneObservation;
use serde_json::Value;

/// Runs per test: each one a different random walk through the grammar.
const SEEDS: u64 = 24;

fn bundle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny")
}

fn model() -> Model {
    Model::load(&bundle_dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn question(seed: u64, constraint: Option<Grammar>, max_tokens: usize) -> Question {
    Question {
        prompt: "A van stops at the north gate and two people get out.".into(),
        image: None,
        audio: None,
        max_tokens,
        sampling: Sampling::Random { temperature: 1.0, top_k: None, top_p: None, seed },
        system: Some(SceneObservation::instructions()),
        tools: None,
        constraint,
        history: Vec::new(),
    }
}

fn committed_schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn every_constrained_observation_parses_and_validates() {
    let model = model();
    let validator = jsonschema::validator_for(&committed_schema("scene-observation.v1.json")).unwrap();
    let (mut tokens, mut forced) = (0, 0);
    for seed in 0..SEEDS {
        let answer = model
            .answer(&question(seed, Some(SceneObservation::grammar()), 3000), |_| {})
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let observation: SceneObservation =
            serde_json::from_str(&answer.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", answer.text));
        let json: Value = serde_json::from_str(&answer.text).unwrap();
        let errors: Vec<String> = validator.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "seed {seed}: {errors:?}\n{}", answer.text);
        // The constraint ends generation at the closing brace: no stop token, nothing after it.
        assert!(answer.text.ends_with('}'), "seed {seed}: {:?}", answer.text);
        assert!(observation.severity <= 3 && (0.0..=1.0).contains(&observation.confidence));
        let timings = answer.constraint_timings.expect("a constrained answer reports its timings");
        tokens += answer.token_ids.len();
        forced += timings.forced_tokens;
        if seed == 0 {
            println!("seed 0: {}", answer.text);
        }
    }
    println!("{SEEDS} random walks: {tokens} tokens, {forced} of them forced by the schema; all valid");
    assert!(forced > 0, "field names are forced, not sampled");
}

#[test]
fn without_the_constraint_the_same_model_writes_no_valid_json() {
    let model = model();
    let validator = jsonschema::validator_for(&committed_schema("scene-observation.v1.json")).unwrap();
    let mut valid = 0;
    for seed in 0..SEEDS {
        let answer = model.answer(&question(seed, None, 300), |_| {}).unwrap();
        let parsed = serde_json::from_str::<Value>(answer.text.trim()).ok();
        if parsed.is_some_and(|json| validator.is_valid(&json)) {
            valid += 1;
        }
        if seed == 0 {
            println!("seed 0 unconstrained: {:?}", answer.text);
        }
    }
    assert_eq!(valid, 0, "the random model is not expected to write valid observations by itself");
}

/// Tools of every parameter type, as a config file would declare them.
fn tools() -> ToolSet {
    #[derive(serde::Deserialize)]
    struct Config {
        tools: Vec<ToolDeclaration>,
    }
    let config: Config = toml::from_str(
        r#"
[[tools]]
name = "sound_siren"
description = "Sound the siren at one gate."
confirm = true
[tools.parameters.gate]
type = "enum"
values = ["north", "south", "east gate"]
[tools.parameters.seconds]
type = "integer"
minimum = -5
maximum = 300
required = false

[[tools]]
name = "note"
description = "Write a note in the log."
[tools.parameters.text]
type = "string"
max_length = 24
[tools.parameters.level]
type = "number"
minimum = 0.0
maximum = 1.0
[tools.parameters.urgent]
type = "boolean"
required = false

[[tools]]
name = "all_clear"
description = "Report that nothing needs doing."
"#,
    )
    .unwrap();
    ToolSet::new(config.tools).unwrap()
}

/// The arguments' JSON Schema, written here from the declarations and checked by `jsonschema`:
/// a check of the generated calls that does not rely on `ToolSet::parse_call`'s own.
fn arguments_schema(tool: &ToolDeclaration) -> Value {
    let mut properties = serde_json::Map::new();
    for (name, parameter) in &tool.parameters {
        let schema = match parameter {
            ToolParameter::String { max_length, .. } => serde_json::json!({"type": "string", "maxLength": max_length}),
            ToolParameter::Integer { minimum, maximum, .. } => {
                serde_json::json!({"type": "integer", "minimum": minimum, "maximum": maximum})
            }
            ToolParameter::Number { minimum, maximum, .. } => {
                serde_json::json!({"type": "number", "minimum": minimum, "maximum": maximum})
            }
            ToolParameter::Boolean { .. } => serde_json::json!({"type": "boolean"}),
            ToolParameter::Enum { values, .. } => serde_json::json!({"enum": values}),
        };
        properties.insert(name.to_string(), schema);
    }
    let required: Vec<String> =
        tool.parameters.iter().filter(|(_, p)| p.required()).map(|(name, _)| name.to_string()).collect();
    serde_json::json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn tool_question(tools: &ToolSet, seed: u64, constrained: bool) -> Question {
    Question {
        prompt: "Smoke near the north gate.".into(),
        image: None,
        audio: None,
        max_tokens: 400,
        sampling: Sampling::Random { temperature: 1.0, top_k: None, top_p: None, seed },
        system: Some("You guard a yard. Act with the tools.".into()),
        tools: Some(tools.clone()),
        constraint: constrained.then(|| tools.call_grammar()),
        history: Vec::new(),
    }
}

#[test]
fn every_constrained_tool_call_is_a_declared_tool_with_typed_arguments() {
    let model = model();
    let tools = tools();
    let mut called = std::collections::BTreeMap::<String, usize>::new();
    for seed in 0..SEEDS {
        let answer =
            model.answer(&tool_question(&tools, seed, true), |_| {}).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let call =
            tools.parse_call(&answer.raw_text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", answer.raw_text));
        let declaration = tools.get(call.name.as_str()).expect("declared");
        let validator = jsonschema::validator_for(&arguments_schema(declaration)).unwrap();
        let arguments = Value::Object(call.arguments.clone());
        let errors: Vec<String> = validator.iter_errors(&arguments).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "seed {seed}: {errors:?} in {}", answer.raw_text);
        // Nothing was lost or added: the call, written out again, reads back the same (numbers
        // may be written shorter: `1.000` becomes `1.0`).
        assert!(answer.raw_text.starts_with(&format!("<|tool_call>call:{}{{", call.name)), "seed {seed}");
        assert_eq!(tools.parse_call(&call.render()).as_ref(), Ok(&call), "seed {seed}");
        *called.entry(call.name.to_string()).or_default() += 1;
        if seed < 3 {
            println!("seed {seed}: {}", answer.raw_text);
        }
    }
    println!("{SEEDS} random calls: {called:?}");
    assert!(called.len() > 1, "a random model should pick more than one tool: {called:?}");
}

#[test]
fn without_the_constraint_no_tool_call_comes_out() {
    let model = model();
    let tools = tools();
    for seed in 0..SEEDS {
        let answer = model.answer(&tool_question(&tools, seed, false), |_| {}).unwrap();
        assert!(tools.parse_call(&answer.raw_text).is_err(), "seed {seed}: {:?}", answer.raw_text);
    }
}

#[test]
fn constraint_errors_name_the_problem() {
    let model = model();
    let broken = model.answer(&question(0, Some(Grammar::Lark("start: \"a\" missing".into())), 20), |_| {});
    match broken {
        Err(ModelError::Constraint(ConstraintError::Compile { message, .. })) => {
            assert!(message.contains("missing"), "{message}")
        }
        other => panic!("expected a compile error, got {:?}", other.map(|a| a.text)),
    }
    let short = model.answer(&question(0, Some(SceneObservation::grammar()), 5), |_| {});
    match short {
        Err(ModelError::Runtime(outpost::model::RuntimeError::Constraint(ConstraintError::Unfinished {
            generated,
            ..
        }))) => assert_eq!(generated, 5),
        other => panic!("expected an unfinished answer, got {:?}", other.map(|a| a.text)),
    }
}
