//! The V4L2 camera source through the real `v4l` code path, on a camera emulated by the project's
//! LD_PRELOAD library (`v4l2-emulator/`): this machine has no /dev/video*. A test cannot preload a
//! library into itself, so the source-level tests re-run this binary, filtered to one `child_*`
//! test, with LD_PRELOAD set; the daemon-level tests start `outpostd` with it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost::capture::{
    split_jpeg_frames, yuyv_to_rgb, DeviceState, FrameSource, StatusReporter, StopFlag, V4l2Camera, V4l2Settings,
};
use outpost::config::PixelFormat;

const CHILD: &str = "OUTPOST_V4L2_TEST_CHILD";
const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;

fn emulator_library() -> PathBuf {
    common::workspace_library("liboutpost_v4l2_emulator.so", "outpost-v4l2-emulator")
}

fn clip() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("media/people.mjpeg")
}

/// Three YUYV frames, each a different pattern, so that a frame out of place shows.
fn yuyv_frames() -> Vec<Vec<u8>> {
    let size = (WIDTH * HEIGHT * 2) as usize;
    (0..3u8).map(|f| (0..size).map(|i| (i as u8).wrapping_mul(7).wrapping_add(f * 85)).collect()).collect()
}

/// A directory holding an emulated camera node, a stable by-id name for it, and its media.
struct EmulatedCamera {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl EmulatedCamera {
    fn yuyv(intervals: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let media = dir.path().join("clip.yuyv");
        std::fs::write(&media, yuyv_frames().concat()).unwrap();
        Self::new(dir, &media, "YUYV", WIDTH, HEIGHT, intervals)
    }

    fn mjpeg(intervals: &str) -> Self {
        Self::new(tempfile::tempdir().unwrap(), &clip(), "MJPG", 320, 240, intervals)
    }

