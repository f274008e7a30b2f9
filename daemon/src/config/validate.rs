//! Checks of values that parse but cannot work. Every check runs, so one pass reports everything.

use super::{CameraConfig, CameraSourceKind, Config, MicrophoneSourceKind};
use crate::capture;
use crate::tls::TlsError;

/// `(dotted key, what is wrong)` for every problem found.
pub(super) fn validate(config: &Config) -> Vec<(String, String)> {
    let mut problems = Problems::default();
    station(config, &mut problems);
    mqtt(config, &mut problems);
    sources(config, &mut problems);
    gates(config, &mut problems);
    model(config, &mut problems);
    queues(config, &mut problems);
    for (n, name) in config.commands.allowed.iter().enumerate() {
        if !crate::command::NAMES.contains(&name.as_str()) {
            let names = crate::command::NAMES.join(", ");
            problems.add(&format!("commands.allowed[{n}]"), format!("`{name}` is not a command; they are {names}"));
        }
    }
    problems.seconds("stats.interval_secs", config.stats.interval_secs, false);
    let thumbnails = &config.thumbnails;
    if !(16..=1920).contains(&thumbnails.width) {
        problems.add("thumbnails.width", format!("must be from 16 to 1920 pixels, got {}", thumbnails.width));
    }
    if !(1..=100).contains(&thumbnails.quality) {
        problems.add("thumbnails.quality", format!("must be from 1 to 100, got {}", thumbnails.quality));
    }
    if thumbnails.enabled && config.model.is_none() {
        problems.add("thumbnails.enabled", "thumbnails are of the frames reports are made from: a `[model]` is needed");
    }
    if let Err(why) = check_topic_prefix(&config.home_assistant.discovery_prefix) {
        problems.add(
            "home_assistant.discovery_prefix",
            format!("{why}, got \"{}\"", config.home_assistant.discovery_prefix),
        );
    }
    analysis(config, &mut problems);
    let max_mb = config.outbox.max_mb;
    if !max_mb.is_finite() || !(0.01..=65536.0).contains(&max_mb) {
        problems.add("outbox.max_mb", format!("must be a size in MiB from 0.01 to 65536, got {max_mb}"));
    }
    if let Err(why) = check_log_level(&config.log.level) {
        problems.add("log.level", format!("`{}` is not a log level or filter: {why}", config.log.level));
    }
    problems.0
}

#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_owned(), message.into()));
    }

    /// A duration in seconds: finite, and not negative (or, with `positive`, above zero).
    fn seconds(&mut self, key: &str, value: f64, positive: bool) {
        if !value.is_finite() || value < 0.0 || (positive && value == 0.0) {
            let wanted = if positive { "more than 0" } else { "0 or more" };
            self.add(key, format!("must be a number of seconds, {wanted}, got {value}"));
        }
    }
}

fn station(config: &Config, problems: &mut Problems) {
    let id = &config.station.id;
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        problems.add(
            "station.id",
            format!("must be letters, digits, `-` or `_` (it becomes an MQTT topic level), got \"{id}\""),
        );
    }
    if let Err(why) = check_topic_prefix(&config.station.topic_prefix) {
        problems.add("station.topic_prefix", format!("{why}, got \"{}\"", config.station.topic_prefix));
    }
}

/// A prefix is published to, so it must be a plain topic name.
fn check_topic_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("must not be empty");
    }
    if prefix.contains(['+', '#']) {
        return Err("wildcards `+` and `#` cannot be published to");
    }
    if prefix.starts_with('$') {
        return Err("topics starting with `$` are reserved for the broker");
    }
    if prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        return Err("must not start or end with `/` or have empty levels");
    }
    if prefix.contains('\0') {
        return Err("must not contain a NUL character");
    }
    Ok(())
}

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// A level, or comma-separated `level` and `target=level` directives. tracing alone would take
/// a misspelt level as the name of a target and log nothing.
fn check_log_level(filter: &str) -> Result<(), String> {
    for directive in filter.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level).trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("`{level}` is none of {}", LEVELS.join(", ")));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map(drop).map_err(|e| e.to_string())
}

