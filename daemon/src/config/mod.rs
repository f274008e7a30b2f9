//! The one TOML file that configures a station.
//!
//! `load` parses and validates in one go, so nothing starts on a config that is wrong in any
//! place; every problem found is reported with the file, line and key (see [`ConfigError`]).
//! The field-by-field reference with defaults lives in `configs/reference.toml`.

mod load;
mod validate;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use load::{load, parse, ConfigError, Problem};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub station: StationConfig,
    pub mqtt: MqttConfig,
    /// No `[camera]` table: the station listens only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera: Option<CameraConfig>,
    /// No `[microphone]` table: the station watches only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microphone: Option<MicrophoneConfig>,
    pub gates: GatesConfig,
    /// No `[model]` table: the station publishes gate events only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// When and how the model looks (used with `[model]`).
    pub analysis: AnalysisConfig,
    /// Rules that make an alert of a scene report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertRule>,
    /// Tools the model may call when a report is severe enough.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<crate::model::ToolDeclaration>,
    pub queues: QueuesConfig,
    pub outbox: OutboxConfig,
    pub commands: CommandsConfig,
    pub stats: StatsConfig,
    pub home_assistant: HomeAssistantConfig,
    pub thumbnails: ThumbnailsConfig,
    pub log: LogConfig,
    /// Where relative paths in this config are resolved from: the config file's directory.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StationConfig {
    /// Names the station in every topic; letters, digits, `-` and `_`.
    pub id: String,
    /// First topic level(s); `outpost` gives `outpost/<id>/...`.
    pub topic_prefix: String,
}

impl Default for StationConfig {
    fn default() -> Self {
        Self { id: default_station_id(), topic_prefix: "outpost".into() }
    }
}

/// The machine's host name, cut down to the characters a topic level may hold here, so that two
/// stations on one broker do not collide when neither sets an id.
fn default_station_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String =
        host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if id.is_empty() {
        "outpost".into()
    } else {
        id
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Defaults to `outpostd-<station id>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub keep_alive_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// First wait after a lost connection; doubles on each failure up to `reconnect_max_secs`.
    pub reconnect_min_secs: f64,
    pub reconnect_max_secs: f64,
    /// Over MQTT 5, reports and alerts the broker could not deliver within this many seconds are
    /// dropped there (a dashboard that comes back days later needs no stale alarms); 0 = never.
    pub message_expiry_secs: u32,
    /// Connect with TLS (brokers usually listen for it on port 8883).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the authority (or authorities) that signed the broker's certificate,
    /// relative to the config file. The broker's certificate must name `mqtt.host`.
    pub ca_file: String,
    /// The station's own certificate (PEM), for a broker that requires client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// Its private key (PEM); give it with `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            keep_alive_secs: 30.0,
            username: None,
            password: None,
            reconnect_min_secs: 1.0,
            reconnect_max_secs: 30.0,
            message_expiry_secs: 86_400,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraSourceKind {
    /// A file of concatenated JPEG frames (what `ffmpeg -f mjpeg` and UVC cameras produce).
    Mjpeg,
    /// Raw packed YUYV 4:2:2 frames of `width` x `height`, back to back.
    Yuyv,
    /// A directory of PNG/JPEG images, replayed in file-name order.
    Images,
    /// A live V4L2 camera (a USB webcam): `device`, with `format`, `width`, `height` and `fps`
    /// negotiated to the nearest the camera offers.
    V4l2,
    /// MJPEG read from a command's standard output, e.g. `rpicam-vid --codec mjpeg -o -` for the
    /// Pi's CSI camera modules, which are reached through libcamera rather than V4L2.
    Pipe,
}

/// The pixel format asked of a V4L2 camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Compressed: what USB cameras send at high resolutions and rates.
    Mjpeg,
    /// Uncompressed 4:2:2: no decoding cost, but USB 2 bandwidth limits it to small sizes.
    Yuyv,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub source: CameraSourceKind,
    /// Replays: a file or directory, relative to the config file, or `builtin:<name>` for sample media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `v4l2`: the device node, best a stable `/dev/v4l/by-id/...` name (see `outpostd probe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `v4l2`: the pixel format to ask for; default `mjpeg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<PixelFormat>,
    /// `pipe`: the program and its arguments (no shell), writing MJPEG to standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Frames a second handed to the gates (a faster camera's extra frames are skipped).
    #[serde(default = "default_fps")]
    pub fps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Start again from the first frame at the end instead of stopping.
    #[serde(default, rename = "loop")]
    pub looping: bool,
}

