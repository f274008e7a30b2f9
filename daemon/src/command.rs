//! Commands a dashboard sends to the station on `<root>/cmd/<name>`, and the replies it gets on
//! `<root>/cmd/<name>/reply`. A command is checked whole before anything happens: a malformed
//! one, or one this station's config does not allow, gets an error reply and changes nothing.

use serde::{Deserialize, Serialize};

/// The largest command payload taken; anything longer is refused unread.
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// The longest question `ask` takes, in characters.
pub const MAX_QUESTION_CHARS: usize = 500;

/// Every command's name, as it appears in the topic.
pub const NAMES: &[&str] = &["capture-now", "ask", "pause", "resume", "reload", "forget-home-assistant"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Look and listen now, whatever the gates say.
    CaptureNow,
    /// Answer a question about the current scene.
    Ask {
        question: String,
    },
    /// Stop capturing until `resume`; the station stays connected.
    Pause,
    Resume,
    /// Read the config file again, as SIGHUP does.
    Reload,
    /// Remove the station's device from Home Assistant (until the next start or reload).
    ForgetHomeAssistant,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::CaptureNow => "capture-now",
            Command::Ask { .. } => "ask",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Reload => "reload",
            Command::ForgetHomeAssistant => "forget-home-assistant",
        }
    }
}

/// A command as received: what to do, and the id to echo in the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    pub command: Command,
    /// The caller's `id`, echoed so it can match the reply to its request.
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command `{0}`; the commands are {names}", names = NAMES.join(", "))]
    Unknown(String),
    #[error("the payload is {0} bytes, over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    #[error("the payload is not UTF-8 JSON: {0}")]
    NotText(String),
    #[error("the payload is not a valid {command} request: {why}")]
    Invalid { command: &'static str, why: String },
    #[error("`{0}` is not allowed on this station (see `[commands] allowed` in its config)")]
    NotAllowed(&'static str),
}

/// The optional fields every command takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AskPayload {
    id: Option<String>,
    question: String,
}

/// Parses the command named `name` (the last topic level) from its payload: a JSON object, or
/// nothing at all for a command without arguments.
pub fn parse(name: &str, payload: &[u8], allowed: &[String]) -> Result<CommandRequest, CommandError> {
    let Some(&known) = NAMES.iter().find(|&&n| n == name) else {
        return Err(CommandError::Unknown(name.chars().take(64).collect()));
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(CommandError::TooLarge(payload.len()));
    }
    if !allowed.iter().any(|a| a == known) {
        return Err(CommandError::NotAllowed(known));
    }
    let text = std::str::from_utf8(payload).map_err(|e| CommandError::NotText(e.to_string()))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    let invalid = |why: serde_json::Error| CommandError::Invalid { command: known, why: why.to_string() };
    let request = match known {
        "ask" => {
            let ask: AskPayload = serde_json::from_str(text).map_err(invalid)?;
            let question = ask.question.trim().to_owned();
            if question.is_empty() || question.chars().count() > MAX_QUESTION_CHARS {
                return Err(CommandError::Invalid {
                    command: known,
                    why: format!("`question` must be 1 to {MAX_QUESTION_CHARS} characters"),
                });
            }
            CommandRequest { command: Command::Ask { question }, id: ask.id }
        }
        _ => {
            let plain: Plain = serde_json::from_str(text).map_err(invalid)?;
            let command = match known {
                "capture-now" => Command::CaptureNow,
                "pause" => Command::Pause,
                "resume" => Command::Resume,
                "reload" => Command::Reload,
                _ => Command::ForgetHomeAssistant,
            };
            CommandRequest { command, id: plain.id }
        }
    };
    if request.id.as_ref().is_some_and(|id| id.len() > 128) {
        return Err(CommandError::Invalid { command: known, why: "`id` must be at most 128 bytes".into() });
    }
    Ok(request)
}

/// The answer to a command, published on `<root>/cmd/<name>/reply` (or to a tool result, on
/// `<root>/tool/<name>/result/reply`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandReply {
    /// The command's name, or `tool/<name>/result`.
    pub command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub ok: bool,
    /// What happened, or what was wrong.
    pub message: String,
}