fn mqtt(config: &Config, problems: &mut Problems) {
    let mqtt = &config.mqtt;
    if mqtt.host.trim().is_empty() {
        problems.add("mqtt.host", "must name the broker's host or address");
    }
    if mqtt.port == 0 {
        problems.add("mqtt.port", "must be a port number from 1 to 65535");
    }
    if !(1.0..=65535.0).contains(&mqtt.keep_alive_secs) {
        problems.add("mqtt.keep_alive_secs", format!("must be from 1 to 65535 seconds, got {}", mqtt.keep_alive_secs));
    }
    if mqtt.client_id.as_deref().is_some_and(|id| id.trim().is_empty()) {
        problems.add("mqtt.client_id", "must not be empty (leave it out for `outpostd-<station id>`)");
    }
    if mqtt.password.is_some() && mqtt.username.is_none() {
        problems.add("mqtt.password", "is set but mqtt.username is not: MQTT sends a password only with a user name");
    }
    if let Some(tls) = &mqtt.tls {
        if let Err(e) = crate::tls::client_config(tls, &config.base_dir) {
            let key = match &e {
                TlsError::ReadKey { .. } => "mqtt.tls.key_file",
                TlsError::CertificateWithoutKey | TlsError::ClientCertificate(_) => "mqtt.tls.cert_file",
                TlsError::ReadCertificates { path, .. } | TlsError::NoCertificate { path }
                    if tls.cert_file.as_ref().is_some_and(|cert| config.base_dir.join(cert) == *path) =>
                {
                    "mqtt.tls.cert_file"
                }
                _ => "mqtt.tls.ca_file",
            };
            problems.add(key, e.to_string());
        }
    }
    problems.seconds("mqtt.reconnect_min_secs", mqtt.reconnect_min_secs, true);
    problems.seconds("mqtt.reconnect_max_secs", mqtt.reconnect_max_secs, true);
    if mqtt.reconnect_max_secs < mqtt.reconnect_min_secs {
        problems.add(
            "mqtt.reconnect_max_secs",
            format!(
                "must not be less than mqtt.reconnect_min_secs ({} < {})",
                mqtt.reconnect_max_secs, mqtt.reconnect_min_secs
            ),
        );
    }
}

fn sources(config: &Config, problems: &mut Problems) {
    if config.camera.is_none() && config.microphone.is_none() {
        problems.add("", "there is neither a [camera] nor a [microphone]: configure at least one, or the station has nothing to watch");
    }
    if let Some(camera) = &config.camera {
        camera_source(camera, config, problems);
    }
    if let Some(microphone) = &config.microphone {
        let chunk_ok = (10..=100).contains(&microphone.chunk_ms);
        if !chunk_ok {
            problems.add(
                "microphone.chunk_ms",
                format!("must be from 10 to 100 milliseconds, got {}", microphone.chunk_ms),
            );
        }
        match microphone.source {
            MicrophoneSourceKind::Wav => {
                if microphone.device.is_some() {
                    problems.add("microphone.device", "only applies to `source = \"alsa\"`: a WAV replay reads `path`");
                }
                if microphone.path.is_none() {
                    problems.add("microphone.path", "is required for `source = \"wav\"`: the recording to replay");
                } else if chunk_ok {
                    // Opening a replay source reads and checks its recording.
                    if let Err(e) = capture::open_microphone(
                        microphone,
                        &config.base_dir,
                        &capture::StatusReporter::new().0,
                        &capture::StopFlag::default(),
                    ) {
                        problems.add("microphone.path", e.to_string());
                    }
                }
            }
            // A live device is not opened here: it may be busy with the running daemon during a
            // reload, or plugged in later; capture retries until it answers.
            MicrophoneSourceKind::Alsa => {
                if microphone.path.is_some() {
                    problems.add("microphone.path", "only applies to `source = \"wav\"`: ALSA capture reads `device`");
                }
                if microphone.looping {
                    problems
                        .add("microphone.loop", "only applies to `source = \"wav\"`: a live microphone does not end");
                }
                match &microphone.device {
                    None => problems.add(
                        "microphone.device",
                        "is required for `source = \"alsa\"`: a capture PCM such as \"default\" or \"plughw:CARD=Device,DEV=0\" (`arecord -L` lists them)",
                    ),
                    Some(device) if device.trim().is_empty() => problems.add("microphone.device", "is empty"),
                    Some(_) => {}
                }
                if !(2 * microphone.chunk_ms..=10_000).contains(&microphone.buffer_ms) {
                    problems.add(
                        "microphone.buffer_ms",
                        format!(
                            "must hold at least two chunks ({} ms) and at most 10000 ms, got {}",
                            2 * microphone.chunk_ms,
                            microphone.buffer_ms
                        ),
                    );
                }
            }
        }
    }
}

