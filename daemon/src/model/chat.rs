//! Prompt text for instruction-tuned Gemma models: system, user and model turns, with images and
//! audio as runs of soft-token placeholders that the runtime later fills with encoder outputs.
//! Thinking stays off (no `<|think|>` in the system turn): on a Pi every token counts.

use super::Architecture;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Model,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
    for turn in turns {
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
    fn gemma3_folds_the_system_turn_into_the_first_user_turn() {
        let turns =
            [Turn::text(Role::System, "Be brief."), Turn::text(Role::User, "Hi"), Turn::text(Role::Model, "Hello")];
        assert_eq!(
            render(Architecture::Gemma3, &turns, true),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