fn default_fps() -> f64 {
    10.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MicrophoneSourceKind {
    /// A WAV file played back in real time (integer or float samples, any rate, mixed to mono).
    Wav,
    /// A live ALSA capture PCM, handed on as 16 kHz mono (converted when the device gives another rate or stereo).
    Alsa,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MicrophoneConfig {
    pub source: MicrophoneSourceKind,
    /// `wav`: the file, relative to the config file, or `builtin:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `alsa`: the capture PCM, e.g. `default` or `plughw:CARD=Device,DEV=0` (see `arecord -L`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Length of each chunk handed to the gates (one ALSA period).
    #[serde(default = "default_chunk_ms")]
    pub chunk_ms: u32,
    /// `alsa`: how much audio the device holds before an overrun loses some.
    #[serde(default = "default_buffer_ms")]
    pub buffer_ms: u32,
    #[serde(default, rename = "loop")]
    pub looping: bool,
}

fn default_chunk_ms() -> u32 {
    100
}

fn default_buffer_ms() -> u32 {
    500
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesConfig {
    pub motion: MotionGateConfig,
    pub sound: SoundGateConfig,
    pub speech: SpeechGateConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MotionGateConfig {
    pub enabled: bool,
    /// A pixel counts as changed when its brightness moved by more than this (0-255).
    pub pixel_threshold: u8,
    /// Motion is reported when at least this fraction of the frame changed (0-1).
    pub min_area_fraction: f64,
    /// Quiet time after an event before the next one.
    pub cooldown_secs: f64,
    /// Frames are shrunk to this width before comparing: less noise, less CPU.
    pub analysis_width: u32,
}

impl Default for MotionGateConfig {
    fn default() -> Self {
        Self { enabled: true, pixel_threshold: 25, min_area_fraction: 0.005, cooldown_secs: 5.0, analysis_width: 160 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoundGateConfig {
    pub enabled: bool,
    /// A chunk whose RMS level is at or above this fires the gate (dB relative to full scale).
    pub threshold_dbfs: f64,
    pub cooldown_secs: f64,
}

impl Default for SoundGateConfig {
    fn default() -> Self {
        Self { enabled: true, threshold_dbfs: -30.0, cooldown_secs: 2.0 }
    }
}

/// Speech: silero VAD marks whole utterances (see `gate/speech.rs`). The defaults are upstream's
/// `get_speech_timestamps` defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeechGateConfig {
    pub enabled: bool,
    /// The silero VAD model, `silero_vad_op18_ifless.onnx`, relative to the config file
    /// (`deploy/models/fetch_silero_vad.sh` fetches it). Required when enabled.
    pub model: String,
    /// A 32 ms window whose speech probability is at or above this is speech (0-1); inside an
    /// utterance, one below `threshold - 0.15` is silence.
    pub threshold: f64,
    /// Silence this long ends an utterance.
    pub min_silence_ms: u64,
    /// Utterances shorter than this are dropped.
    pub min_speech_ms: u64,
    /// Audio kept before and after each utterance.
    pub speech_pad_ms: u64,
    /// Longer speech is cut here, padding included, and goes on in the next event.
    pub max_speech_secs: f64,
}

impl Default for SpeechGateConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            model: String::new(),
            threshold: 0.5,
            min_silence_ms: 100,
            min_speech_ms: 250,
            speech_pad_ms: 30,
            max_speech_secs: 30.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model bundle's directory (see `deploy/models/README.md`).
    pub bundle: String,
    /// Threads for the model's matrix products; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    /// `resident` (kept in memory) or `on_demand` (loaded for each look that sees or hears,
    /// dropped after it): the image and audio encoders.
    #[serde(default)]
    pub encoders: crate::model::Encoders,
}

impl ModelConfig {
    /// Threads to run the model with: `threads`, or every core when it is 0.
    pub fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// Frames waiting for the motion gate; when full, the oldest is dropped and counted.
    pub frames: usize,
    /// Audio chunks waiting for the sound gate; when full, capture waits (audio is never dropped).
    pub audio_chunks: usize,
    /// Events waiting for the publisher.
    pub events: usize,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        Self { frames: 4, audio_chunks: 64, events: 256 }
    }
}

/// What makes the model look and listen, and what it is told about the station.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    /// Gate events that start a look: `motion`, `sound`, `speech`.
    pub triggers: Vec<crate::report::TriggerKind>,
    /// After a look started by one kind of trigger, that kind is ignored this long: one report
    /// per activity, not per frame.
    pub cooldown_secs: f64,
    /// Also look this often without a trigger; 0 = never.
    pub schedule_secs: f64,
    /// Where the station is, in words, for the model.
    pub place: String,
    /// What matters here, for the model.
    pub focus: String,
    /// The language reports are written in (BCP 47, e.g. `en`, `pt-BR`).
    pub language: String,
    /// A directory of short texts (`.txt`, `.md`: protocols, site notes) placed in the prompt,
    /// in name order, within `documents_max_tokens`; relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documents: Option<String>,
    pub documents_max_tokens: usize,
    /// Soft tokens a picture may use: 70, 140, 280, 560 or 1120.
    pub image_tokens: usize,
    /// The longest answer, in tokens.
    pub max_tokens: usize,
    /// Reports at least this severe (0-3) are followed by a tool call when `[[tools]]` are declared.
    pub tool_min_severity: u8,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        use crate::report::TriggerKind;
        Self {
            triggers: vec![TriggerKind::Motion, TriggerKind::Speech],
            cooldown_secs: 30.0,
            schedule_secs: 0.0,
            place: "an unattended outdoor station".into(),
            focus: "people, vehicles, and anything dangerous or unusual".into(),
            language: "en".into(),
            documents: None,
            documents_max_tokens: 512,
            image_tokens: 280,
            max_tokens: 512,
            tool_min_severity: 2,
        }
    }
}

/// One alert rule: every condition given must hold for a report to raise it. Raised once per
/// activity: not again until a report no longer matches, or `rearm_secs` passed without one
/// that does.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Names the alert in its payload: letters, digits, `-` and `_`.
    pub name: String,
    #[serde(default)]
    pub min_severity: u8,
    /// At least one of these labels (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels_any: Vec<String>,
    #[serde(default)]
    pub min_people: u8,
    #[serde(default)]
    pub min_vehicles: u8,
    #[serde(default)]
    pub min_hazards: u8,
    #[serde(default = "default_rearm_secs")]
    pub rearm_secs: f64,
    /// Only looks started by motion inside one of these parts of the frame (empty: anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<Zone>,
}

/// A part of the camera's frame, in fractions of its width and height from the top left corner.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub name: String,
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

impl Zone {
    /// Whether the box `(x, y, width, height)`, in the same fractions, overlaps this zone.
    pub fn overlaps(&self, x: f64, y: f64, width: f64, height: f64) -> bool {
        x < self.x + self.width && self.x < x + width && y < self.y + self.height && self.y < y + height
    }
}

fn default_rearm_secs() -> f64 {
    300.0
}

/// The on-disk store of what waits for the broker (see `outbox.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Relative to the config file. Default: `<state>/<station id>/outbox`, where `<state>` is
    /// systemd's `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/outpost`, else
    /// `~/.local/state/outpost`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Cap on the unacknowledged messages held, in MiB; past it, the oldest of the least
    /// important go first (gate events, then reports by severity, then alerts and tool calls).
    pub max_mb: f64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { dir: None, max_mb: 16.0 }
    }
}

