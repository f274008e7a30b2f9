//! What the model stage publishes about a scene. The model fills a [`SceneObservation`], its
//! answer constrained to that type's JSON Schema; the daemon wraps it in a [`SceneReport`] with
//! what it knows itself (when, where, why, how long, which model).
//!
//! Both schemas are committed in `schemas/` (`*.v1.json`) for consumers; a test regenerates
//! them from these types and fails on any difference. Doc comments here become the schemas'
//! descriptions, which the model reads: write them for it.

use std::time::SystemTime;

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Answer, Grammar};

/// What is in the scene, as the model judged it from the picture and sound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SceneObservation {
    /// One or two plain sentences saying what is happening.
    #[schemars(length(min = 1, max = 300))]
    pub summary: String,
    /// Up to 8 short lowercase labels for what is there, such as "person", "delivery van", "smoke".
    #[schemars(length(max = 8), inner(length(min = 1, max = 32), regex(pattern = r"^[a-z0-9]+([ -][a-z0-9]+)*$")))]
    pub labels: Vec<String>,
    /// How many people are visible.
    #[schemars(range(max = 100))]
    pub people: u8,
    /// How many vehicles are visible.
    #[schemars(range(max = 100))]
    pub vehicles: u8,
    /// How many hazards are present (fire, smoke, flooding, a weapon, a fall, ...).
    #[schemars(range(max = 100))]
    pub hazards: u8,
    /// 0: nothing notable; 1: notable; 2: needs attention; 3: emergency.
    #[schemars(range(max = 3))]
    pub severity: u8,
    /// How sure the observation is, from 0 (a guess) to 1 (certain).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub confidence: f32,
    /// Language of the summary, a BCP 47 code such as "en" or "pt-BR".
    #[schemars(length(min = 2, max = 35), regex(pattern = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"))]
    pub language: String,
}

impl SceneObservation {
    /// The JSON Schema the model's answer is held to.
    pub fn schema() -> Schema {
        schemars::schema_for!(SceneObservation)
    }

    /// The constraint for [`Question::constraint`](crate::model::Question::constraint): the
    /// schema, with `confidence` held to two decimals. A JSON number's digits are otherwise
    /// unbounded, and a model that repeats one (`1.000…`) writes until `max_tokens` and loses the
    /// report. The published schema leaves this out: validators compute `multipleOf` in floating
    /// point, and 0.29 / 0.01 is not a whole number there.
    pub fn grammar() -> Grammar {
        let mut schema = Self::schema().to_value();
        schema["properties"]["confidence"]["multipleOf"] = 0.01.into();
        Grammar::JsonSchema(schema)
    }

    /// Instructions for the model: which fields to fill and what each means, from the schema.
    pub fn instructions() -> String {
        let schema = Self::schema().to_value();
        let mut text = String::from("Answer with one JSON object describing the scene, with these fields:\n");
        if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, property) in properties {
                let description = property.get("description").and_then(|d| d.as_str()).unwrap_or_default();
                text.push_str(&format!("- {name}: {description}\n"));
            }
        }
        text
    }
}

/// What set the model looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// The motion gate fired.
    Motion,
    /// The sound gate fired.
    Sound,
    /// Someone spoke.
    Speech,
    /// A scheduled look.
    Schedule,
    /// A person asked for it.
    Command,
    /// A tool answered a call the model made; `event_id` is the call's id.
    ToolResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub kind: TriggerKind,
    /// The `id` of the published event that triggered this report, or of the tool call whose
    /// result it follows.
    #[schemars(with = "Option<String>", extend("format" = "uuid"))]
    pub event_id: Option<Uuid>,
}

/// How long the model took, and how much it read and wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportTiming {
    /// Running the picture and sound encoders, milliseconds.
    pub encode_ms: u64,
    /// From the start until the first answer token (encoders and prefill), milliseconds.
    pub first_token_ms: u64,
    /// From the start until the answer was complete, milliseconds.
    pub total_ms: u64,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
}

impl ReportTiming {
    pub fn of(answer: &Answer) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            encode_ms: ms(answer.encode_time),
            first_token_ms: ms(answer.first_token_time),
            total_ms: ms(answer.total_time),
            prompt_tokens: count(answer.prompt_tokens),
            generated_tokens: count(answer.token_ids.len()),
        }
    }
}

/// Which model wrote the observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    /// The bundle's name, from its manifest.
    pub bundle: String,
    /// sha256 of the bundle's manifest.json, which lists every file's sha256.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub manifest_sha256: String,
}

/// A scene report as published: the model's observation with when, where, why and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SceneReport {
    /// Version of this layout; a consumer refuses versions it does not know.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Time-ordered (UUIDv7), unique across restarts.
    #[schemars(with = "String", extend("format" = "uuid"))]
    pub id: Uuid,
    pub station: String,
    /// Capture time of what triggered the report, RFC 3339 UTC.
    #[schemars(extend("format" = "date-time"))]
    pub timestamp: String,
    pub trigger: Trigger,
    #[serde(flatten)]
    pub observation: SceneObservation,
    pub timing: ReportTiming,
    pub model: ModelIdentity,
}

impl SceneReport {
    pub const SCHEMA_VERSION: u32 = 1;

