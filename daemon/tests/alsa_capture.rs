//! The ALSA microphone source through real alsa-lib. This machine has no sound card, so the
//! capture PCMs are alsa-lib's `file` plugin reading a known recording (raw S16_LE mono 16 kHz)
//! over the `null` device (fast: not paced), and `alsa-emulator/`, an ioplug plugin of ours that
//! delivers a file in real time like a device, offers only its own rate and channel count, and
//! can overrun and vanish. Everything from `snd_pcm_open` to `readi` is the real code path.

mod common;
#[path = "common/prepared.rs"]
mod prepared;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use outpost::capture::{read_wav, AlsaCapture, AlsaSettings, AudioSource, DeviceState, StatusReporter, StopFlag};
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
        // Paced, emulated devices: 16 kHz mono speech, a 48 kHz stereo tone, and two that can be
        // unplugged (they exist while their `present` file does).
        std::fs::write(dir.path().join("tone48k.raw"), tone_48k_stereo()).unwrap();
        // Each emulated PCM can be unplugged (`present`: it exists while that file does) and
        // stalled (`stall`: while that file exists it sends nothing).
        let emulated = |name: &str, infile: &str, rate: u32, channels: u32| {
            let present = dir.path().join(format!("{name}.present"));
            std::fs::write(&present, "").unwrap();
            format!(
                "pcm.{name} {{\n  type outpost_emu\n  infile \"{}\"\n  rate {rate}\n  channels {channels}\n  present \"{}\"\n  stall \"{}\"\n}}\n",
                dir.path().join(infile).display(),
                present.display(),
                dir.path().join(format!("{name}.stall")).display()
            )
        };
        let plugin = common::workspace_library("liboutpost_alsa_emulator.so", "outpost-alsa-emulator");
        let config = pcm("outpost_test_mic", &dir.path().join("speech.raw"))
            + &pcm("outpost_late_mic", &dir.path().join("late.raw"))
            + &format!("pcm_type.outpost_emu {{ lib \"{}\" }}\n", plugin.display())
            + &emulated("outpost_paced_mic", "speech.raw", 16_000, 1)
            + &emulated("outpost_usb_mic", "tone48k.raw", 48_000, 2)
            + &emulated("outpost_vanishing_mic", "speech.raw", 16_000, 1)
            + &emulated("outpost_stalling_mic", "speech.raw", 16_000, 1)
            + &emulated("outpost_daemon_mic", "speech.raw", 16_000, 1);
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

/// One second of a 440 Hz tone at -10 dBFS RMS in both channels, 48 kHz, as raw S16_LE.
fn tone_48k_stereo() -> Vec<u8> {
    let amplitude = 32768.0 * 10f64.powf(-10.0 / 20.0) * std::f64::consts::SQRT_2;
    (0..48_000)
        .flat_map(|i| {
            let s = (amplitude * (2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 48_000.0).sin()) as i16;
            [s, s]
        })
        .flat_map(i16::to_le_bytes)
        .collect()
}

fn late_file() -> PathBuf {
    alsa_dir().join("late.raw")
}

#[test]
fn captured_samples_equal_the_recording() {
    alsa_dir();
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_test_mic", SETTINGS, status, StopFlag::default()).unwrap();
    println!("{}", microphone.describe());
    assert!(status_rx.borrow().is_none(), "online only once audio has come");
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
    let online = status_rx.borrow().clone().unwrap();
    assert_eq!(online.state, DeviceState::Online);
    assert_eq!(online.mode.as_deref(), Some("S16_LE, 1 channel(s) at 16000 Hz, handed on as mono 16000 Hz"));
    println!("{} samples captured, equal to the recording", captured.len());
    assert_eq!(microphone.overruns(), 0);
}

#[test]
fn a_microphone_that_appears_later_is_picked_up() {
    alsa_dir();
    // The PCM's input file does not exist yet, so the device cannot be opened: the source starts
    // anyway and keeps trying.
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_late_mic", SETTINGS, status, StopFlag::default()).unwrap();
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
    assert_eq!(microphone.reopens(), 0, "a first open that came late is not a reopen");
    assert_eq!(status_rx.borrow().as_ref().unwrap().state, DeviceState::Online);
}

#[test]
fn an_unknown_pcm_is_retried_not_fatal() {
    alsa_dir();
    // A name alsa-lib does not know gives no error at start: a USB microphone may be plugged in
    // after the daemon starts. The source says what it will read from.
    let microphone =
        AlsaCapture::open("outpost_no_such_pcm", SETTINGS, StatusReporter::new().0, StopFlag::default()).unwrap();
    assert!(microphone.describe().contains("outpost_no_such_pcm"));
    assert_eq!(microphone.reopens(), 0);
}

