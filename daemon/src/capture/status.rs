//! The state of a live camera or microphone, as the sources see it, for the retained
//! `<root>/camera/status` and `<root>/microphone/status` topics.
//!
//! A source reports through a [`StatusReporter`] (a `tokio::sync::watch` sender: only the latest
//! state matters, and a source thread never waits on the publisher); the publisher watches the
//! other end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::supervision::Heartbeat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Delivering frames or audio.
    Online,
    /// Missing or failing; the source keeps trying to open it again.
    Offline,
    /// A replayed file reached its end (live devices never end).
    Ended,
    /// The station stopped capturing (a clean stop).
    Stopped,
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
            DeviceState::Ended => "ended",
            DeviceState::Stopped => "stopped",
        })
    }
}

/// One report, published as JSON: `{"state":"offline","source":"...","error":"...","retry_in_secs":4.0,"since":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    pub state: DeviceState,
    /// The device or file, e.g. `/dev/v4l/by-id/usb-...-video-index0` or `plughw:CARD=Device,DEV=0`.
    pub source: String,
    /// Online: what was negotiated, e.g. `MJPEG 1280x720 at 30 fps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Offline: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Offline: when the next attempt to open it comes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<f64>,
    /// When the device entered this state, RFC 3339 UTC.
    pub since: String,
}