    /// A report on `observation`, about what was captured at `captured_at`.
    pub fn new(
        station: &str,
        captured_at: SystemTime,
        trigger: Trigger,
        observation: SceneObservation,
        timing: ReportTiming,
        model: ModelIdentity,
    ) -> Self {
        Self {
            schema_version: Self::SCHEMA_VERSION,
            id: Uuid::now_v7(),
            station: station.to_owned(),
            timestamp: humantime::format_rfc3339_millis(captured_at).to_string(),
            trigger,
            observation,
            timing,
            model,
        }
    }

    pub fn schema() -> Schema {
        schemars::schema_for!(SceneReport)
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;

    fn schema_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas").join(name)
    }

    /// The committed schemas are what these types generate; `OUTPOST_BLESS=1` rewrites them.
    #[test]
    fn committed_schemas_match_the_types() {
        let mut stale = Vec::new();
        for (name, schema) in
            [("scene-observation.v1.json", SceneObservation::schema()), ("scene-report.v1.json", SceneReport::schema())]
        {
            let path = schema_path(name);
            let generated = format!("{}\n", serde_json::to_string_pretty(&schema).unwrap());
            if std::env::var_os("OUTPOST_BLESS").is_some() {
                std::fs::write(&path, &generated).unwrap();
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed != generated {
                stale.push(format!("{}:\n{generated}", path.display()));
            }
        }
        assert!(
            stale.is_empty(),
            "the committed schemas differ from the Rust types; if the change is meant (a new version needs a new file), \
             run `OUTPOST_BLESS=1 cargo test -p outpostd --lib report::` and commit schemas/. Generated:\n{}",
            stale.join("\n")
        );
    }

    fn observation() -> SceneObservation {
        SceneObservation {
            summary: "A delivery van stops at the gate; the driver walks to the door.".into(),
            labels: vec!["delivery van".into(), "person".into()],
            people: 1,
            vehicles: 1,
            hazards: 0,
            severity: 1,
            confidence: 0.75,
            language: "en".into(),
        }
    }

    #[test]
    fn report_is_flat_json_valid_under_its_schema() {
        let report = SceneReport::new(
            "gate-7",
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
            Trigger { kind: TriggerKind::Motion, event_id: Some(Uuid::now_v7()) },
            observation(),
            ReportTiming {
                encode_ms: 900,
                first_token_ms: 2_400,
                total_ms: 9_000,
                prompt_tokens: 320,
                generated_tokens: 61,
            },
            ModelIdentity { bundle: "gemma4-e2b".into(), manifest_sha256: "ab".repeat(32) },
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let validator = jsonschema::validator_for(&SceneReport::schema().to_value()).unwrap();
        let errors: Vec<String> = validator.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{json}");
        let mut wrong = json.clone();
        wrong["severity"] = 4.into();
        assert!(!validator.is_valid(&wrong), "severity 4 must be refused");
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["timestamp"], "2025-11-24T16:00:00.123Z");
        assert_eq!(json["trigger"]["kind"], "motion");
        assert_eq!(json["summary"], observation().summary.as_str());
        assert_eq!(json["timing"]["generated_tokens"], 61);
        assert_eq!(serde_json::from_value::<SceneReport>(json).unwrap(), report);
    }

    /// Every field of the answer has a bounded length, so a model that repeats itself still ends
    /// its answer; `confidence`, a number, is the one the schema alone would leave open.
    #[test]
    fn the_grammar_ends_confidence_after_two_decimals() {
        use std::sync::Arc;

        use crate::model::{TokenConstraints, Tokenizer};

        let tokenizer_json = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4-tiny/tokenizer.json");
        let tokenizer = Arc::new(Tokenizer::load(&tokenizer_json).unwrap());
        let constraints = TokenConstraints::load(&tokenizer_json, tokenizer.clone(), &[1]).unwrap();
        let answer = r#"{"summary":"a","labels":[],"people":0,"vehicles":0,"hazards":0,"severity":0,"confidence":"#;
        let fed = |constraint: &mut crate::model::Constraint, text: &str| {
            tokenizer.encode(text).unwrap().into_iter().try_for_each(|token| constraint.accept(token))
        };
        let mut constraint = constraints.constraint(&SceneObservation::grammar()).unwrap();
        fed(&mut constraint, &format!("{answer}1.00")).unwrap();
        assert!(fed(&mut constraint, "0").is_err(), "a third decimal must be refused");
        let mut constraint = constraints.constraint(&SceneObservation::grammar()).unwrap();
        fed(&mut constraint, &format!("{answer}0.29,\"language\":\"en\"}}")).unwrap();
        constraint.check_complete().unwrap();
        // The schema alone takes any number of decimals.
        let mut open = constraints.constraint(&Grammar::JsonSchema(SceneObservation::schema().to_value())).unwrap();
        fed(&mut open, &format!("{answer}1.000000")).unwrap();
    }

    #[test]
    fn instructions_name_every_field() {
        let text = SceneObservation::instructions();
        for field in ["summary", "labels", "people", "vehicles", "hazards", "severity", "confidence", "language"] {
            assert!(text.contains(&format!("- {field}: ")), "{text}");
        }
        assert!(text.contains("needs attention"), "{text}");
    }
}
