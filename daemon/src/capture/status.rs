//! The state of a live camera or microphone, as the sources see it, for the retained
//! `<root>/camera/status` and `<root>/microphone/status` topics.
//!
//! A source reports through a [`StatusReporter`] (a `tokio::sync::watch` sender: only the latest
//! state matters, and a source thread never waits on the publisher); the publisher watches the
//! other end.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Delivering frames or audio.
    Online,
    /// Missing or failing; the source keeps trying to open it again.
    Offline,
    /// A replayed file reached its end (live devices never end).
    Ended,
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
}

impl StatusReporter {
    /// A reporter and the receiver that sees its latest report.
    pub fn new() -> (Self, watch::Receiver<Option<DeviceStatus>>) {
        let (sender, receiver) = watch::channel(None);
        (Self { sender: Arc::new(sender) }, receiver)
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

    /// The latest report, if any.
    pub fn current(&self) -> Option<DeviceStatus> {
        self.sender.borrow().clone()
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

/// Waits between attempts to open a device that is missing or failed: 1 s, doubling up to 30 s,
/// back to 1 s once it works.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// How long the next `wait` sleeps.
    pub fn delay(&self) -> Duration {
        self.next
    }

    pub fn wait(&mut self) {
        std::thread::sleep(self.advance());
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