fn camera_source(camera: &CameraConfig, config: &Config, problems: &mut Problems) {
    let mut probe = camera.clone();
    if !(camera.fps.is_finite() && camera.fps > 0.0 && camera.fps <= 120.0) {
        problems.add("camera.fps", format!("must be more than 0 and at most 120 frames a second, got {}", camera.fps));
        // Still check the media, at a rate that works, so that its problems show too.
        probe.fps = 1.0;
    }
    let kind = match camera.source {
        CameraSourceKind::Mjpeg => "mjpeg",
        CameraSourceKind::Yuyv => "yuyv",
        CameraSourceKind::Images => "images",
        CameraSourceKind::V4l2 => "v4l2",
        CameraSourceKind::Pipe => "pipe",
    };
    let replay = matches!(camera.source, CameraSourceKind::Mjpeg | CameraSourceKind::Yuyv | CameraSourceKind::Images);
    // Keys that belong to other kinds of source: said plainly rather than silently ignored.
    let mut only_for = |key: &str, set: bool, applies: bool, owner: &str| {
        if set && !applies {
            problems.add(&format!("camera.{key}"), format!("only applies to {owner}, not to `source = \"{kind}\"`"));
        }
    };
    only_for("path", camera.path.is_some(), replay, "replays (`mjpeg`, `yuyv`, `images`)");
    only_for("loop", camera.looping, replay, "replays (`mjpeg`, `yuyv`, `images`)");
    only_for("device", camera.device.is_some(), camera.source == CameraSourceKind::V4l2, "`source = \"v4l2\"`");
    only_for("format", camera.format.is_some(), camera.source == CameraSourceKind::V4l2, "`source = \"v4l2\"`");
    only_for("command", camera.command.is_some(), camera.source == CameraSourceKind::Pipe, "`source = \"pipe\"`");
    let sized = matches!(camera.source, CameraSourceKind::Yuyv | CameraSourceKind::V4l2);
    let why_unsized = "JPEG and PNG frames carry their own size (a pipe's size is set in its command)";
    only_for("width", camera.width.is_some(), sized, &format!("`yuyv` and `v4l2` sources: {why_unsized}"));
    only_for("height", camera.height.is_some(), sized, &format!("`yuyv` and `v4l2` sources: {why_unsized}"));

    match camera.source {
        CameraSourceKind::Mjpeg | CameraSourceKind::Yuyv | CameraSourceKind::Images => {
            let mut ready = true;
            if camera.path.is_none() {
                problems.add("camera.path", format!("is required for `source = \"{kind}\"`: the file or directory to replay"));
                ready = false;
            }
            if camera.source == CameraSourceKind::Yuyv {
                for (key, value) in [("camera.width", camera.width), ("camera.height", camera.height)] {
                    if value.is_none() {
                        problems.add(key, "is required for raw YUYV: the file does not say its frame size");
                        ready = false;
                    }
                }
            }
            // Opening a replay source reads and checks its media: what is wrong is reported now.
            if ready {
                if let Err(e) = capture::open_camera(&probe, &config.base_dir, &capture::StatusReporter::new().0, &capture::StopFlag::default()) {
                    problems.add("camera.path", e.to_string());
                }
            }
        }
        // A live camera is not opened here: it may be busy with the running daemon during a
        // reload, or plugged in later; capture retries until it answers.
        CameraSourceKind::V4l2 => {
            match camera.device.as_deref() {
                None => problems.add(
                    "camera.device",
                    "is required for `source = \"v4l2\"`: a camera node such as \"/dev/v4l/by-id/usb-...-video-index0\" or \"/dev/video0\" (`outpostd probe` lists them)",
                ),
                Some(device) if device.trim().is_empty() => problems.add("camera.device", "is empty"),
                Some(_) => {}
            }
            if camera.width.is_some() != camera.height.is_some() {
                let (set, unset) = if camera.width.is_some() { ("width", "height") } else { ("height", "width") };
                problems.add(&format!("camera.{set}"), format!("needs camera.{unset} as well: give both, or neither for 640x480"));
            }
            for (key, value, most) in [("camera.width", camera.width, 7680), ("camera.height", camera.height, 4320)] {
                if let Some(value) = value.filter(|v| !(16..=most).contains(v)) {
                    problems.add(key, format!("must be from 16 to {most} pixels, got {value}"));
                }
            }
        }
        CameraSourceKind::Pipe => match camera.command.as_deref() {
            None => problems.add(
                "camera.command",
                "is required for `source = \"pipe\"`: the program and its arguments, e.g. [\"rpicam-vid\", \"--codec\", \"mjpeg\", \"-t\", \"0\", \"-o\", \"-\"]",
            ),
            Some([]) => problems.add("camera.command", "is empty: name the program to run"),
            Some([program, ..]) if program.trim().is_empty() => {
                problems.add("camera.command", "the program (the first item) is empty")
            }
            Some(_) => {}
        },
    }
}

