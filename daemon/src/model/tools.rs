//! Tools the model may call, in Gemma 4's own syntax (it is not JSON): declarations in the
//! system turn, a grammar that lets the model write only a well-typed call of a declared tool,
//! parsing of that call, and the response turn that feeds a result back.
//!
//! The syntax follows the Gemma 4 chat template of transformers:
//! - declaration: `<|tool>declaration:NAME{description:<|"|>…<|"|>,parameters:{properties:{KEY:{description:<|"|>…<|"|>,type:<|"|>STRING<|"|>},…},required:[<|"|>KEY<|"|>,…],type:<|"|>OBJECT<|"|>}}<tool|>`,
//!   properties in key order, types upper-case, `enum:[…]` for a string with fixed values;
//! - call: `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:5,on:true}<tool_call|>` (bare keys, in key
//!   order when the template writes one);
//! - response: `<|tool_response>response:NAME{key:value,…}<tool_response|>`, or `{value:…}` for a
//!   result that is not an object.
//!
//! `<|"|>` is one special token that delimits strings, so a string needs no escaping; it only
//! cannot hold the five characters `<|"|>` as plain text.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Grammar;

/// The token that opens and closes a string, written out.
const QUOTE: &str = "<|\"|>";
const CALL_OPEN: &str = "<|tool_call>call:";
const CALL_CLOSE: &str = "<tool_call|>";

/// A tool or parameter name. Gemma writes them bare (`call:NAME{key:…}`), so they are
/// identifiers: an ASCII letter or `_`, then letters, digits and `_`, at most 64 in all.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identifier(String);

pub type ToolName = Identifier;
pub type ParameterName = Identifier;

impl Identifier {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Identifier {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let mut chars = name.chars();
        let valid_start = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if valid_start && name.len() <= 64 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Ok(Self(name))
        } else {
            Err(format!(
                "`{name}` is not a tool or parameter name: use an ASCII letter or `_`, then letters, digits or `_` (at most 64)"
            ))
        }
    }
}

impl TryFrom<&str> for Identifier {
    type Error = String;

    fn try_from(name: &str) -> Result<Self, String> {
        Self::try_from(name.to_owned())
    }
}

impl From<Identifier> for String {
    fn from(name: Identifier) -> String {
        name.0
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn required_by_default() -> bool {
    true
}

/// One parameter of a tool: its type with the bounds the grammar enforces, a description the
/// model reads, and whether a call must give it (by default it must).
///
/// Gemma's declaration syntax has no place for bounds (`minimum`, `maximum`, `max_length`): the
/// model does not see them, the grammar holds it to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ToolParameter {
    String {
        #[serde(default)]
        description: String,
        #[serde(default = "required_by_default")]
        required: bool,
        /// At most this many characters.
        max_length: Option<u32>,
    },
    Integer {
        #[serde(default)]
        description: String,
        #[serde(default = "required_by_default")]
        required: bool,
        minimum: Option<i64>,
        maximum: Option<i64>,
    },
    Number {
        #[serde(default)]
        description: String,
        #[serde(default = "required_by_default")]
        required: bool,
        minimum: Option<f64>,
        maximum: Option<f64>,
    },
    Boolean {
        #[serde(default)]
        description: String,
        #[serde(default = "required_by_default")]
        required: bool,
    },
    /// A string that must be one of `values`.
    Enum {
        #[serde(default)]
        description: String,
        #[serde(default = "required_by_default")]
        required: bool,
        values: Vec<String>,
    },
}

impl ToolParameter {
    pub fn description(&self) -> &str {
        match self {
            ToolParameter::String { description, .. }
            | ToolParameter::Integer { description, .. }
            | ToolParameter::Number { description, .. }
            | ToolParameter::Boolean { description, .. }
            | ToolParameter::Enum { description, .. } => description,
        }
    }

    pub fn required(&self) -> bool {
        match self {
            ToolParameter::String { required, .. }
            | ToolParameter::Integer { required, .. }
            | ToolParameter::Number { required, .. }
            | ToolParameter::Boolean { required, .. }
            | ToolParameter::Enum { required, .. } => *required,
        }
    }

