//! The ALSA microphone source through real alsa-lib. This machine has no sound card, so the
//! capture PCMs are alsa-lib's `file` plugin reading a known recording (raw S16_LE mono 16 kHz)
//! over the `null` device: everything from `snd_pcm_open` to `readi` is the real code path.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use outpost::capture::{read_wav, AlsaCapture, AlsaSettings, AudioSource, DeviceState, StatusReporter};
use outpost::media::MediaRef;

const SETTINGS: AlsaSettings = AlsaSettings { chunk_ms: 100, buffer_ms: 500 };
const CHUNK: usize = 1600;

/// A directory with the recording and an ALSA config defining the test PCMs, loaded through
/// ALSA_CONFIG_PATH before the first PCM is opened (alsa-lib reads it then).
fn alsa_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = speech().iter().flat_map(|s| s.to_le_bytes()).collect();
        std::fs::write(dir.path().join("speech.raw"), raw).unwrap();
        // `hint` makes `outpostd probe` list the PCM, as alsa-lib lists a sound card's.
        let pcm = |name: &str, infile: &Path| {
            format!(
                "pcm.{name} {{\n type file\n slave.pcm \"null\"\n file \"/dev/null\"\n infile \"{}\"\n format \"raw\"\n hint {{ show on description \"Outpost test microphone\" }}\n}}\n",
                infile.display()
            )
        };
        let config = pcm("outpost_test_mic", &dir.path().join("speech.raw"))
            + &pcm("outpost_late_mic", &dir.path().join("late.raw"));
        std::fs::write(dir.path().join("test.conf"), config).unwrap();
        // The system configuration first: it defines the `null` slave.
        std::env::set_var(
            "ALSA_CONFIG_PATH",
            format!("/usr/share/alsa/alsa.conf:{}", dir.path().join("test.conf").display()),
        );
        dir
    })
    .path()
}

/// The recording as 16-bit samples: `media/speech.wav`, 16 kHz mono.
fn speech() -> Vec<i16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("media/speech.wav");
    let recording = read_wav(&MediaRef::Path(path)).unwrap();
    assert_eq!(recording.sample_rate, 16_000);
    recording.samples.iter().map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16).collect()
}

fn late_file() -> PathBuf {
    alsa_dir().join("late.raw")
}

#[test]
fn captured_samples_equal_the_recording() {
    alsa_dir();
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_test_mic", SETTINGS, status).unwrap();
    println!("{}", microphone.describe());
    let online = status_rx.borrow().clone().unwrap();
    assert_eq!(online.state, DeviceState::Online);
    assert_eq!(online.mode.as_deref(), Some("S16_LE, 1 channel(s) at 16000 Hz, handed on as mono 16000 Hz"));
    let expected = speech();
    let mut captured = Vec::new();
    // What the file plugin gives past the end of its file is undefined: stop a chunk short.
    while captured.len() + CHUNK <= expected.len() {
        let chunk = microphone.next_chunk().unwrap().unwrap();
        assert_eq!(chunk.sample_rate, 16_000);
        assert_eq!(chunk.seq as usize, captured.len() / CHUNK);
        assert_eq!(chunk.samples.len(), CHUNK);
        captured.extend_from_slice(&chunk.samples);
    }
    assert_eq!(captured[..], expected[..captured.len()]);
    println!("{} samples captured, equal to the recording", captured.len());
    assert_eq!(microphone.overruns(), 0);
}

#[test]
fn a_microphone_that_appears_later_is_picked_up() {
    alsa_dir();
    // The PCM's input file does not exist yet, so the device cannot be opened: the source starts
    // anyway and keeps trying.
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_late_mic", SETTINGS, status).unwrap();
    let missing = status_rx.borrow().clone().unwrap();
    assert_eq!(missing.state, DeviceState::Offline);
    assert_eq!(missing.source, "outpost_late_mic");
    assert!(missing.error.as_deref().unwrap().contains("cannot open it for capture"), "{missing:?}");
    let plug_in = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(300));
        let raw: Vec<u8> = speech()[..4 * CHUNK].iter().flat_map(|s| s.to_le_bytes()).collect();
        std::fs::write(late_file(), raw).unwrap();
    });
    let chunk = microphone.next_chunk().unwrap().unwrap();
    plug_in.join().unwrap();
    assert_eq!(chunk.samples[..], speech()[..CHUNK]);
    assert_eq!(microphone.reopens(), 1);
    assert_eq!(status_rx.borrow().as_ref().unwrap().state, DeviceState::Online);
}

#[test]
fn an_unknown_pcm_is_retried_not_fatal() {
    alsa_dir();
    // A name alsa-lib does not know gives no error at start: a USB microphone may be plugged in
    // after the daemon starts. The source says what it will read from.
    let microphone = AlsaCapture::open("outpost_no_such_pcm", SETTINGS, StatusReporter::new().0).unwrap();
    assert!(microphone.describe().contains("outpost_no_such_pcm"));
    assert_eq!(microphone.reopens(), 0);
}

/// The daemon itself with `[microphone] source = "alsa"`: speech captured through alsa-lib
/// reaches the sound gate and comes out as events on a real broker.
#[test]
fn the_daemon_publishes_sound_events_from_an_alsa_microphone() {
    let alsa_config = format!("/usr/share/alsa/alsa.conf:{}", alsa_dir().join("test.conf").display());
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let microphone = "[microphone]\nsource = \"alsa\"\ndevice = \"outpost_test_mic\"\nchunk_ms = 100\n";
    let config = common::write_config(dir.path(), "mic", broker.port, microphone);
    let daemon = common::Daemon::start_with_env(
        &["run", "--config", config.to_str().unwrap()],
        &[("ALSA_CONFIG_PATH", alsa_config.as_str())],
    );
    let wait = Duration::from_secs(20);
    let event = subscriber.wait_for("a sound event", wait, |m| m.topic == "outpost/mic/events");
    let event = event.json();
    assert_eq!(event["type"], "sound");
    // speech.wav is spoken at -26 to -19 dBFS (see the demo): far above silence.
    let level = event["level_dbfs"].as_f64().unwrap();
    assert!((-40.0..0.0).contains(&level), "{level}");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_for_payload("outpost/mic/status", "stopped", wait);
    let log = daemon.stderr();
    assert!(log.contains("ALSA capture from outpost_test_mic"), "{log}");
}

#[test]
fn probe_lists_the_capture_pcms() {
    let alsa_config = format!("/usr/share/alsa/alsa.conf:{}", alsa_dir().join("test.conf").display());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outpostd"))
        .arg("probe")
        .env("ALSA_CONFIG_PATH", &alsa_config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    println!("{shown}");
    assert!(shown.contains("  outpost_test_mic  (Outpost test microphone)\n"), "{shown}");
    // Without a camera probe says so, and what to check; with one, it names its node.
    match outpost::probe::camera_nodes(Path::new("/dev")).first() {
        None => assert!(shown.contains("device = NODE):\n  none: no /dev/video*"), "{shown}"),
        Some(node) => assert!(shown.contains(&format!("  {}", node.display())), "{shown}"),
    }
}