impl CommandReply {
    pub fn done(request: &CommandRequest, message: impl Into<String>) -> Self {
        Self { command: request.command.name().into(), id: request.id.clone(), ok: true, message: message.into() }
    }

    pub fn failed(command: &str, id: Option<String>, message: impl Into<String>) -> Self {
        Self { command: command.chars().take(64).collect(), id, ok: false, message: message.into() }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The `id` of a payload that failed to parse, if one can be read, so the error reply still
/// reaches the right caller.
pub fn salvage_id(payload: &[u8]) -> Option<String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("id")?.as_str().filter(|id| id.len() <= 128).map(str::to_owned)
}

/// What arrives from outside for the service: a command, or a tool's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Command(CommandRequest),
    ToolResult(ToolResult),
}

/// The largest tool result taken; anything longer is refused unread.
pub const MAX_TOOL_RESULT_BYTES: usize = 16 << 10;

/// What a tool answered to a call, from `<root>/tool/<name>/result`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub tool: String,
    /// The call's `id`.
    pub call_id: uuid::Uuid,
    /// `{"result": …}`, or `{"error": "…"}` when the tool failed: given to the model as is.
    pub response: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolResultPayload {
    #[serde(default)]
    id: Option<uuid::Uuid>,
    #[serde(default)]
    result: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    error: Option<String>,
}

impl ToolResult {
    /// Where its reply goes under the station's root, as [`CommandReply::command`].
    pub fn reply_to(tool: &str) -> String {
        format!("tool/{tool}/result")
    }

    pub fn reply(&self, ok: bool, message: impl Into<String>) -> CommandReply {
        CommandReply {
            command: Self::reply_to(&self.tool),
            id: Some(self.call_id.to_string()),
            ok,
            message: message.into(),
        }
    }
}