    /// The type as Gemma's declarations write it.
    fn gemma_type(&self) -> &'static str {
        match self {
            ToolParameter::String { .. } | ToolParameter::Enum { .. } => "STRING",
            ToolParameter::Integer { .. } => "INTEGER",
            ToolParameter::Number { .. } => "NUMBER",
            ToolParameter::Boolean { .. } => "BOOLEAN",
        }
    }
}

/// A tool the model may call. A config file declares tools as a list of tables, parameters as
/// sub-tables named after the parameter:
///
/// ```toml
/// [[tools]]
/// name = "sound_siren"
/// description = "Sound the siren at one gate."
/// confirm = true                 # a person must confirm before it runs
///
/// [tools.parameters.gate]
/// type = "enum"                  # string, integer, number, boolean or enum
/// values = ["north", "south"]
/// description = "Which gate."
///
/// [tools.parameters.seconds]
/// type = "integer"
/// minimum = 1
/// maximum = 300
/// required = false               # parameters are required unless this says otherwise
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDeclaration {
    pub name: ToolName,
    pub description: String,
    /// In name order, the order Gemma's declarations and calls use.
    #[serde(default)]
    pub parameters: BTreeMap<ParameterName, ToolParameter>,
    /// A person must confirm a call before it runs.
    #[serde(default)]
    pub confirm: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    #[error("tool `{0}` is declared twice")]
    Duplicate(ToolName),
    #[error("no tools declared: a tool call needs at least one")]
    Empty,
    #[error("tool `{tool}`, parameter `{parameter}`: {problem}")]
    Parameter { tool: ToolName, parameter: ParameterName, problem: String },
    #[error("tool `{tool}`: the description cannot contain {QUOTE} (it delimits strings in Gemma's syntax)")]
    Description { tool: ToolName },
}

/// A checked set of tools: unique names, satisfiable bounds. Renders the declarations, the
/// grammar of a call, and parses calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    tools: Vec<ToolDeclaration>,
}

impl ToolSet {
    pub fn new(tools: Vec<ToolDeclaration>) -> Result<Self, ToolError> {
        if tools.is_empty() {
            return Err(ToolError::Empty);
        }
        for (index, tool) in tools.iter().enumerate() {
            if tools[..index].iter().any(|other| other.name == tool.name) {
                return Err(ToolError::Duplicate(tool.name.clone()));
            }
            if tool.description.contains(QUOTE) {
                return Err(ToolError::Description { tool: tool.name.clone() });
            }
            for (name, parameter) in &tool.parameters {
                check_parameter(parameter).map_err(|problem| ToolError::Parameter {
                    tool: tool.name.clone(),
                    parameter: name.clone(),
                    problem,
                })?;
            }
        }
        Ok(Self { tools })
    }

    pub fn declarations(&self) -> &[ToolDeclaration] {
        &self.tools
    }

    pub fn get(&self, name: &str) -> Option<&ToolDeclaration> {
        self.tools.iter().find(|tool| tool.name.as_str() == name)
    }

    /// The declarations as they go into the system turn.
    pub fn render_declarations(&self) -> String {
        self.tools.iter().map(render_declaration).collect()
    }

    /// A grammar that allows exactly one call of a declared tool with well-typed arguments, in
    /// name order; optional arguments may be left out.
    pub fn call_grammar(&self) -> Grammar {
        let mut lark = String::from("start: <|tool_call> \"call:\" (");
        lark.push_str(&(0..self.tools.len()).map(|i| format!("t{i}")).collect::<Vec<_>>().join(" | "));
        lark.push_str(") <tool_call|>\n");
        for (i, tool) in self.tools.iter().enumerate() {
            let parameters: Vec<_> = tool.parameters.iter().collect();
            let n = parameters.len();
            lark.push_str(&format!("t{i}: {} t{i}_h0 \"}}\"\n", lark_string(&format!("{}{{", tool.name))));
            // `h{j}`: parameters j.. with no comma before the first; `c{j}`: each after a comma.
            for (j, (name, parameter)) in parameters.iter().enumerate() {
                let value = format!("t{i}_v{j}");
                let (next_h, next_c) = (format!("t{i}_h{}", j + 1), format!("t{i}_c{}", j + 1));
                if parameter.required() {
                    lark.push_str(&format!("t{i}_h{j}: {value} {next_c}\n"));
                    lark.push_str(&format!("t{i}_c{j}: \",\" {value} {next_c}\n"));
                } else {
                    lark.push_str(&format!("t{i}_h{j}: {value} {next_c} | {next_h}\n"));
                    lark.push_str(&format!("t{i}_c{j}: \",\" {value} {next_c} | {next_c}\n"));
                }
                let (body, terminal) = value_grammar(parameter, &format!("T{i}_S{j}"));
                lark.push_str(&format!("{value}: {} {body}\n", lark_string(&format!("{name}:"))));
                lark.push_str(&terminal);
            }
            lark.push_str(&format!("t{i}_h{n}: \"\"\nt{i}_c{n}: \"\"\n"));
        }
        Grammar::Lark(lark)
    }