fn gates(config: &Config, problems: &mut Problems) {
    let motion = &config.gates.motion;
    if !(motion.min_area_fraction > 0.0 && motion.min_area_fraction <= 1.0) {
        problems.add(
            "gates.motion.min_area_fraction",
            format!("must be a fraction of the frame, more than 0 and at most 1, got {}", motion.min_area_fraction),
        );
    }
    problems.seconds("gates.motion.cooldown_secs", motion.cooldown_secs, false);
    if !(16..=1920).contains(&motion.analysis_width) {
        problems.add(
            "gates.motion.analysis_width",
            format!("must be from 16 to 1920 pixels, got {}", motion.analysis_width),
        );
    }
    let sound = &config.gates.sound;
    if !(sound.threshold_dbfs.is_finite() && (-120.0..=0.0).contains(&sound.threshold_dbfs)) {
        problems.add(
            "gates.sound.threshold_dbfs",
            format!("must be from -120 to 0 dBFS (0 is the loudest a sample can be), got {}", sound.threshold_dbfs),
        );
    }
    problems.seconds("gates.sound.cooldown_secs", sound.cooldown_secs, false);
    speech_gate(config, problems);
}

/// Longest utterance the speech gate holds (10 minutes of 16 kHz audio is 19 MB).
const MAX_SPEECH_SECS: f64 = 600.0;

fn speech_gate(config: &Config, problems: &mut Problems) {
    let speech = &config.gates.speech;
    if speech.enabled && speech.model.trim().is_empty() {
        problems.add(
            "gates.speech.model",
            "is required when the speech gate is enabled: the silero VAD model silero_vad_op18_ifless.onnx (deploy/models/fetch_silero_vad.sh fetches it)",
        );
    } else if speech.enabled {
        // Loading the model (2 MB, a tenth of a second) is how to know that it is one.
        if let Err(e) = crate::gate::SileroVad::load(&config.base_dir.join(&speech.model)) {
            problems.add("gates.speech.model", e.to_string());
        }
    }
    if !(speech.threshold > 0.0 && speech.threshold < 1.0) {
        problems.add(
            "gates.speech.threshold",
            format!("must be a speech probability, more than 0 and less than 1, got {}", speech.threshold),
        );
    }
    for (key, value, max) in [
        ("gates.speech.min_silence_ms", speech.min_silence_ms, 10_000),
        ("gates.speech.min_speech_ms", speech.min_speech_ms, 60_000),
        ("gates.speech.speech_pad_ms", speech.speech_pad_ms, 1_000),
    ] {
        if value > max {
            problems.add(key, format!("must be from 0 to {max} milliseconds, got {value}"));
        }
    }
    let max_secs = speech.max_speech_secs;
    // The cap must leave room for the padding on both sides and one 32 ms window.
    let least = (2 * speech.speech_pad_ms.min(1_000) + 32) as f64 / 1000.0;
    if !(max_secs.is_finite() && max_secs > least && max_secs <= MAX_SPEECH_SECS) {
        problems.add(
            "gates.speech.max_speech_secs",
            format!(
                "must be more than {least} s (two pads and a 32 ms window) and at most {MAX_SPEECH_SECS} s, got {max_secs}"
            ),
        );
    }
}

/// Most threads a model run may ask for: far more than a single-board computer has cores.
const MAX_MODEL_THREADS: usize = 64;

