//! The pipe camera source (MJPEG from a command, as `rpicam-vid --codec mjpeg -o -` gives it for
//! the Pi's CSI cameras) with real commands: `cat` of the sample clip stands in for rpicam-vid,
//! and a shell line for a command that fails.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use outpost::capture::{split_jpeg_frames, DeviceState, FrameSource, PipeCamera, StatusReporter, StopFlag};

fn clip() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("media/people.mjpeg")
}

/// The sample clip's frames, decoded independently of the source under test.
fn clip_frames() -> Vec<image::RgbImage> {
    let bytes = std::fs::read(clip()).unwrap();
    split_jpeg_frames(&bytes)
        .unwrap()
        .into_iter()
        .map(|range| image::load_from_memory(&bytes[range]).unwrap().to_rgb8())
        .collect()
}

#[test]
fn frames_equal_the_commands_output_and_a_command_that_exits_is_restarted() {
    let expected = clip_frames();
    let (status, mut status_rx) = StatusReporter::new();
    let command = vec!["cat".to_string(), clip().display().to_string()];
    // `cat` writes the whole clip at once; a rate limit far above that keeps every frame.
    let mut camera = PipeCamera::start(command, 1e9, status, StopFlag::default());
    println!("{}", camera.describe());
    for round in 0..2 {
        for (index, want) in expected.iter().enumerate() {
            let frame = camera.next_frame().unwrap().unwrap();
            assert_eq!(frame.seq as usize, round * expected.len() + index);
            assert!(frame.image.as_raw() == want.as_raw(), "round {round}, frame {index} differs from the clip's");
            if round == 0 && index == 0 {
                let online = status_rx.borrow_and_update().clone().unwrap();
                assert_eq!(online.state, DeviceState::Online);
                assert_eq!(online.mode.as_deref(), Some("MJPEG 320x240"));
            }
        }
        // `cat` has ended here: the next frame comes from a restarted command.
    }
    assert_eq!(camera.restarts(), 1);
    assert_eq!(status_rx.borrow().as_ref().unwrap().state, DeviceState::Online);
}

#[test]
fn a_failing_command_is_reported_with_its_exit_status_and_last_message() {
    let (status, mut status_rx) = StatusReporter::new();
    let command = ["sh", "-c", "echo 'ERROR: no cameras available' >&2; exit 3"].map(String::from).to_vec();
    let mut camera = PipeCamera::start(command, 10.0, status, StopFlag::default());
    // The source retries for ever: run it on a thread of its own and watch its status.
    std::thread::spawn(move || camera.next_frame());
    let offline = common::wait_for_status(&mut status_rx, Duration::from_secs(10), |s| s.state == DeviceState::Offline);
    let error = offline.error.unwrap();
    assert!(error.starts_with("its output ended (exit status: 3)"), "{error}");
    assert!(error.ends_with("its last message: ERROR: no cameras available"), "{error}");
    assert_eq!(offline.retry_in_secs, Some(1.0));
}

#[test]
fn a_command_that_does_not_exist_is_retried_not_fatal() {
    let (status, status_rx) = StatusReporter::new();
    let camera = PipeCamera::start(vec!["/nonexistent/rpicam-vid".into()], 10.0, status, StopFlag::default());
    assert!(camera.describe().contains("/nonexistent/rpicam-vid"));
    let offline = status_rx.borrow().clone().unwrap();
    assert_eq!(offline.state, DeviceState::Offline);
    assert_eq!(
        offline.error.as_deref(),
        Some("cannot start `/nonexistent/rpicam-vid`: No such file or directory (os error 2)")
    );
}