    /// Reads one call, `<|tool_call>call:NAME{…}<tool_call|>` with the special tokens written out
    /// (and nothing else but white space around it), checking the tool and every argument
    /// against its declaration.
    pub fn parse_call(&self, text: &str) -> Result<ToolCall, ToolCallError> {
        let text = text.trim();
        let body = text
            .strip_prefix(CALL_OPEN)
            .and_then(|rest| rest.strip_suffix(CALL_CLOSE))
            .ok_or_else(|| ToolCallError::NotACall(preview(text)))?;
        let (name, rest) = body.split_once('{').ok_or_else(|| ToolCallError::NotACall(preview(text)))?;
        let tool = self.get(name).ok_or_else(|| ToolCallError::UnknownTool(name.to_owned()))?;
        let mut arguments_text = rest
            .strip_suffix('}')
            .ok_or_else(|| ToolCallError::Malformed { tool: name.to_owned(), expected: "`}`" })?;
        let mut arguments = Map::new();
        while !arguments_text.is_empty() {
            let malformed = |expected| ToolCallError::Malformed { tool: name.to_owned(), expected };
            let (key, rest) = arguments_text.split_once(':').ok_or(malformed("`key:value`"))?;
            let (parameter_name, parameter) =
                tool.parameters.iter().find(|(parameter_name, _)| parameter_name.as_str() == key).ok_or_else(|| {
                    ToolCallError::UnknownArgument { tool: name.to_owned(), argument: key.to_owned() }
                })?;
            if arguments.contains_key(key) {
                return Err(ToolCallError::DuplicateArgument { tool: name.to_owned(), argument: key.to_owned() });
            }
            let (value, rest) = parse_value(parameter, rest).map_err(|problem| ToolCallError::BadArgument {
                tool: name.to_owned(),
                argument: parameter_name.to_string(),
                problem,
            })?;
            arguments.insert(key.to_owned(), value);
            arguments_text = match rest.strip_prefix(',') {
                Some(more) if !more.is_empty() => more,
                Some(_) => return Err(malformed("another argument after `,`")),
                None if rest.is_empty() => rest,
                None => return Err(malformed("`,` or `}` after a value")),
            };
        }
        if let Some((missing, _)) = tool
            .parameters
            .iter()
            .find(|(key, parameter)| parameter.required() && !arguments.contains_key(key.as_str()))
        {
            return Err(ToolCallError::MissingArgument { tool: name.to_owned(), argument: missing.to_string() });
        }
        Ok(ToolCall { name: tool.name.clone(), arguments })
    }
}