fn model(config: &Config, problems: &mut Problems) {
    let Some(model) = &config.model else { return };
    if model.bundle.trim().is_empty() {
        problems.add("model.bundle", "must name the model bundle's directory");
    } else if let Err(e) = crate::model::Manifest::read(&config.resolve_path(&model.bundle)) {
        // Only the manifest here: checking every file's sha256 reads gigabytes, which loading does.
        problems.add("model.bundle", e.to_string());
    }
    if model.threads > MAX_MODEL_THREADS {
        problems.add(
            "model.threads",
            format!("must be from 0 (one per core) to {MAX_MODEL_THREADS}, got {}", model.threads),
        );
    }
}

fn analysis(config: &Config, problems: &mut Problems) {
    let analysis = &config.analysis;
    problems.seconds("analysis.cooldown_secs", analysis.cooldown_secs, false);
    problems.seconds("analysis.schedule_secs", analysis.schedule_secs, false);
    if !crate::model::SOFT_TOKEN_BUDGETS.contains(&analysis.image_tokens) {
        problems.add(
            "analysis.image_tokens",
            format!("must be one of {:?}, got {}", crate::model::SOFT_TOKEN_BUDGETS, analysis.image_tokens),
        );
    }
    if !(16..=2048).contains(&analysis.max_tokens) {
        problems.add("analysis.max_tokens", format!("must be from 16 to 2048, got {}", analysis.max_tokens));
    }
    if analysis.tool_min_severity > 3 {
        problems.add(
            "analysis.tool_min_severity",
            format!("severity runs from 0 to 3, got {}", analysis.tool_min_severity),
        );
    }
    if let Some(dir) = &analysis.documents {
        if !config.resolve_path(dir).is_dir() {
            problems.add("analysis.documents", format!("{} is not a directory", config.resolve_path(dir).display()));
        }
    }
    for (n, rule) in config.alerts.iter().enumerate() {
        let key = |field: &str| format!("alerts[{n}].{field}");
        if rule.name.is_empty() || !rule.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            problems.add(&key("name"), format!("must be letters, digits, `-` or `_`, got \"{}\"", rule.name));
        }
        if config.alerts[..n].iter().any(|other| other.name == rule.name) {
            problems.add(&key("name"), format!("`{}` names two rules", rule.name));
        }
        if rule.min_severity > 3 {
            problems.add(&key("min_severity"), format!("severity runs from 0 to 3, got {}", rule.min_severity));
        }
        problems.seconds(&key("rearm_secs"), rule.rearm_secs, false);
        for (z, zone) in rule.zones.iter().enumerate() {
            let inside = |v: f64| (0.0..=1.0).contains(&v);
            if ![zone.x, zone.y, zone.width, zone.height].into_iter().all(inside)
                || zone.width == 0.0
                || zone.height == 0.0
                || zone.x + zone.width > 1.0
                || zone.y + zone.height > 1.0
            {
                problems.add(
                    &key(&format!("zones[{z}]")),
                    format!(
                        "`{}` must lie within the frame: x, y, width, height are fractions of it (0-1), width and height above 0",
                        zone.name
                    ),
                );
            }
        }
    }
    if !config.tools.is_empty() {
        if let Err(e) = crate::model::ToolSet::new(config.tools.clone()) {
            problems.add("tools", e.to_string());
        }
    }
    if (!config.alerts.is_empty() || !config.tools.is_empty()) && config.model.is_none() {
        problems.add("model", "`[[alerts]]` and `[[tools]]` act on the model's reports: a `[model]` is needed");
    }
}

fn queues(config: &Config, problems: &mut Problems) {
    let queues = &config.queues;
    for (key, value) in [
        ("queues.frames", queues.frames),
        ("queues.audio_chunks", queues.audio_chunks),
        ("queues.events", queues.events),
    ] {
        if !(1..=10_000).contains(&value) {
            problems.add(key, format!("must hold from 1 to 10000 items, got {value}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{check_log_level, check_topic_prefix};

    #[test]
    fn topic_prefixes() {
        assert!(check_topic_prefix("outpost").is_ok());
        assert!(check_topic_prefix("site/north").is_ok());
        for bad in ["", "a/+", "#", "$SYS", "/a", "a/", "a//b", "a\0b"] {
            assert!(check_topic_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_levels() {
        assert!(check_log_level("info").is_ok());
        assert!(check_log_level("warn,outpost::publish=debug").is_ok());
        assert_eq!(
            check_log_level("verbose").unwrap_err(),
            "`verbose` is none of off, error, warn, info, debug, trace"
        );
        assert!(check_log_level("info,outpost=loud").is_err());
    }
}
