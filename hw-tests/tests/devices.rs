//! The daemon's capture sources on the real devices of the machine they run on: a USB camera
//! (V4L2), a CSI camera module (rpicam-vid) and a USB microphone (ALSA). Each test looks for its
//! device first and, without it, passes with a line saying what it skipped and why, so that the
//! suite runs everywhere; on a field kit it proves the hardware end of the pipeline.
//!
//! Choose devices with `OUTPOST_HW_CAMERA` (a V4L2 node) and `OUTPOST_HW_MICROPHONE` (an ALSA PCM
//! name); by default the first `/dev/v4l/by-id` camera and the first `plughw:` PCM are used.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::capture::{
    AlsaCapture, AlsaSettings, AudioSource, FrameSource, PipeCamera, StatusReporter, StopFlag, V4l2Camera, V4l2Settings,
};
use outpost::config::PixelFormat;
use outpost::gate::level_dbfs;
use outpost::probe::{camera_nodes, capture_pcms};

mod common;
use common::{service_is_running, skip};

/// The devices are the service's while it runs: V4L2 and ALSA give them to one process at a time.
const SERVICE_HOLDS_THEM: &str = "the outpostd service holds the devices (sudo systemctl stop outpostd, then again)";

/// A USB camera: the one named, else the first with a stable by-id name (the Pi's own /dev/video*
/// nodes belong to its ISP and CSI receiver, not to a camera that can stream on its own).
fn usb_camera() -> Option<PathBuf> {
    if let Some(node) = std::env::var_os("OUTPOST_HW_CAMERA") {
        return Some(node.into());
    }
    camera_nodes(Path::new("/dev")).into_iter().find(|node| node.starts_with("/dev/v4l/by-id"))
}

#[test]
fn a_usb_camera_streams_frames_of_the_negotiated_size() {
    if service_is_running() {
        return skip("usb camera", SERVICE_HOLDS_THEM);
    }
    let Some(node) = usb_camera() else {
        return skip("usb camera", "no /dev/v4l/by-id camera (plug in a USB camera, or set OUTPOST_HW_CAMERA)");
    };
    let settings = V4l2Settings { format: PixelFormat::Mjpeg, width: 640, height: 480, fps: 10.0 };
    let (status, status_rx) = StatusReporter::new();
    let mut camera = V4l2Camera::open(node.clone(), settings, status, StopFlag::default());
    let Some(mode) = camera.mode() else {
        panic!("{} did not open: {:?}", node.display(), status_rx.borrow());
    };
    println!("{}: {mode}", node.display());
    let start = Instant::now();
    for _ in 0..20 {
        let frame = camera.next_frame().unwrap().unwrap();
        assert_eq!(frame.image.dimensions(), (mode.width, mode.height));
    }
    println!("20 frames in {:.2} s", start.elapsed().as_secs_f64());
    assert_eq!(camera.reopens(), 0, "the camera failed while streaming: {:?}", status_rx.borrow());
}

#[test]
fn a_csi_camera_streams_through_rpicam_vid() {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("rpicam-vid").is_file()));
    if service_is_running() {
        return skip("csi camera", SERVICE_HOLDS_THEM);
    }
    if !found {
        return skip("csi camera", "rpicam-vid is not installed (Raspberry Pi OS: apt install rpicam-apps)");
    }
    let command = [
        "rpicam-vid",
        "-t",
        "0",
        "-n",
        "--codec",
        "mjpeg",
        "--width",
        "640",
        "--height",
        "480",
        "--framerate",
        "10",
        "-o",
        "-",
    ];
    let (status, status_rx) = StatusReporter::new();
    let mut camera = PipeCamera::start(command.map(String::from).to_vec(), 10.0, status, StopFlag::default());
    // rpicam-vid with no camera connected exits at once; the source would retry for ever.
    let (frames, frames_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..10 {
            if frames.send(camera.next_frame().map(|f| f.map(|f| f.image.dimensions()))).is_err() {
                return;
            }
        }
    });
    for _ in 0..10 {
        match frames_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(frame) => assert_eq!(frame.unwrap().unwrap(), (640, 480)),
            Err(_) => {
                let status = status_rx.borrow().clone();
                let no_camera = status
                    .as_ref()
                    .and_then(|s| s.error.as_deref())
                    .is_some_and(|e| e.contains("no cameras available"));
                if no_camera {
                    return skip("csi camera", "rpicam-vid finds no camera module on the CSI connector");
                }
                panic!("no frame from rpicam-vid within 15 s: {status:?}");
            }
        }
    }
}