fn check_parameter(parameter: &ToolParameter) -> Result<(), String> {
    if parameter.description().contains(QUOTE) {
        return Err(format!("the description cannot contain {QUOTE}"));
    }
    match parameter {
        ToolParameter::String { max_length: Some(0), .. } => Err("max_length must be at least 1".into()),
        ToolParameter::Integer { minimum: Some(min), maximum: Some(max), .. } if min > max => {
            Err(format!("minimum {min} is above maximum {max}"))
        }
        ToolParameter::Number { minimum, maximum, .. } => {
            if minimum.iter().chain(maximum).any(|bound| !bound.is_finite()) {
                Err("bounds must be finite numbers".into())
            } else if let (Some(min), Some(max)) = (minimum, maximum) {
                if min > max {
                    Err(format!("minimum {min} is above maximum {max}"))
                } else {
                    Ok(())
                }
            } else {
                Ok(())
            }
        }
        ToolParameter::Enum { values, .. } => {
            if values.is_empty() {
                Err("an enum needs at least one value".into())
            } else if let Some(value) = values.iter().find(|v| v.contains(QUOTE)) {
                Err(format!("value `{value}` cannot contain {QUOTE}"))
            } else if let Some((index, value)) = values.iter().enumerate().find(|(i, v)| values[..*i].contains(v)) {
                Err(format!("value `{value}` is listed twice (again at position {})", index + 1))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// A string as a Lark literal (JSON string syntax, which Lark reads, without raw DEL).
fn lark_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default().replace('\u{7f}', "\\u007f")
}

/// Text of a string argument: any characters but the quote token's five, which would end the
/// string when the call is read back.
fn string_terminal(max_length: Option<u32>) -> String {
    let repeat = max_length.map_or("*".to_owned(), |max| format!("{{0,{max}}}"));
    format!(r#"/(?s:.){repeat}/ & ~/(?s:.)*<\|"\|>(?s:.)*/"#)
}

/// The grammar of one argument's value, and the definition of the terminal it uses (named
/// `terminal`), if any: `&` and `~` combine regexes only in terminals.
fn value_grammar(parameter: &ToolParameter, terminal: &str) -> (String, String) {
    let json = |schema: Value| {
        let mut schema = schema;
        schema["x-guidance"] = serde_json::json!({ "whitespace_flexible": false });
        (format!("%json {schema}"), String::new())
    };
    match parameter {
        ToolParameter::String { max_length, .. } => {
            (format!("<|\"|> {terminal} <|\"|>"), format!("{terminal}: {}\n", string_terminal(*max_length)))
        }
        ToolParameter::Enum { values, .. } => {
            let values: Vec<String> = values.iter().map(|v| lark_string(v)).collect();
            (format!("<|\"|> ({}) <|\"|>", values.join(" | ")), String::new())
        }
        ToolParameter::Boolean { .. } => ("(\"true\" | \"false\")".into(), String::new()),
        ToolParameter::Integer { minimum, maximum, .. } => {
            let mut schema = serde_json::json!({ "type": "integer" });
            if let Some(min) = minimum {
                schema["minimum"] = (*min).into();
            }
            if let Some(max) = maximum {
                schema["maximum"] = (*max).into();
            }
            json(schema)
        }
        ToolParameter::Number { minimum, maximum, .. } => {
            let mut schema = serde_json::json!({ "type": "number" });
            if let Some(min) = minimum {
                schema["minimum"] = (*min).into();
            }
            if let Some(max) = maximum {
                schema["maximum"] = (*max).into();
            }
            json(schema)
        }
    }
}

/// Reads one value of `parameter`'s type from the start of `text`; returns it and the rest.
fn parse_value<'a>(parameter: &ToolParameter, text: &'a str) -> Result<(Value, &'a str), String> {
    match parameter {
        ToolParameter::String { max_length, .. } => {
            let (value, rest) = quoted(text)?;
            match max_length {
                Some(max) if value.chars().count() > *max as usize => {
                    Err(format!("is {} characters long, at most {max} allowed", value.chars().count()))
                }
                _ => Ok((Value::String(value.to_owned()), rest)),
            }
        }
        ToolParameter::Enum { values, .. } => {
            let (value, rest) = quoted(text)?;
            if values.iter().any(|v| v == value) {
                Ok((Value::String(value.to_owned()), rest))
            } else {
                Err(format!("`{value}` is not one of {values:?}"))
            }
        }
        ToolParameter::Boolean { .. } => {
            let (word, rest) = scalar(text);
            match word {
                "true" => Ok((Value::Bool(true), rest)),
                "false" => Ok((Value::Bool(false), rest)),
                other => Err(format!("`{other}` is not true or false")),
            }
        }
        ToolParameter::Integer { minimum, maximum, .. } => {
            let (word, rest) = scalar(text);
            let n: i64 = word.parse().map_err(|_| format!("`{word}` is not an integer"))?;
            if minimum.is_some_and(|min| n < min) || maximum.is_some_and(|max| n > max) {
                return Err(format!("{n} is outside {}", range_text(minimum, maximum)));
            }
            Ok((Value::from(n), rest))
        }
        ToolParameter::Number { minimum, maximum, .. } => {
            let (word, rest) = scalar(text);
            // JSON's number syntax: what the grammar allows, and what serde_json reads.
            let number = match serde_json::from_str::<Value>(word) {
                Ok(Value::Number(number)) => number,
                _ => return Err(format!("`{word}` is not a number")),
            };
            let n = number.as_f64().unwrap_or(f64::NAN);
            if minimum.is_some_and(|min| n < min) || maximum.is_some_and(|max| n > max) {
                return Err(format!("{n} is outside {}", range_text(minimum, maximum)));
            }
            Ok((Value::Number(number), rest))
        }
    }
}

fn range_text<T: fmt::Display>(minimum: &Option<T>, maximum: &Option<T>) -> String {
    let bound = |b: &Option<T>| b.as_ref().map_or("…".to_owned(), |b| b.to_string());
    format!("{}..={}", bound(minimum), bound(maximum))
}

/// `<|"|>text<|"|>` at the start of `text`.
fn quoted(text: &str) -> Result<(&str, &str), String> {
    let inner = text.strip_prefix(QUOTE).ok_or_else(|| format!("does not start with {QUOTE}"))?;
    let end = inner.find(QUOTE).ok_or_else(|| format!("has no closing {QUOTE}"))?;
    Ok((&inner[..end], &inner[end + QUOTE.len()..]))
}

/// A bare value: everything up to the next `,` or the end.
fn scalar(text: &str) -> (&str, &str) {
    let end = text.find(',').unwrap_or(text.len());
    (&text[..end], &text[end..])
}

fn preview(text: &str) -> String {
    let mut shown: String = text.chars().take(80).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

/// A call the model made, arguments checked against the tool's declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: ToolName,
    pub arguments: Map<String, Value>,
}

impl ToolCall {
    /// The call as Gemma writes it, for a model turn in the conversation history.
    pub fn render(&self) -> String {
        format!("{CALL_OPEN}{}{}{CALL_CLOSE}", self.name, format_fields(&self.arguments))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolCallError {
    #[error("not a tool call (`<|tool_call>call:NAME{{…}}<tool_call|>`): {0}")]
    NotACall(String),
    #[error("the model called `{0}`, which is not a declared tool")]
    UnknownTool(String),
    #[error("call of `{tool}`: expected {expected}")]
    Malformed { tool: String, expected: &'static str },
    #[error("call of `{tool}`: `{argument}` is not one of its parameters")]
    UnknownArgument { tool: String, argument: String },
    #[error("call of `{tool}`: `{argument}` is given twice")]
    DuplicateArgument { tool: String, argument: String },
    #[error("call of `{tool}`: required `{argument}` is missing")]
    MissingArgument { tool: String, argument: String },
    #[error("call of `{tool}`: `{argument}` {problem}")]
    BadArgument { tool: String, argument: String, problem: String },
}

/// A tool's result as Gemma reads it: `<|tool_response>response:NAME{key:value,…}<tool_response|>`,
/// keys in order; a result that is not an object becomes `{value:…}`.
pub fn render_tool_response(name: &ToolName, response: &Value) -> String {
    let body = match response {
        Value::Object(fields) => format_fields(fields),
        other => format!("{{value:{}}}", format_argument(other, false)),
    };
    format!("<|tool_response>response:{name}{body}<tool_response|>")
}

fn render_declaration(tool: &ToolDeclaration) -> String {
    let mut out =
        format!("<|tool>declaration:{}{{description:{QUOTE}{}{QUOTE},parameters:{{", tool.name, tool.description);
    if !tool.parameters.is_empty() {
        let properties: Vec<String> = tool
            .parameters
            .iter()
            .map(|(name, parameter)| {
                let mut fields = Vec::new();
                if !parameter.description().is_empty() {
                    fields.push(format!("description:{QUOTE}{}{QUOTE}", parameter.description()));
                }
                if let ToolParameter::Enum { values, .. } = parameter {
                    let values: Vec<Value> = values.iter().cloned().map(Value::String).collect();
                    fields.push(format!("enum:{}", format_argument(&Value::Array(values), true)));
                }
                fields.push(format!("type:{QUOTE}{}{QUOTE}", parameter.gemma_type()));
                format!("{name}:{{{}}}", fields.join(","))
            })
            .collect();
        out.push_str(&format!("properties:{{{}}},", properties.join(",")));
    }
    let required: Vec<String> = tool
        .parameters
        .iter()
        .filter(|(_, parameter)| parameter.required())
        .map(|(name, _)| format!("{QUOTE}{name}{QUOTE}"))
        .collect();
    if !required.is_empty() {
        out.push_str(&format!("required:[{}],", required.join(",")));
    }
    out.push_str(&format!("type:{QUOTE}OBJECT{QUOTE}}}}}<tool|>"));
    out
}

/// `{key:value,…}` in key order, keys bare.
fn format_fields(fields: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = fields.keys().collect();
    keys.sort();
    let parts: Vec<String> =
        keys.into_iter().map(|key| format!("{key}:{}", format_argument(&fields[key.as_str()], false))).collect();
    format!("{{{}}}", parts.join(","))
}

/// A value in Gemma's syntax (the template's `format_argument`).
fn format_argument(value: &Value, escape_keys: bool) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{QUOTE}{s}{QUOTE}"),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(|item| format_argument(item, escape_keys)).collect::<Vec<_>>().join(","))
        }
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|key| {
                    let shown = if escape_keys { format!("{QUOTE}{key}{QUOTE}") } else { key.clone() };
                    format!("{shown}:{}", format_argument(&fields[key.as_str()], escape_keys))
                })
                .collect();
            format!("{{{}}}", parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[[tools]]
name = "sound_siren"
description = "Sound the siren at one gate."
confirm = true

[tools.parameters.gate]
type = "enum"
values = ["north", "south"]
description = "Which gate."

[tools.parameters.seconds]
type = "integer"
minimum = 1
maximum = 300
required = false

[[tools]]
name = "note"
description = "Write a note in the log."

[tools.parameters.text]
type = "string"
max_length = 40

[tools.parameters.level]
type = "number"
minimum = 0.0
maximum = 1.0

[tools.parameters.urgent]
type = "boolean"
required = false
"#;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        tools: Vec<ToolDeclaration>,
    }

    fn tools() -> ToolSet {
        ToolSet::new(toml::from_str::<Config>(TOML).unwrap().tools).unwrap()
    }

    #[test]
    fn declarations_read_from_toml() {
        let tools = tools();
        let siren = tools.get("sound_siren").unwrap();
        assert!(siren.confirm);
        assert_eq!(
            siren.parameters[&Identifier::try_from("seconds").unwrap()],
            ToolParameter::Integer {
                description: String::new(),
                required: false,
                minimum: Some(1),
                maximum: Some(300)
            }
        );
        assert!(!tools.get("note").unwrap().confirm);
    }

    #[test]
    fn toml_mistakes_are_refused_with_the_reason() {
        let unknown = toml::from_str::<Config>(&TOML.replace("max_length = 40", "max_len = 40")).err().unwrap();
        assert!(unknown.to_string().contains("max_len"), "{unknown}");
        let bad_type = toml::from_str::<Config>(&TOML.replace("type = \"boolean\"", "type = \"bool\"")).err().unwrap();
        assert!(bad_type.to_string().contains("bool"), "{bad_type}");
        let bad_name =
            toml::from_str::<Config>(&TOML.replace("name = \"note\"", "name = \"write note\"")).err().unwrap();
        assert!(bad_name.to_string().contains("not a tool or parameter name"), "{bad_name}");
        let mut declared = toml::from_str::<Config>(&TOML.replace("minimum = 1\n", "minimum = 500\n")).unwrap().tools;
        assert_eq!(
            ToolSet::new(declared.clone()).err().unwrap().to_string(),
            "tool `sound_siren`, parameter `seconds`: minimum 500 is above maximum 300"
        );
        declared.push(declared[0].clone());
        declared[0] = declared[1].clone();
        assert!(matches!(ToolSet::new(declared).err().unwrap(), ToolError::Duplicate(_)));
    }

    #[test]
    fn declarations_render_as_the_gemma4_template_does() {
        assert_eq!(
            tools().render_declarations(),
            concat!(
                r#"<|tool>declaration:sound_siren{description:<|"|>Sound the siren at one gate.<|"|>,parameters:{"#,
                r#"properties:{gate:{description:<|"|>Which gate.<|"|>,enum:[<|"|>north<|"|>,<|"|>south<|"|>],type:<|"|>STRING<|"|>},"#,
                r#"seconds:{type:<|"|>INTEGER<|"|>}},required:[<|"|>gate<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>"#,
                r#"<|tool>declaration:note{description:<|"|>Write a note in the log.<|"|>,parameters:{"#,
                r#"properties:{level:{type:<|"|>NUMBER<|"|>},text:{type:<|"|>STRING<|"|>},urgent:{type:<|"|>BOOLEAN<|"|>}},"#,
                r#"required:[<|"|>level<|"|>,<|"|>text<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>"#,
            )
        );
    }

    #[test]
    fn calls_parse_into_typed_arguments() {
        let tools = tools();
        let call =
            tools.parse_call(r#"<|tool_call>call:sound_siren{gate:<|"|>north<|"|>,seconds:30}<tool_call|>"#).unwrap();
        assert_eq!(call.name.as_str(), "sound_siren");
        assert_eq!(Value::Object(call.arguments.clone()), serde_json::json!({"gate": "north", "seconds": 30}));
        assert_eq!(call.render(), r#"<|tool_call>call:sound_siren{gate:<|"|>north<|"|>,seconds:30}<tool_call|>"#);
        let note = tools
            .parse_call(r#"<|tool_call>call:note{level:0.25,text:<|"|>a, b: {c}<|"|>,urgent:false}<tool_call|>"#)
            .unwrap();
        assert_eq!(
            Value::Object(note.arguments),
            serde_json::json!({"level": 0.25, "text": "a, b: {c}", "urgent": false})
        );
    }

    #[test]
    fn anything_but_a_declared_well_typed_call_is_refused() {
        let tools = tools();
        let cases = [
            ("hello", "not a tool call"),
            (r#"<|tool_call>call:open_door{}<tool_call|>"#, "`open_door`, which is not a declared tool"),
            (r#"<|tool_call>call:sound_siren{gate:<|"|>east<|"|>}<tool_call|>"#, "`east` is not one of"),
            (r#"<|tool_call>call:sound_siren{gate:<|"|>north<|"|>,seconds:301}<tool_call|>"#, "301 is outside 1..=300"),
            (
                r#"<|tool_call>call:sound_siren{gate:<|"|>north<|"|>,seconds:2.5}<tool_call|>"#,
                "`2.5` is not an integer",
            ),
            (r#"<|tool_call>call:sound_siren{seconds:3}<tool_call|>"#, "required `gate` is missing"),
            (
                r#"<|tool_call>call:sound_siren{gate:<|"|>north<|"|>,volume:3}<tool_call|>"#,
                "`volume` is not one of its parameters",
            ),
            (r#"<|tool_call>call:note{level:2,text:<|"|>x<|"|>}<tool_call|>"#, "2 is outside 0..=1"),
            (r#"<|tool_call>call:note{level:1,text:<|"|>x<|"|>,urgent:yes}<tool_call|>"#, "`yes` is not true or false"),
            (r#"<|tool_call>call:note{level:1,text:<|"|>x<|"|>,}<tool_call|>"#, "another argument after `,`"),
            (r#"<|tool_call>call:note{level:1,level:1}<tool_call|>"#, "`level` is given twice"),
        ];
        for (text, expected) in cases {
            let error = tools.parse_call(text).err().unwrap_or_else(|| panic!("{text} parsed"));
            assert!(error.to_string().contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn responses_render_with_bare_keys_in_order() {
        let name = Identifier::try_from("sound_siren").unwrap();
        assert_eq!(
            render_tool_response(&name, &serde_json::json!({"status": "on", "gates": ["north"], "ok": true, "n": 2})),
            r#"<|tool_response>response:sound_siren{gates:[<|"|>north<|"|>],n:2,ok:true,status:<|"|>on<|"|>}<tool_response|>"#
        );
        assert_eq!(
            render_tool_response(&name, &serde_json::json!("done")),
            r#"<|tool_response>response:sound_siren{value:<|"|>done<|"|>}<tool_response|>"#
        );
    }
}
