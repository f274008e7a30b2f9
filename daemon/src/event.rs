//! What the daemon publishes when a gate fires: one flat JSON object per event, easy to read in
//! Node-RED or Grafana.

use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;

use crate::gate::{MotionEvent, SoundEvent, SpeechEvent};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Time-ordered (UUIDv7), unique across restarts: lets a consumer drop a redelivered copy.
    pub id: Uuid,
    pub station: String,
    /// When the frame or chunk that fired was captured, RFC 3339 UTC.
    pub timestamp: String,
    #[serde(flatten)]
    pub detail: EventDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventDetail {
    Motion(MotionEvent),
    Sound(SoundEvent),
    /// A whole utterance; its audio stays in the daemon (for the model), only the numbers go out.
    Speech(SpeechEvent),
}

impl Event {
    pub fn new(station: &str, detail: EventDetail) -> Self {
        let at = match &detail {
            EventDetail::Motion(motion) => motion.at,
            EventDetail::Sound(sound) => sound.at,
            EventDetail::Speech(speech) => speech.at,
        };
        Self { id: Uuid::now_v7(), station: station.to_owned(), timestamp: rfc3339(at), detail }
    }

    pub fn kind(&self) -> &'static str {
        match self.detail {
            EventDetail::Motion(_) => "motion",
            EventDetail::Sound(_) => "sound",
            EventDetail::Speech(_) => "speech",
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sound_event_is_flat_json_with_its_type() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let event = Event::new(
            "gate-7",
            EventDetail::Sound(SoundEvent { chunk_seq: 42, at, level_dbfs: -12.5, peak_dbfs: -3.0, duration_ms: 100 }),
        );
        let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(json["type"], "sound");
        assert_eq!(json["station"], "gate-7");
        assert_eq!(json["timestamp"], "2025-11-24T16:00:00.123Z");
        assert_eq!(json["level_dbfs"], -12.5);
        assert_eq!(json["chunk_seq"], 42);
        assert_eq!(json["id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn speech_event_leaves_its_audio_out() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let speech = SpeechEvent {
            chunk_seq: 7,
            at,
            duration_ms: 1500,
            mean_probability: 0.75,
            peak_probability: 1.0,
            truncated: false,
            audio: vec![1i16; 24_000].into(),
        };
        let event = Event::new("gate-7", EventDetail::Speech(speech));
        assert_eq!(event.kind(), "speech");
        let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(json["type"], "speech");
        assert_eq!(json["timestamp"], "2025-11-24T16:00:00.123Z");
        assert_eq!(json["duration_ms"], 1500);
        assert_eq!(json["mean_probability"], 0.75);
        assert_eq!(json["truncated"], false);
        assert!(json.get("audio").is_none(), "{json}");
        assert!(json.get("at").is_none(), "{json}");
    }
}