impl DeviceStatus {
    /// What a device's topic says once the station has stopped.
    pub fn stopped(source: &str) -> Self {
        Self {
            state: DeviceState::Stopped,
            source: source.to_owned(),
            mode: None,
            error: None,
            retry_in_secs: None,
            since: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The sending end, cloned into whichever source currently drives the device (a reload replaces
/// the source, not the reporter).
#[derive(Debug, Clone)]
pub struct StatusReporter {
    sender: Arc<watch::Sender<Option<DeviceStatus>>>,
    /// Beaten by whichever source thread drives the device, as it delivers and as it waits to
    /// retry: silence means that thread is stuck.
    heartbeat: Heartbeat,
}

impl StatusReporter {
    /// A reporter and the receiver that sees its latest report.
    pub fn new() -> (Self, watch::Receiver<Option<DeviceStatus>>) {
        let (sender, receiver) = watch::channel(None);
        (Self { sender: Arc::new(sender), heartbeat: Heartbeat::default() }, receiver)
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }

    /// The state last reported, if any.
    pub fn state(&self) -> Option<DeviceState> {
        self.sender.borrow().as_ref().map(|s| s.state)
    }

    pub fn online(&self, source: &str, mode: impl Into<String>) {
        self.set(DeviceState::Online, source, Some(mode.into()), None, None);
    }

    /// Reports an outage. Repeated failures with the same error change nothing but the retry
    /// time, so they are not published again: a dashboard sees one change per outage.
    pub fn offline(&self, source: &str, error: impl Into<String>, retry_in: Duration) {
        let error = error.into();
        let unchanged = self.sender.borrow().as_ref().is_some_and(|s| {
            s.state == DeviceState::Offline && s.source == source && s.error.as_deref() == Some(&error)
        });
        if !unchanged {
            self.set(DeviceState::Offline, source, None, Some(error), Some(retry_in.as_secs_f64()));
        }
    }

    /// The source failed too often in a row and is not tried again (a replay whose file went bad).
    pub fn gave_up(&self, error: &str) {
        self.set(DeviceState::Offline, &self.last_source(), None, Some(format!("given up: {error}")), None);
    }

    /// The source reached the end of its input (a replay without `loop`).
    pub fn ended(&self) {
        self.set(DeviceState::Ended, &self.last_source(), None, None, None);
    }

    fn last_source(&self) -> String {
        self.sender.borrow().as_ref().map(|s| s.source.clone()).unwrap_or_default()
    }

    fn set(
        &self,
        state: DeviceState,
        source: &str,
        mode: Option<String>,
        error: Option<String>,
        retry_in_secs: Option<f64>,
    ) {
        let status = DeviceStatus {
            state,
            source: source.to_owned(),
            mode,
            error,
            retry_in_secs,
            since: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        };
        // `send_replace` stores the state even when nobody watches yet.
        self.sender.send_replace(Some(status));
    }
}

/// The reporters of a station's camera and microphone.
#[derive(Debug, Clone)]
pub struct DeviceReporters {
    pub camera: StatusReporter,
    pub microphone: StatusReporter,
}

/// Set when the pipeline stops: a live source leaves its retry loop and its back-off wait.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sleeps for `duration`, or less if the flag is set meanwhile. False when it was set.
    pub fn sleep(&self, duration: Duration) -> bool {
        const SLICE: Duration = Duration::from_millis(100);
        let deadline = std::time::Instant::now() + duration;
        loop {
            if self.is_set() {
                return false;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

/// Waits between attempts to open a device that is missing or failed: 1 s, doubling up to 30 s,
/// back to 1 s once it works.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// How long the next wait lasts.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// The delay to wait now; the one after it is twice as long, up to `MAX`.
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// How a live source (camera, command, microphone) comes back when its device fails: a back-off
/// wait before every attempt after a failure, one status change per outage, and `online` only
/// once a frame or chunk has arrived. A device that opens and then fails at once (a USB camera
/// without the bandwidth to stream) waits like one that cannot be opened, instead of flapping.
#[derive(Debug)]
pub struct Reconnect {
    /// What the device is called in logs and on its status topic.
    source: String,
    what: &'static str,
    status: StatusReporter,
    stop: StopFlag,
    backoff: Backoff,
    wait_first: bool,
    delivering: bool,
    bad_in_a_row: u32,
}

impl Reconnect {
    /// Frames in a row that cannot be decoded before the device is taken as failing.
    pub const MAX_BAD_IN_A_ROW: u32 = 10;

    /// `what` names the kind of device in log lines: "camera", "microphone".
    pub fn new(what: &'static str, source: String, status: StatusReporter, stop: StopFlag) -> Self {
        Self {
            source,
            what,
            status,
            stop,
            backoff: Backoff::new(),
            wait_first: false,
            delivering: false,
            bad_in_a_row: 0,
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Before an attempt to open: waits out the back-off after a failure. False once the
    /// pipeline is stopping.
    pub fn ready_to_open(&mut self) -> bool {
        // Waiting out a back-off is not being stuck: the wait beats the heartbeat as it goes.
        const BEAT_EVERY: Duration = Duration::from_secs(1);
        if self.wait_first {
            let deadline = std::time::Instant::now() + self.backoff.advance();
            loop {
                self.status.heartbeat.beat();
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                if !self.stop.sleep(left.min(BEAT_EVERY)) {
                    return false;
                }
            }
        }
        !self.stop.is_set()
    }

    pub fn stopping(&self) -> bool {
        self.stop.is_set()
    }

    /// The device cannot be opened, or failed while open: says so and makes the next attempt wait.
    pub fn failed(&mut self, error: String) {
        let delay = self.backoff.delay();
        tracing::warn!("{} {} unavailable, trying again in {delay:?}: {error}", self.what, self.source);
        self.status.offline(&self.source, error, delay);
        self.wait_first = true;
        self.delivering = false;
        self.bad_in_a_row = 0;
    }

    /// A frame that cannot be decoded: the first of a run is logged and skipped; a run of
    /// `MAX_BAD_IN_A_ROW` means the device is failing, and the error to fail it with comes back.
    pub fn bad_frame(&mut self, problem: &str) -> Option<String> {
        self.bad_in_a_row += 1;
        if self.bad_in_a_row == 1 {
            tracing::warn!("{} {}: a frame cannot be decoded, skipping it: {problem}", self.what, self.source);
        }
        (self.bad_in_a_row >= Self::MAX_BAD_IN_A_ROW)
            .then(|| format!("{} frames in a row cannot be decoded: {problem}", Self::MAX_BAD_IN_A_ROW))
    }

    /// A frame or chunk arrived: the first since the device was opened reports it online, in
    /// `mode`, and resets the back-off. True for that first one.
    pub fn delivered(&mut self, mode: impl FnOnce() -> String) -> bool {
        self.bad_in_a_row = 0;
        if self.delivering {
            return false;
        }
        self.status.online(&self.source, mode());
        self.backoff.reset();
        self.wait_first = false;
        self.delivering = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_with_the_same_error_are_one_report() {
        let (reporter, mut receiver) = StatusReporter::new();
        reporter.online("/dev/video0", "MJPEG 640x480 at 30 fps");
        assert!(receiver.has_changed().unwrap());
        receiver.borrow_and_update();
        reporter.offline("/dev/video0", "No such device", Duration::from_secs(1));
        assert!(receiver.has_changed().unwrap());
        let first = receiver.borrow_and_update().clone().unwrap();
        reporter.offline("/dev/video0", "No such device", Duration::from_secs(2));
        assert!(!receiver.has_changed().unwrap(), "the same outage is not reported twice");
        reporter.offline("/dev/video0", "Permission denied", Duration::from_secs(4));
        assert!(receiver.has_changed().unwrap(), "a new error is");
        let json: serde_json::Value = serde_json::from_str(&first.to_json()).unwrap();
        assert_eq!(json["state"], "offline");
        assert_eq!(json["error"], "No such device");
        assert_eq!(json["retry_in_secs"], 1.0);
        assert!(json.get("mode").is_none());
    }

    #[test]
    fn a_device_that_opens_and_fails_at_once_waits_longer_each_time_and_is_online_only_when_it_delivers() {
        let (status, receiver) = StatusReporter::new();
        let mut reconnect = Reconnect::new("camera", "/dev/video0".into(), status, StopFlag::default());
        assert!(reconnect.ready_to_open(), "the first attempt does not wait");
        reconnect.failed("VIDIOC_STREAMON: No space left on device".into());
        assert_eq!(receiver.borrow().as_ref().unwrap().state, DeviceState::Offline);
        assert_eq!(reconnect.backoff.delay(), Backoff::MIN);
        reconnect.backoff.advance(); // what ready_to_open would have waited
        reconnect.failed("VIDIOC_STREAMON: No space left on device".into());
        assert_eq!(reconnect.backoff.delay(), Duration::from_secs(2), "the wait grows");
        assert_eq!(receiver.borrow().as_ref().unwrap().retry_in_secs, Some(1.0), "one report per outage");
        assert!(reconnect.delivered(|| "MJPEG 640x480 at 30 fps".into()));
        assert!(!reconnect.delivered(|| unreachable!("reported once")));
        assert_eq!(receiver.borrow().as_ref().unwrap().state, DeviceState::Online);
        assert_eq!(reconnect.backoff.delay(), Backoff::MIN);
    }

    #[test]
    fn a_stop_cuts_the_wait_short() {
        let (status, _receiver) = StatusReporter::new();
        let stop = StopFlag::default();
        let mut reconnect = Reconnect::new("microphone", "default".into(), status, stop.clone());
        reconnect.failed("gone".into());
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            stop.set();
        });
        let start = std::time::Instant::now();
        assert!(!reconnect.ready_to_open());
        assert!(start.elapsed() < Duration::from_millis(900), "{:?}", start.elapsed());
        stopper.join().unwrap();
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(backoff.advance().as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.delay(), Backoff::MIN);
    }
}