#[test]
fn a_device_at_48_khz_stereo_is_converted_to_16_khz_mono() {
    alsa_dir();
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_usb_mic", SETTINGS, status, StopFlag::default()).unwrap();
    let mut samples = Vec::new();
    for _ in 0..8 {
        let chunk = microphone.next_chunk().unwrap().unwrap();
        assert_eq!((chunk.sample_rate, chunk.samples.len()), (16_000, CHUNK));
        samples.extend_from_slice(&chunk.samples);
    }
    let mode = status_rx.borrow().as_ref().unwrap().mode.clone().unwrap();
    assert_eq!(mode, "S16_LE, 2 channel(s) at 48000 Hz, handed on as mono 16000 Hz");
    // Past the resampler's start-up: the same tone, at the same level.
    let steady = &samples[4000..];
    let level = outpost::gate::level_dbfs(steady);
    assert!((level + 10.0).abs() < 0.2, "{level} dBFS, not -10");
    let crossings = steady.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count() as f64;
    let frequency = crossings / (steady.len() as f64 / 16_000.0);
    assert!((frequency - 440.0).abs() < 5.0, "{frequency} Hz, not 440");
}

#[test]
fn an_overrun_is_counted_and_capture_goes_on() {
    alsa_dir();
    let mut microphone =
        AlsaCapture::open("outpost_paced_mic", SETTINGS, StatusReporter::new().0, StopFlag::default()).unwrap();
    let first = microphone.next_chunk().unwrap().unwrap();
    assert_eq!(first.samples[..], speech()[..CHUNK]);
    // Not reading for twice the 500 ms buffer: the device overran and audio was lost.
    std::thread::sleep(Duration::from_millis(2 * u64::from(SETTINGS.buffer_ms)));
    let next = microphone.next_chunk().unwrap().unwrap();
    assert_eq!(microphone.overruns(), 1);
    assert_eq!(microphone.reopens(), 0, "an overrun is recovered in place");
    assert_eq!(next.seq, 1);
    assert_ne!(next.samples[..], speech()[CHUNK..2 * CHUNK], "what was lost is not pretended to be there");
    microphone.next_chunk().unwrap().unwrap();
    assert_eq!(microphone.overruns(), 1);
}

#[test]
fn a_microphone_that_vanishes_is_reported_and_resumes_when_it_returns() {
    let present = alsa_dir().join("outpost_vanishing_mic.present");
    let (status, status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_vanishing_mic", SETTINGS, status, StopFlag::default()).unwrap();
    microphone.next_chunk().unwrap().unwrap();
    std::fs::remove_file(&present).unwrap();
    let replug = common::recover_when_offline(&status_rx, move || {
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&present, "").unwrap();
    });
    // Blocks through the outage: the source reopens the device once it is back.
    let chunk = microphone.next_chunk().unwrap().unwrap();
    let gone = replug.join().unwrap();
    let error = gone.error.unwrap();
    assert!(error.contains("No such device"), "{error}");
    assert_eq!(chunk.seq, 1, "numbering goes on across the outage");
    assert_eq!(chunk.samples[..], speech()[..CHUNK], "the device starts afresh");
    assert_eq!(microphone.reopens(), 1);
    assert_eq!(status_rx.borrow().as_ref().unwrap().state, DeviceState::Online);
}

#[test]
fn a_microphone_that_stalls_is_reported_and_reopened() {
    let stall = alsa_dir().join("outpost_stalling_mic.stall");
    let (status, mut status_rx) = StatusReporter::new();
    let mut microphone = AlsaCapture::open("outpost_stalling_mic", SETTINGS, status, StopFlag::default()).unwrap();
    microphone.next_chunk().unwrap().unwrap();
    // Still there, but no audio comes: taken as failed after the stall timeout (5 s).
    std::fs::write(&stall, "").unwrap();
    let unstall = common::recover_when_offline(&status_rx, move || std::fs::remove_file(&stall).unwrap());
    let chunk = microphone.next_chunk().unwrap().unwrap();
    let stalled = unstall.join().unwrap();
    assert_eq!(stalled.error.as_deref(), Some("capture failed: no audio for 5 s: the microphone stalled"));
    assert_eq!(chunk.samples[..], speech()[..CHUNK], "opened again, the device starts afresh");
    assert_eq!(microphone.reopens(), 1);
    let back = common::wait_for_status(&mut status_rx, Duration::ZERO, |s| s.state == DeviceState::Online);
    assert_eq!(back.source, "outpost_stalling_mic");
}