/// The daemon with a pipe camera: frames from the command reach the motion gate, and the camera's
/// state is published, retained, beside the station's.
#[test]
fn the_daemon_publishes_motion_and_camera_status_from_a_pipe() {
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    // Like rpicam-vid, the command writes one frame at a time at its frame rate (20 fps).
    let bytes = std::fs::read(clip()).unwrap();
    for (index, range) in split_jpeg_frames(&bytes).unwrap().into_iter().enumerate() {
        std::fs::write(dir.path().join(format!("{index:03}.jpg")), &bytes[range]).unwrap();
    }
    let script = format!("for f in {}/*.jpg; do cat \"$f\"; sleep 0.05; done", dir.path().display());
    let camera = format!(
        "[camera]\nsource = \"pipe\"\ncommand = [\"sh\", \"-c\", {}]\nfps = 20\n{}",
        toml::Value::String(script.clone()),
        common::FAST_MOTION_GATE
    );
    let config = common::write_config(dir.path(), "csi", broker.port, &camera);
    let daemon = common::Daemon::run_config(&config);
    let wait = Duration::from_secs(20);
    let online = subscriber.wait_for("the camera online", wait, |m| m.topic == "outpost/csi/camera/status");
    let online = online.json();
    assert_eq!(online["state"], "online");
    assert_eq!(online["mode"], "MJPEG 320x240");
    assert_eq!(online["source"], format!("sh -c {script}"));
    let event = subscriber.wait_for("a motion event", wait, |m| m.topic == "outpost/csi/events").json();
    assert_eq!(event["type"], "motion");
    // `cat` ends after 6 s of clip: the camera goes offline, and the daemon keeps running.
    let offline = subscriber.wait_for("the camera offline", wait, |m| {
        m.topic == "outpost/csi/camera/status" && m.json()["state"] == "offline"
    });
    assert!(offline.json()["error"].as_str().unwrap().starts_with("its output ended"), "{}", offline.payload);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // A clean stop leaves `stopped` on the camera's topic too, before the station's.
    let stopped = subscriber.wait_for("the camera stopped", wait, |m| {
        m.topic == "outpost/csi/camera/status" && m.json()["state"] == "stopped"
    });
    assert_eq!(stopped.json()["source"], format!("sh -c {script}"));
    subscriber.wait_for_payload("outpost/csi/status", "stopped", wait);
}

/// A reload replaces a failing command with a working one: the old source stops retrying (it
/// would otherwise go on overwriting the camera's status with its own outage).
#[test]
fn a_reload_stops_the_old_source() {
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let broken = "[camera]\nsource = \"pipe\"\ncommand = [\"sh\", \"-c\", \"echo 'no camera here' >&2; exit 1\"]\n";
    let config = common::write_config(dir.path(), "reload", broker.port, broken);
    let mut daemon = common::Daemon::run_config(&config);
    let wait = Duration::from_secs(20);
    let status_is = |state: &'static str| {
        move |m: &common::Message| m.topic == "outpost/reload/camera/status" && m.json()["state"] == state
    };
    let offline = subscriber.wait_for("the broken command offline", wait, status_is("offline")).json();
    assert!(offline["error"].as_str().unwrap().ends_with("its last message: no camera here"), "{offline}");

    let working = format!("[camera]\nsource = \"pipe\"\ncommand = [\"cat\", \"{}\"]\n", clip().display());
    common::write_config(dir.path(), "reload", broker.port, &working);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let online = subscriber.wait_for("the new command online", wait, status_is("online")).json();
    assert_eq!(online["source"], format!("cat {}", clip().display()));
    // The old source would retry within its back-off (at most 4 s by now): nothing of it comes.
    std::thread::sleep(Duration::from_secs(5));
    let late: Vec<_> = subscriber
        .received()
        .iter()
        .filter(|m| m.topic == "outpost/reload/camera/status" && m.payload.contains("no camera here"))
        .filter(|m| m.received_at > humantime::parse_rfc3339(online["since"].as_str().unwrap()).unwrap())
        .cloned()
        .collect();
    assert!(late.is_empty(), "the old source still reports: {late:?}");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_for_payload("outpost/reload/status", "stopped", wait);
    daemon.wait(wait);
}