    fn new(dir: tempfile::TempDir, media: &Path, format: &str, width: u32, height: u32, intervals: &str) -> Self {
        std::fs::create_dir_all(dir.path().join("by-id")).unwrap();
        let node = dir.path().join("video0");
        std::fs::write(&node, b"").unwrap();
        std::os::unix::fs::symlink(&node, dir.path().join("by-id/usb-Outpost_Emulated_Camera-video-index0")).unwrap();
        let first_rate = intervals.split(',').next().unwrap().to_owned();
        let env = [
            ("LD_PRELOAD", emulator_library().display().to_string()),
            ("OUTPOST_V4L2_EMU_DEVICE", node.display().to_string()),
            ("OUTPOST_V4L2_EMU_MEDIA", media.display().to_string()),
            ("OUTPOST_V4L2_EMU_FORMAT", format.to_owned()),
            ("OUTPOST_V4L2_EMU_WIDTH", width.to_string()),
            ("OUTPOST_V4L2_EMU_HEIGHT", height.to_string()),
            ("OUTPOST_V4L2_EMU_FPS", first_rate),
            ("OUTPOST_V4L2_EMU_INTERVALS", intervals.to_owned()),
            // While this file exists the camera stays plugged in but sends nothing.
            ("OUTPOST_V4L2_EMU_STALL", dir.path().join("stall").display().to_string()),
            ("OUTPOST_V4L2_TEST_DIR", dir.path().display().to_string()),
        ];
        Self { dir, env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
    }

    /// Runs `child_<case>` of this binary under the emulator; it does the work and asserts.
    fn run_child(&self, case: &str) {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([case, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        println!("{text}");
        assert!(output.status.success(), "{case} failed under the emulator:\n{text}");
        assert!(text.contains("1 passed"), "{case} did not run:\n{text}");
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    fn by_id(&self) -> PathBuf {
        self.dir.path().join("by-id/usb-Outpost_Emulated_Camera-video-index0")
    }
}

// ---- child side: runs under the emulator ----

/// The emulated camera's directory; panics when not run by a parent test.
fn child_dir() -> PathBuf {
    assert!(std::env::var_os(CHILD).is_some(), "run by its parent test under the camera emulator, not on its own");
    PathBuf::from(std::env::var("OUTPOST_V4L2_TEST_DIR").unwrap())
}

fn settings(format: PixelFormat, width: u32, height: u32, fps: f64) -> V4l2Settings {
    V4l2Settings { format, width, height, fps }
}

#[test]
#[ignore = "runs under the camera emulator, started by yuyv_frames_equal_the_media"]
fn child_yuyv_frames() {
    let dir = child_dir();
    let (status, status_rx) = StatusReporter::new();
    let mut camera = V4l2Camera::open(
        dir.join("video0"),
        settings(PixelFormat::Yuyv, WIDTH, HEIGHT, 20.0),
        status,
        StopFlag::default(),
    );
    assert!(status_rx.borrow().is_none(), "online only once a frame has come");
    let media: Vec<_> = yuyv_frames().iter().map(|f| yuyv_to_rgb(f, WIDTH, HEIGHT).unwrap()).collect();
    // A camera drops a frame when the reader has no buffer queued (a busy machine): each frame
    // must be one of the media's, whole, starting with the first.
    for index in 0..7 {
        let frame = camera.next_frame().unwrap().unwrap();
        assert_eq!(status_rx.borrow().as_ref().unwrap().mode.as_deref(), Some("YUYV 64x48 at 20 fps"));
        assert_eq!(frame.seq, index as u64);
        let found = media.iter().position(|m| *m == *frame.image);
        assert!(found.is_some(), "frame {index} is none of the media's");
        assert!(index > 0 || found == Some(0), "the stream starts at the media's first frame");
    }
}

#[test]
fn yuyv_frames_equal_the_media() {
    EmulatedCamera::yuyv("20").run_child("child_yuyv_frames");
}

#[test]
#[ignore = "runs under the camera emulator, started by mjpeg_frames_equal_the_clip"]
fn child_mjpeg_frames() {
    let dir = child_dir();
    let (status, _status_rx) = StatusReporter::new();
    let by_id = dir.join("by-id/usb-Outpost_Emulated_Camera-video-index0");
    let mut camera = V4l2Camera::open(by_id, settings(PixelFormat::Mjpeg, 320, 240, 30.0), status, StopFlag::default());
    let bytes = std::fs::read(clip()).unwrap();
    let clip: Vec<_> = split_jpeg_frames(&bytes).unwrap().into_iter().take(30).map(|r| bytes[r].to_vec()).collect();
    let clip: Vec<_> = clip.iter().map(|jpeg| image::load_from_memory(jpeg).unwrap().to_rgb8()).collect();
    // In the clip's order; a frame the camera dropped while the reader was busy is skipped.
    let mut next = 0;
    for index in 0..8 {
        let frame = camera.next_frame().unwrap().unwrap();
        let found = clip[next..].iter().position(|c| *c == *frame.image);
        let Some(offset) = found else { panic!("frame {index} is not the clip's next frame or a later one") };
        next += offset + 1;
    }
}

#[test]
fn mjpeg_frames_equal_the_clip() {
    EmulatedCamera::mjpeg("30").run_child("child_mjpeg_frames");
}

#[test]
#[ignore = "runs under the camera emulator, started by the_nearest_format_size_and_rate_are_chosen"]
fn child_negotiation() {
    let dir = child_dir();
    let (status, status_rx) = StatusReporter::new();
    // Asked for what this camera does not have: MJPEG at 1280x720, 10 fps.
    let mut camera = V4l2Camera::open(
        dir.join("video0"),
        settings(PixelFormat::Mjpeg, 1280, 720, 10.0),
        status,
        StopFlag::default(),
    );
    let mode = camera.mode().unwrap();
    assert_eq!(mode.to_string(), "YUYV 64x48 at 15 fps", "the other format, its only size, the slowest rate >= 10");
    assert_eq!(camera.next_frame().unwrap().unwrap().image.dimensions(), (64, 48));
    assert_eq!(status_rx.borrow().as_ref().unwrap().mode.as_deref(), Some("YUYV 64x48 at 15 fps"));
}

#[test]
fn the_nearest_format_size_and_rate_are_chosen() {
    EmulatedCamera::yuyv("30,15,5").run_child("child_negotiation");
}

#[test]
#[ignore = "runs under the camera emulator, started by an_unplugged_camera_is_reported_and_resumes_when_it_returns"]
fn child_unplug_and_return() {
    let dir = child_dir();
    let node = dir.join("video0");
    let (status, mut status_rx) = StatusReporter::new();
    let mut camera =
        V4l2Camera::open(node.clone(), settings(PixelFormat::Yuyv, WIDTH, HEIGHT, 20.0), status, StopFlag::default());
    for _ in 0..3 {
        camera.next_frame().unwrap().unwrap();
    }
    // Unplugged mid-stream: the source reports it and keeps trying; plugged back in a moment later.
    std::fs::remove_file(&node).unwrap();
    let replug = common::recover_when_offline(&status_rx, move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&node, b"").unwrap();
    });
    let frame = camera.next_frame().unwrap().unwrap();
    let gone = replug.join().unwrap();
    let error = gone.error.unwrap();
    assert!(
        error.starts_with("the camera is gone (unplugged?): No such device")
            || error.starts_with("cannot open it: No such file"),
        "{error}"
    );
    assert_eq!(frame.seq, 3, "numbering goes on across the outage");
    assert_eq!(*frame.image, yuyv_to_rgb(&yuyv_frames()[0], WIDTH, HEIGHT).unwrap(), "a fresh stream starts");
    assert_eq!(camera.reopens(), 1);
    let back = common::wait_for_status(&mut status_rx, Duration::ZERO, |s| s.state == DeviceState::Online);
    assert_eq!(back.mode.as_deref(), Some("YUYV 64x48 at 20 fps"));
}

#[test]
fn an_unplugged_camera_is_reported_and_resumes_when_it_returns() {
    EmulatedCamera::yuyv("20").run_child("child_unplug_and_return");
}

#[test]
#[ignore = "runs under the camera emulator, started by a_camera_missing_at_start_is_picked_up_later"]
fn child_missing_at_start() {
    let dir = child_dir();
    let node = dir.join("video0");
    std::fs::remove_file(&node).unwrap();
    let (status, status_rx) = StatusReporter::new();
    let mut camera =
        V4l2Camera::open(node.clone(), settings(PixelFormat::Yuyv, WIDTH, HEIGHT, 20.0), status, StopFlag::default());
    let missing = status_rx.borrow().clone().unwrap();
    assert_eq!(missing.state, DeviceState::Offline);
    assert_eq!(missing.error.as_deref(), Some("cannot open it: No such file or directory (os error 2)"));
    assert_eq!(missing.retry_in_secs, Some(1.0));
    std::fs::write(&node, b"").unwrap();
    let frame = camera.next_frame().unwrap().unwrap();
    assert_eq!(frame.seq, 0);
    assert_eq!(status_rx.borrow().as_ref().unwrap().state, DeviceState::Online);
}

#[test]
fn a_camera_missing_at_start_is_picked_up_later() {
    EmulatedCamera::yuyv("20").run_child("child_missing_at_start");
}

#[test]
#[ignore = "runs under the camera emulator, started by a_stalled_camera_is_reported_and_reopened"]
fn child_stall() {
    let dir = child_dir();
    let (status, mut status_rx) = StatusReporter::new();
    let settings = settings(PixelFormat::Yuyv, WIDTH, HEIGHT, 20.0);
    let mut camera = V4l2Camera::open(dir.join("video0"), settings, status, StopFlag::default());
    camera.next_frame().unwrap().unwrap();
    // Still plugged in, but no frame comes: taken as failed after the stall timeout (5 s).
    let stall = dir.join("stall");
    std::fs::write(&stall, b"").unwrap();
    let unstall = common::recover_when_offline(&status_rx, move || std::fs::remove_file(&stall).unwrap());
    let frame = camera.next_frame().unwrap().unwrap();
    let stalled = unstall.join().unwrap();
    assert_eq!(stalled.error.as_deref(), Some("no frame for 5 s: the camera stalled"));
    assert_eq!(frame.seq, 1);
    assert_eq!(camera.reopens(), 1, "a stalled camera is closed and opened again");
    let back = common::wait_for_status(&mut status_rx, Duration::ZERO, |s| s.state == DeviceState::Online);
    assert_eq!(back.mode.as_deref(), Some("YUYV 64x48 at 20 fps"));
}

#[test]
fn a_stalled_camera_is_reported_and_reopened() {
    EmulatedCamera::yuyv("20").run_child("child_stall");
}

#[test]
fn probe_describes_an_emulated_camera() {
    let camera = EmulatedCamera::mjpeg("30,15");
    let node = camera.dir.path().join("video0");
    let output = common::outpostd()
        .args(["probe", "--camera"])
        .arg(camera.by_id())
        .arg("--camera")
        .arg(&node)
        .envs(camera.env())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    println!("{shown}");
    // Named twice, by its stable name and its node: described once.
    let expected = format!(
        "  {} -> {}\n    Outpost emulated camera (outpost-emu, usb-emulated)\n    MJPG (Motion-JPEG):\n      320x240 at 30, 15 fps\n  {}\n    (the same camera as above)\n",
        camera.by_id().display(),
        node.display(),
        node.display()
    );
    assert!(shown.contains(&expected), "{shown}");
}

/// The daemon with a V4L2 camera named by its stable id: the camera's state and motion events are
/// published; unplugged, it goes offline and the daemon keeps running; back, it comes online.
#[test]
fn the_daemon_follows_a_camera_through_an_unplug() {
    let camera = EmulatedCamera::mjpeg("30,15");
    let broker = common::Mosquitto::start();
    let mut subscriber = common::Subscriber::connect(broker.port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let station = format!(
        "[camera]\nsource = \"v4l2\"\ndevice = \"{}\"\nwidth = 320\nheight = 240\nfps = 10\n{}",
        camera.by_id().display(),
        common::FAST_MOTION_GATE
    );
    let config = common::write_config(dir.path(), "usb", broker.port, &station);
    let daemon = common::Daemon::start_with_env(&["run", "--config", config.to_str().unwrap()], &camera.env());
    let wait = Duration::from_secs(20);
    let status_is = |state: &'static str| {
        move |m: &common::Message| m.topic == "outpost/usb/camera/status" && m.json()["state"] == state
    };
    let online = subscriber.wait_for("the camera online", wait, status_is("online")).json();
    assert_eq!(online["mode"], "MJPEG 320x240 at 15 fps");
    assert_eq!(online["source"], camera.by_id().display().to_string());
    subscriber.wait_for("a motion event", wait, |m| m.topic == "outpost/usb/events");

    let node = camera.dir.path().join("video0");
    std::fs::remove_file(&node).unwrap();
    let offline = subscriber.wait_for("the camera offline", wait, status_is("offline")).json();
    println!("offline: {offline}");
    // The station itself stays up through the camera's outage.
    let station: Vec<_> = subscriber.received().iter().filter(|m| m.topic == "outpost/usb/status").cloned().collect();
    assert!(station.iter().all(|m| m.payload == "online"), "{station:?}");
    std::fs::write(&node, b"").unwrap();
    let unplugged_at = std::time::SystemTime::now();
    subscriber.wait_for("the camera back online", wait, |m| status_is("online")(m) && m.received_at > unplugged_at);
    subscriber.wait_for("a motion event after the return", wait, |m| {
        m.topic == "outpost/usb/events" && m.received_at > unplugged_at
    });
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_for_payload("outpost/usb/status", "stopped", wait);
    let log = daemon.stderr();
    assert!(
        log.contains("the nearest it offers to the MJPEG 320x240 at 10 fps asked for (extra frames are skipped)"),
        "{log}"
    );
}