/// The daemon itself with `[microphone] source = "alsa"`: speech captured through alsa-lib
/// reaches the sound gate and comes out as events on a real broker.
#[test]
fn the_daemon_publishes_sound_events_from_an_alsa_microphone() {
    let alsa_config = format!("/usr/share/alsa/alsa.conf:{}", alsa_dir().join("test.conf").display());
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let microphone = "[microphone]\nsource = \"alsa\"\ndevice = \"outpost_daemon_mic\"\nchunk_ms = 100\n";
    let config = common::write_config(dir.path(), "mic", broker.port, microphone);
    let daemon = common::Daemon::start_with_env(
        &["run", "--config", config.to_str().unwrap()],
        &[("ALSA_CONFIG_PATH", alsa_config.as_str())],
    );
    let wait = Duration::from_secs(20);
    let status_is = |state: &'static str| {
        move |m: &common::Message| m.topic == "outpost/mic/microphone/status" && m.json()["state"] == state
    };
    let online = subscriber.wait_for("the microphone online", wait, status_is("online")).json();
    assert_eq!(online["source"], "outpost_daemon_mic");
    let event = subscriber.wait_for("a sound event", wait, |m| m.topic == "outpost/mic/events");
    let event = event.json();
    assert_eq!(event["type"], "sound");
    // speech.wav is spoken at -26 to -19 dBFS (see the demo): far above silence.
    let level = event["level_dbfs"].as_f64().unwrap();
    assert!((-40.0..0.0).contains(&level), "{level}");

    // Unplugged: the microphone goes offline, the station stays up; back: online again.
    let present = alsa_dir().join("outpost_daemon_mic.present");
    std::fs::remove_file(&present).unwrap();
    let offline = subscriber.wait_for("the microphone offline", wait, status_is("offline")).json();
    assert!(offline["error"].as_str().unwrap().contains("No such device"), "{offline}");
    std::fs::write(&present, "").unwrap();
    subscriber.wait_for("the microphone back online", wait, status_is("online"));
    let station: Vec<_> = subscriber.received().iter().filter(|m| m.topic == "outpost/mic/status").cloned().collect();
    assert!(station.iter().all(|m| m.payload == "online"), "{station:?}");

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_for_payload("outpost/mic/status", "stopped", wait);
    let log = daemon.stderr();
    assert!(log.contains("ALSA capture from outpost_daemon_mic"), "{log}");
}

/// Speech from a live microphone through the silero VAD: the whole utterance comes out as one
/// `speech` event (the recording's sentences are a short pause apart), timed from capture.
#[test]
fn the_daemon_publishes_speech_heard_through_an_alsa_microphone() {
    let Some(vad) = prepared::prepared_path("OUTPOST_SILERO_VAD") else { return };
    let alsa_config = format!("/usr/share/alsa/alsa.conf:{}", alsa_dir().join("test.conf").display());
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let station = format!(
        "[microphone]\nsource = \"alsa\"\ndevice = \"outpost_paced_mic\"\n\
         [gates.sound]\nenabled = false\n\
         [gates.speech]\nenabled = true\nmodel = \"{}\"\nmin_silence_ms = 1000\n",
        vad.display()
    );
    let config = common::write_config(dir.path(), "ears", broker.port, &station);
    let started = std::time::SystemTime::now();
    let daemon = common::Daemon::start_with_env(
        &["run", "--config", config.to_str().unwrap()],
        &[("ALSA_CONFIG_PATH", alsa_config.as_str())],
    );
    let speech = subscriber.wait_for("a speech event", Duration::from_secs(30), |m| m.topic == "outpost/ears/events");
    let speech = speech.json();
    assert_eq!(speech["type"], "speech");
    // speech.wav: 1 s of silence, 4.3 s of speech (with pauses under 1 s), then silence.
    let duration = speech["duration_ms"].as_u64().unwrap();
    assert!((4_200..=4_500).contains(&duration), "{speech}");
    let at = humantime::parse_rfc3339(speech["timestamp"].as_str().unwrap()).unwrap();
    let offset = at.duration_since(started).unwrap();
    assert!(offset >= Duration::from_millis(900) && offset < Duration::from_secs(10), "speech began {offset:?} in");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_for_payload("outpost/ears/status", "stopped", Duration::from_secs(20));
}

#[test]
fn probe_lists_the_capture_pcms() {
    let alsa_config = format!("/usr/share/alsa/alsa.conf:{}", alsa_dir().join("test.conf").display());
    let output = common::outpostd().arg("probe").env("ALSA_CONFIG_PATH", &alsa_config).output().unwrap();
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
