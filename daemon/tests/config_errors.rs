//! Broken config files, each with the exact message a person gets.

use std::path::Path;

use outpost::config;

/// A valid station that some broken cases add to.
const GOOD: &str = r#"
[station]
id = "north-gate"

[camera]
source = "mjpeg"
path = "builtin:people.mjpeg"
"#;

#[test]
fn good_config_is_accepted_with_defaults_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let config = config::parse(GOOD, Path::new("station.toml"), dir.path()).unwrap();
    assert_eq!(config.topic_root(), "outpost/north-gate");
    assert_eq!(config.client_id(), "outpostd-north-gate");
    assert_eq!(config.mqtt.port, 1883);
    assert_eq!(config.camera.unwrap().fps, 10.0);
    assert!(config.microphone.is_none());
}

#[test]
fn broken_files_name_file_line_key_and_problem() {
    let cases: &[(&str, &str)] = &[
        // Syntax.
        ("[station\nid = 1", "station.toml:1:9: unclosed table, expected `]`"),
        // Unknown keys, in any table.
        (
            "[station]\nid = \"a\"\ncolour = \"red\"\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:3:1: station.colour: unknown field `colour`, expected `id` or `topic_prefix`",
        ),
        (
            "[station]\nid = \"a\"\n[gates.motion]\nthreshold = 3\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:4:1: gates.motion.threshold: unknown field `threshold`, expected one of `enabled`, `pixel_threshold`, `min_area_fraction`, `cooldown_secs`, `analysis_width`",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"mjpeg\"",
            "station.toml:3:2: camera.path: is required for `source = \"mjpeg\"`: the file or directory to replay",
        ),
        // Wrong types.
        (
            "[station]\nid = \"a\"\n[mqtt]\nport = \"eighteen\"\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:4:8: mqtt.port: invalid type: string \"eighteen\", expected u16",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"h264\"\npath = \"x\"",
            "station.toml:4:10: camera.source: unknown variant `h264`, expected one of `mjpeg`, `yuyv`, `images`, `v4l2`, `pipe`",
        ),
        // Impossible values; every one is reported, not just the first.
        (
            &format!("{GOOD}\n[gates.motion]\ncooldown_secs = -5\nmin_area_fraction = 2.0\n[gates.sound]\nthreshold_dbfs = 6"),
            "station.toml:10:1: gates.motion.cooldown_secs: must be a number of seconds, 0 or more, got -5\n\
             station.toml:11:1: gates.motion.min_area_fraction: must be a fraction of the frame, more than 0 and at most 1, got 2\n\
             station.toml:13:1: gates.sound.threshold_dbfs: must be from -120 to 0 dBFS (0 is the loudest a sample can be), got 6",
        ),
        (
            "[station]\nid = \"a\"\ntopic_prefix = \"site/+/cams\"\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:3:1: station.topic_prefix: wildcards `+` and `#` cannot be published to, got \"site/+/cams\"",
        ),
        (
            "[station]\nid = \"north/gate\"\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:2:1: station.id: must be letters, digits, `-` or `_` (it becomes an MQTT topic level), got \"north/gate\"",
        ),
        (
            &format!("{GOOD}\n[mqtt]\npassword = \"hunter2\"\nreconnect_min_secs = 10\nreconnect_max_secs = 5"),
            "station.toml:10:1: mqtt.password: is set but mqtt.username is not: MQTT sends a password only with a user name\n\
             station.toml:12:1: mqtt.reconnect_max_secs: must not be less than mqtt.reconnect_min_secs (5 < 10)",
        ),
        // The speech gate: a model is required when enabled (the file is not opened here), and ranges.
        (
            &format!("{GOOD}\n[gates.speech]\nenabled = true\nthreshold = 1.5\nspeech_pad_ms = 2000\nmax_speech_secs = 0"),
            "station.toml:9:8: gates.speech.model: is required when the speech gate is enabled: the silero VAD model silero_vad_op18_ifless.onnx (deploy/models/fetch_silero_vad.sh fetches it)\n\
             station.toml:11:1: gates.speech.threshold: must be a speech probability, more than 0 and less than 1, got 1.5\n\
             station.toml:12:1: gates.speech.speech_pad_ms: must be from 0 to 1000 milliseconds, got 2000\n\
             station.toml:13:1: gates.speech.max_speech_secs: must be more than 2.032 s (two pads and a 32 ms window) and at most 600 s, got 0",
        ),
        // Media that is missing or not what it claims.
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"mjpeg\"\npath = \"clips/gate.mjpeg\"",
            "station.toml:5:1: camera.path: cannot read {dir}/clips/gate.mjpeg: No such file or directory (os error 2)",
        ),
        (
            "[station]\nid = \"a\"\n[microphone]\nsource = \"wav\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:5:1: microphone.path: builtin:people.mjpeg: not a readable WAV file: Ill-formed WAVE file: no RIFF tag found",
        ),
        // An ALSA microphone with the keys of a replay, and a replay with a device.
        (
            "[station]\nid = \"a\"\n[microphone]\nsource = \"alsa\"\npath = \"x.wav\"\nloop = true\nbuffer_ms = 100",
            "station.toml:3:2: microphone.device: is required for `source = \"alsa\"`: a capture PCM such as \"default\" or \"plughw:CARD=Device,DEV=0\" (`arecord -L` lists them)\n\
             station.toml:5:1: microphone.path: only applies to `source = \"wav\"`: ALSA capture reads `device`\n\
             station.toml:6:1: microphone.loop: only applies to `source = \"wav\"`: a live microphone does not end\n\
             station.toml:7:1: microphone.buffer_ms: must hold at least two chunks (200 ms) and at most 10000 ms, got 100",
        ),
        (
            "[station]\nid = \"a\"\n[microphone]\nsource = \"wav\"\ndevice = \"default\"",
            "station.toml:3:2: microphone.path: is required for `source = \"wav\"`: the recording to replay\n\
             station.toml:5:1: microphone.device: only applies to `source = \"alsa\"`: a WAV replay reads `path`",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"yuyv\"\npath = \"builtin:people.mjpeg\"",
            "station.toml:3:2: camera.width: is required for raw YUYV: the file does not say its frame size\n\
             station.toml:3:2: camera.height: is required for raw YUYV: the file does not say its frame size",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"mjpeg\"\npath = \"builtin:nope.mjpeg\"",
            "station.toml:5:1: camera.path: builtin:nope.mjpeg: no built-in media named `nope.mjpeg` (there are: builtin:people.mjpeg, builtin:speech.wav)",
        ),
        // A live camera with the keys of a replay, and a pipe without its command.
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"v4l2\"\npath = \"x.mjpeg\"\nloop = true\nwidth = 8\ncommand = [\"cat\"]",
            "station.toml:3:2: camera.device: is required for `source = \"v4l2\"`: a camera node such as \"/dev/v4l/by-id/usb-...-video-index0\" or \"/dev/video0\" (`outpostd probe` lists them)\n\
             station.toml:5:1: camera.path: only applies to replays (`mjpeg`, `yuyv`, `images`), not to `source = \"v4l2\"`\n\
             station.toml:6:1: camera.loop: only applies to replays (`mjpeg`, `yuyv`, `images`), not to `source = \"v4l2\"`\n\
             station.toml:7:1: camera.width: needs camera.height as well: give both, or neither for 640x480\n\
             station.toml:7:1: camera.width: must be from 16 to 7680 pixels, got 8\n\
             station.toml:8:1: camera.command: only applies to `source = \"pipe\"`, not to `source = \"v4l2\"`",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"pipe\"\ncommand = []\nformat = \"yuyv\"\nwidth = 640",
            "station.toml:5:1: camera.command: is empty: name the program to run\n\
             station.toml:6:1: camera.format: only applies to `source = \"v4l2\"`, not to `source = \"pipe\"`\n\
             station.toml:7:1: camera.width: only applies to `yuyv` and `v4l2` sources: JPEG and PNG frames carry their own size (a pipe's size is set in its command), not to `source = \"pipe\"`",
        ),
        (
            "[station]\nid = \"a\"\n[camera]\nsource = \"v4l2\"\ndevice = \"/dev/video0\"\nformat = \"h264\"",
            "station.toml:6:10: camera.format: unknown variant `h264`, expected `mjpeg` or `yuyv`",
        ),
        // Nothing to watch.
        (
            "[station]\nid = \"a\"",
            "station.toml: there is neither a [camera] nor a [microphone]: configure at least one, or the station has nothing to watch",
        ),
        // A model directory that is not a bundle, and too many threads.
        (
            &format!("{GOOD}\n[model]\nbundle = \"models/none\"\nthreads = 65"),
            "station.toml:10:1: model.bundle: {dir}/models/none: no manifest.json: not a model bundle (prepare the bundle again with deploy/models/ or copy it again)\n\
             station.toml:11:1: model.threads: must be from 0 (one per core) to 64, got 65",
        ),
        (
            &format!("{GOOD}\n[model]\nthreads = 2"),
            "station.toml:9:1: model: missing field `bundle`",
        ),
        (
            &format!("{GOOD}\n[model]\nbundle = \"../daemon/tests/fixtures/gemma4-tiny\"\nencoders = \"lazy\""),
            "station.toml:11:12: model.encoders: unknown variant `lazy`, expected `resident` or `on_demand`",
        ),
        (
            &format!("{GOOD}\n[log]\nlevel = \"loud\""),
            "station.toml:10:1: log.level: `loud` is not a log level or filter: `loud` is none of off, error, warn, info, debug, trace",
        ),
        // Issue 5's tables.
        (
            &format!("{GOOD}\n[commands]\nallowed = [\"pause\", \"selfdestruct\"]\n[outbox]\nmax_mb = 0"),
            "station.toml:10:21: commands.allowed[1]: `selfdestruct` is not a command; they are capture-now, ask, pause, resume, reload, forget-home-assistant\n\
             station.toml:12:1: outbox.max_mb: must be a size in MiB from 0.01 to 65536, got 0",
        ),
        (
            &format!("{GOOD}\n[[alerts]]\nname = \"at gate\"\n[[alerts.zones]]\nname = \"gate\"\nx = 0.5\ny = 0\nwidth = 0.8\nheight = 1"),
            "station.toml: model: `[[alerts]]` and `[[tools]]` act on the model's reports: a `[model]` is needed\n\
             station.toml:10:1: alerts[0].name: must be letters, digits, `-` or `_`, got \"at gate\"\n\
             station.toml:11:1: alerts[0].zones[0]: `gate` must lie within the frame: x, y, width, height are fractions of it (0-1), width and height above 0",
        ),
    ];
    let mut mismatches = Vec::new();
    for (text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let got = match config::parse(text, Path::new("station.toml"), dir.path()) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        let expected = expected.replace("{dir}", &dir.path().display().to_string());
        if got != expected {
            mismatches.push(format!("config:\n{text}\nexpected:\n{expected}\ngot:\n{got}\n"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn unreadable_file_is_named() {
    let err = config::load(Path::new("/nonexistent/outpost.toml")).unwrap_err().to_string();
    assert_eq!(err, "/nonexistent/outpost.toml: cannot read config file: No such file or directory (os error 2)");
}

#[test]
fn every_example_config_is_valid() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = config::load(&path) {
                panic!("{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "demo, disaster kit, sensor station and the reference: found {checked}");
}

#[test]
fn effective_config_masks_the_password() {
    let text = format!("{GOOD}\n[mqtt]\nusername = \"station\"\npassword = \"hunter2\"");
    let dir = tempfile::tempdir().unwrap();
    let shown = config::parse(&text, Path::new("station.toml"), dir.path()).unwrap().to_toml_redacted();
    assert!(shown.contains("username = \"station\""), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}