/// Parses the result of a call of `tool`: `{"id": "<call id>", "result": {…}}` or
/// `{"id": "<call id>", "error": "what went wrong"}`. Over MQTT 5 the id may come as the
/// correlation data instead (the call's own, sent back to its response topic).
pub fn parse_tool_result(tool: &str, payload: &[u8], correlation: Option<&[u8]>) -> Result<ToolResult, String> {
    if payload.len() > MAX_TOOL_RESULT_BYTES {
        return Err(format!("the payload is {} bytes, over the limit of {MAX_TOOL_RESULT_BYTES}", payload.len()));
    }
    let parsed: ToolResultPayload =
        serde_json::from_slice(payload).map_err(|e| format!("the payload is not a valid tool result: {e}"))?;
    let correlated = correlation.and_then(|c| std::str::from_utf8(c).ok()).and_then(|c| c.parse::<uuid::Uuid>().ok());
    let call_id = parsed
        .id
        .or(correlated)
        .ok_or("a tool result names its call: `id` in the payload, or MQTT 5 correlation data")?;
    let response = match (parsed.result, parsed.error) {
        (Some(result), None) => serde_json::json!({ "result": result }),
        (None, Some(error)) if !error.trim().is_empty() => serde_json::json!({ "error": error }),
        _ => return Err("a tool result has either `result` (an object) or `error` (a message)".into()),
    };
    Ok(ToolResult { tool: tool.to_owned(), call_id, response })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<String> {
        NAMES.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn commands_parse_with_and_without_a_payload() {
        assert_eq!(parse("pause", b"", &all()).unwrap(), CommandRequest { command: Command::Pause, id: None });
        assert_eq!(
            parse("resume", br#"{"id":"r-1"}"#, &all()).unwrap(),
            CommandRequest { command: Command::Resume, id: Some("r-1".into()) }
        );
        let ask = parse("ask", br#"{"question":" Is anyone at the gate? ","id":"q7"}"#, &all()).unwrap();
        assert_eq!(ask.command, Command::Ask { question: "Is anyone at the gate?".into() });
        assert_eq!(ask.id.as_deref(), Some("q7"));
    }

    #[test]
    fn malformed_commands_are_refused_with_the_reason() {
        let cases: [(&str, &[u8], &str); 7] = [
            ("selfdestruct", b"", "unknown command `selfdestruct`"),
            ("pause", b"{not json", "not a valid pause request"),
            ("pause", br#"{"id":"x","force":true}"#, "unknown field `force`"),
            ("ask", br#"{"question":42}"#, "invalid type: integer `42`, expected a string"),
            ("ask", br#"{"question":"   "}"#, "`question` must be 1 to 500 characters"),
            ("ask", b"\xff\xfe", "not UTF-8"),
            ("reload", br#"{"id":7}"#, "invalid type: integer `7`"),
        ];
        for (name, payload, expected) in cases {
            let error = parse(name, payload, &all()).unwrap_err().to_string();
            assert!(error.contains(expected), "{name}: `{error}` lacks `{expected}`");
        }
        let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert_eq!(parse("ask", &huge, &all()), Err(CommandError::TooLarge(MAX_PAYLOAD_BYTES + 1)));
    }

    #[test]
    fn a_command_the_config_does_not_allow_is_refused() {
        let allowed = vec!["capture-now".to_string()];
        assert_eq!(parse("reload", b"", &allowed), Err(CommandError::NotAllowed("reload")));
        assert!(parse("capture-now", b"", &allowed).is_ok());
    }

    #[test]
    fn tool_results_are_checked_whole() {
        let id = "01a21ca2-c5de-70f3-a878-cb8364503513";
        let ok = parse_tool_result("siren", format!(r#"{{"id":"{id}","result":{{"sounded":true}}}}"#).as_bytes(), None)
            .unwrap();
        assert_eq!(ok.response, serde_json::json!({"result": {"sounded": true}}));
        let failed =
            parse_tool_result("siren", format!(r#"{{"id":"{id}","error":"no power"}}"#).as_bytes(), None).unwrap();
        assert_eq!(failed.response, serde_json::json!({"error": "no power"}));
        let cases: [(String, &str); 6] = [
            ("{not json".into(), "not a valid tool result"),
            (r#"{"id":"x","result":{}}"#.into(), "UUID"),
            (format!(r#"{{"id":"{id}","result":[1]}}"#), "expected a map"),
            (format!(r#"{{"id":"{id}"}}"#), "either `result`"),
            (format!(r#"{{"id":"{id}","result":{{}},"error":"both"}}"#), "either `result`"),
            (format!(r#"{{"id":"{id}","result":{{}},"extra":1}}"#), "unknown field `extra`"),
        ];
        for (payload, expected) in cases {
            let error = parse_tool_result("siren", payload.as_bytes(), None).unwrap_err();
            assert!(error.contains(expected), "{payload}: `{error}` lacks `{expected}`");
        }
        let huge = format!(r#"{{"id":"{id}","result":{{"x":"{}"}}}}"#, "a".repeat(MAX_TOOL_RESULT_BYTES));
        assert!(parse_tool_result("siren", huge.as_bytes(), None).unwrap_err().contains("over the limit"));
        // Over MQTT 5 the call's id may come as correlation data instead.
        let correlated = parse_tool_result("siren", br#"{"result":{}}"#, Some(id.as_bytes())).unwrap();
        assert_eq!(correlated.call_id.to_string(), id);
        let unnamed = parse_tool_result("siren", br#"{"result":{}}"#, None).unwrap_err();
        assert!(unnamed.contains("names its call"), "{unnamed}");
    }

    #[test]
    fn an_error_reply_keeps_the_callers_id_when_it_can_be_read() {
        assert_eq!(salvage_id(br#"{"id":"abc","question":1}"#).as_deref(), Some("abc"));
        assert_eq!(salvage_id(b"{broken"), None);
        let reply = CommandReply::failed("ask", Some("abc".into()), "bad");
        assert_eq!(reply.to_json(), r#"{"command":"ask","id":"abc","ok":false,"message":"bad"}"#);
    }
}