/// Commands taken on `<root>/cmd/<name>` (see `command.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// The commands this station carries out; the others get an error reply. The broker's ACL
    /// decides who may send them at all.
    pub allowed: Vec<String>,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self { allowed: crate::command::NAMES.iter().map(|n| n.to_string()).collect() }
    }
}

/// Home Assistant's MQTT discovery (see `home_assistant.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    /// Off by default: nothing goes to Home Assistant's topics unless asked.
    pub enabled: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self { enabled: false, discovery_prefix: "homeassistant".into() }
    }
}

/// A small JPEG of the frame each report was made from, on `<root>/thumbnail`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThumbnailsConfig {
    /// Off by default: pictures of people leave the device only when asked.
    pub enabled: bool,
    /// Pixels wide (the height keeps the frame's proportions); a smaller frame is kept as it is.
    pub width: u32,
    /// JPEG quality, 1-100.
    pub quality: u8,
}

impl Default for ThumbnailsConfig {
    fn default() -> Self {
        Self { enabled: false, width: 320, quality: 70 }
    }
}

/// The station's figures on `<root>/stats`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// Seconds between two; 0 publishes none.
    pub interval_secs: f64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self { interval_secs: 60.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a filter such as `info,outpost=debug`.
    /// `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into() }
    }
}

impl Config {
    /// The client id sent to the broker.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("outpostd-{}", self.station.id))
    }

    /// `<prefix>/<station>`, the root of every topic this station publishes.
    pub fn topic_root(&self) -> String {
        format!("{}/{}", self.station.topic_prefix, self.station.id)
    }

    /// The effective config as TOML, with the password masked so it can be shown or logged.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("********".into());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The outbox directory: `[outbox] dir`, or the station's default under the state directory.
    pub fn outbox_dir(&self) -> PathBuf {
        if let Some(dir) = &self.outbox.dir {
            return self.resolve_path(dir);
        }
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        // systemd may list several state directories, separated by colons: the first is ours.
        let state = env("STATE_DIRECTORY")
            .and_then(|dirs| dirs.to_str().and_then(|d| d.split(':').next()).map(PathBuf::from))
            .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("outpost")))
            .or_else(|| env("HOME").map(|d| d.join(".local/state/outpost")))
            .unwrap_or_else(|| PathBuf::from("/var/lib/outpost"));
        state.join(&self.station.id).join("outbox")
    }

    /// The outbox's cap in bytes.
    pub fn outbox_max_bytes(&self) -> u64 {
        (self.outbox.max_mb * 1024.0 * 1024.0) as u64
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve_path(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }
}