/// A USB microphone: the PCM named, else the first `plughw:` one alsa-lib lists (a sound card's).
fn usb_microphone() -> Option<String> {
    if let Ok(name) = std::env::var("OUTPOST_HW_MICROPHONE") {
        return Some(name);
    }
    capture_pcms().ok()?.into_iter().map(|pcm| pcm.name).find(|name| name.starts_with("plughw:"))
}

#[test]
fn a_usb_microphone_captures_16_khz_mono_without_overruns() {
    if service_is_running() {
        return skip("usb microphone", SERVICE_HOLDS_THEM);
    }
    let Some(device) = usb_microphone() else {
        return skip(
            "usb microphone",
            "alsa-lib lists no sound card to capture from (plug in a USB microphone, or set OUTPOST_HW_MICROPHONE)",
        );
    };
    let (status, status_rx) = StatusReporter::new();
    let settings = AlsaSettings { chunk_ms: 100, buffer_ms: 500 };
    let mut microphone = AlsaCapture::open(&device, settings, status, StopFlag::default()).unwrap();
    let start = Instant::now();
    let mut samples = Vec::new();
    for _ in 0..30 {
        let chunk = microphone.next_chunk().unwrap().unwrap();
        assert_eq!((chunk.sample_rate, chunk.samples.len()), (16_000, 1600));
        samples.extend_from_slice(&chunk.samples);
    }
    let elapsed = start.elapsed();
    println!("{device}: {:?}", status_rx.borrow().as_ref().and_then(|s| s.mode.clone()));
    println!("3 s of audio in {:.2} s, level {:.1} dBFS", elapsed.as_secs_f64(), level_dbfs(&samples));
    assert_eq!(microphone.overruns(), 0);
    assert_eq!(microphone.reopens(), 0, "the microphone failed while capturing: {:?}", status_rx.borrow());
}

/// A minute of both devices at once, as a station runs them: no frame stalls for a second, no
/// audio is lost to an overrun, and neither device has to be opened again.
#[test]
fn a_minute_of_camera_and_microphone_capture_loses_nothing() {
    if service_is_running() {
        return skip("a minute of capture", SERVICE_HOLDS_THEM);
    }
    let (Some(node), Some(device)) = (usb_camera(), usb_microphone()) else {
        return skip("a minute of capture", "needs both a USB camera and a USB microphone");
    };
    let minute = Duration::from_secs(60);
    let microphone = std::thread::spawn(move || {
        let (status, status_rx) = StatusReporter::new();
        let settings = AlsaSettings { chunk_ms: 100, buffer_ms: 500 };
        let mut microphone = AlsaCapture::open(&device, settings, status, StopFlag::default()).unwrap();
        let start = Instant::now();
        for _ in 0..600 {
            microphone.next_chunk().unwrap().unwrap();
        }
        let took = start.elapsed();
        assert_eq!(microphone.overruns(), 0, "{device}: audio was lost");
        assert_eq!(microphone.reopens(), 0, "{device} failed while capturing: {:?}", status_rx.borrow());
        took
    });

    let settings = V4l2Settings { format: PixelFormat::Mjpeg, width: 640, height: 480, fps: 10.0 };
    let (status, status_rx) = StatusReporter::new();
    let mut camera = V4l2Camera::open(node.clone(), settings, status, StopFlag::default());
    let mode = camera.mode().unwrap_or_else(|| panic!("{} did not open: {:?}", node.display(), status_rx.borrow()));
    let start = Instant::now();
    let (mut frames, mut longest_gap, mut last) = (0u64, Duration::ZERO, Instant::now());
    while start.elapsed() < minute {
        camera.next_frame().unwrap().unwrap();
        frames += 1;
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
    }
    let audio_took = microphone.join().expect("the microphone thread failed");
    println!("{}: {mode}: {frames} frames in 60 s, longest gap {longest_gap:?}", node.display());
    println!("600 audio chunks (60 s) in {:.2} s", audio_took.as_secs_f64());
    assert_eq!(camera.reopens(), 0, "the camera failed while streaming: {:?}", status_rx.borrow());
    assert!(longest_gap < Duration::from_secs(1), "the camera stalled for {longest_gap:?}");
}
