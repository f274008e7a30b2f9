//! Prompt text for instruction-tuned Gemma models: system, user and model turns, with images and
//! audio as runs of soft-token placeholders that the runtime later fills with encoder outputs.
//! Thinking stays off (no `<|think|>` in the system turn): on a Pi every token counts.
//!
//! Tools follow Gemma 4's template: declarations after the system text, a call in a model turn,
//! and its response right after the call in the same model turn, which stays open for the model
//! to go on (see `tools.rs` for the syntax). Gemma 3 has no tool tokens: there the same text
//! stands in for them.

use super::{render_tool_response, Architecture, ToolCall, ToolName, ToolSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Model,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    /// An image that the vision encoder turns into this many soft tokens.
    Image {
        soft_tokens: usize,
    },
    /// A clip that the audio encoder turns into this many soft tokens.
    Audio {
        soft_tokens: usize,
    },
    /// The tools the model may call, declared in the system turn.
    Tools(ToolSet),
    /// A call the model made, in a model turn.
    ToolCall(ToolCall),
    /// What a called tool returned, after the call in the same model turn.
    ToolResponse {
        name: ToolName,
        response: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Turn {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self { role, parts: vec![Part::Text(text.into())] }
    }
}

/// Gemma 4: `<bos><|turn>system\n…<turn|>\n<|turn>user\n…<turn|>\n<|turn>model\n`; images as
/// `<|image>` + `<|image|>` x N + `<image|>`, audio likewise.
/// Gemma 3 has no system role: the system text opens the first user turn.
pub fn render(architecture: Architecture, turns: &[Turn], add_generation_prompt: bool) -> String {
    let (start, end) = match architecture {
        Architecture::Gemma4 => ("<|turn>", "<turn|>"),
        Architecture::Gemma3 => ("<start_of_turn>", "<end_of_turn>"),
    };
    let mut prompt = String::from("<bos>");
    let mut pending_system = String::new();
    // A model turn that ends with a tool response is the model's to continue: left open.
    let open_model_turn = turns
        .last()
        .is_some_and(|turn| turn.role == Role::Model && matches!(turn.parts.last(), Some(Part::ToolResponse { .. })));
    for (index, turn) in turns.iter().enumerate() {
        let role = match (turn.role, architecture) {
            (Role::System, Architecture::Gemma3) => {
                pending_system = parts_text(&turn.parts);
                continue;
            }
            (Role::System, _) => "system",
            (Role::User, _) => "user",
            (Role::Model, _) => "model",
        };
        prompt.push_str(start);
        prompt.push_str(role);
        prompt.push('\n');
        if !pending_system.is_empty() && turn.role == Role::User {
            prompt.push_str(&pending_system);
            prompt.push_str("\n\n");
            pending_system.clear();
        }
        prompt.push_str(&parts_text(&turn.parts));
        if open_model_turn && index + 1 == turns.len() {
            return prompt;
        }
        prompt.push_str(end);
        prompt.push('\n');
    }
    if add_generation_prompt {
        prompt.push_str(start);
        prompt.push_str("model\n");
    }
    prompt
}

fn parts_text(parts: &[Part]) -> String {
    let mut text = String::new();
    for part in parts {
        match part {
            Part::Text(t) => text.push_str(t.trim()),
            Part::Image { soft_tokens } => {
                text.push_str("<|image>");
                text.push_str(&"<|image|>".repeat(*soft_tokens));
                text.push_str("<image|>");
            }
            Part::Audio { soft_tokens } => {
                text.push_str("<|audio>");
                text.push_str(&"<|audio|>".repeat(*soft_tokens));
                text.push_str("<audio|>");
            }
            Part::Tools(tools) => text.push_str(&tools.render_declarations()),
            Part::ToolCall(call) => text.push_str(&call.render()),
            Part::ToolResponse { name, response } => text.push_str(&render_tool_response(name, response)),
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma4_turns() {
        let turns = [Turn::text(Role::System, "You watch a gate."), Turn::text(Role::User, "What do you see?")];
        assert_eq!(
            render(Architecture::Gemma4, &turns, true),
            "<bos><|turn>system\nYou watch a gate.<turn|>\n<|turn>user\nWhat do you see?<turn|>\n<|turn>model\n"
        );
    }

    #[test]
    fn gemma4_image_and_audio_placeholders() {
        let turn = Turn {
            role: Role::User,
            parts: vec![Part::Image { soft_tokens: 2 }, Part::Audio { soft_tokens: 1 }, Part::Text("Describe.".into())],
        };
        assert_eq!(
            render(Architecture::Gemma4, &[turn], false),
            "<bos><|turn>user\n<|image><|image|><|image|><image|><|audio><|audio|><audio|>Describe.<turn|>\n"
        );
    }

    #[test]
    fn gemma4_tool_round_trip() {
        let tools: Vec<crate::model::ToolDeclaration> = serde_json::from_value(serde_json::json!([{
            "name": "open_gate",
            "description": "Open the gate.",
            "parameters": { "seconds": { "type": "integer", "description": "How long." } }
        }]))
        .unwrap();
        let tools = ToolSet::new(tools).unwrap();
        let call = tools.parse_call("<|tool_call>call:open_gate{seconds:5}<tool_call|>").unwrap();
        let name = call.name.clone();
        let mut turns = vec![
            Turn { role: Role::System, parts: vec![Part::Text("You guard a gate.".into()), Part::Tools(tools)] },
            Turn::text(Role::User, "Let the van in."),
            Turn {
                role: Role::Model,
                parts: vec![
                    Part::ToolCall(call),
                    Part::ToolResponse { name, response: serde_json::json!({"open": true}) },
                ],
            },
        ];
        let declared = concat!(
            "<bos><|turn>system\nYou guard a gate.<|tool>declaration:open_gate{description:<|\"|>Open the gate.<|\"|>,",
            "parameters:{properties:{seconds:{description:<|\"|>How long.<|\"|>,type:<|\"|>INTEGER<|\"|>}},",
            "required:[<|\"|>seconds<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|><turn|>\n",
            "<|turn>user\nLet the van in.<turn|>\n",
            "<|turn>model\n<|tool_call>call:open_gate{seconds:5}<tool_call|>",
            "<|tool_response>response:open_gate{open:true}<tool_response|>",
        );
        assert_eq!(render(Architecture::Gemma4, &turns, true), declared, "the model goes on after the response");
        turns[2].parts.push(Part::Text("The gate is open.".into()));
        assert_eq!(
            render(Architecture::Gemma4, &turns, true),
            format!("{declared}The gate is open.<turn|>\n<|turn>model\n")
        );
    }

    #[test]
    fn gemma3_folds_the_system_turn_into_the_first_user_turn() {
        let turns =
            [Turn::text(Role::System, "Be brief."), Turn::text(Role::User, "Hi"), Turn::text(Role::Model, "Hello")];
        assert_eq!(
            render(Architecture::Gemma3, &turns, true),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
