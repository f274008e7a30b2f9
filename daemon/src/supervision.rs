//! What the service manager is told: readiness, a one-line status, and the watchdog, which is fed
//! only while every stage shows progress.
//!
//! Under systemd (`Type=notify`), `NOTIFY_SOCKET` says where to tell it and `WATCHDOG_USEC` how
//! often it wants to hear; started any other way, none of this sends anything. Each stage's thread
//! or task beats a [`Heartbeat`] as it works and as it waits (a source in its retry back-off, a
//! gate polling an empty queue, the model between tokens), so a stage that stops beating is
//! wedged, not idle, and withholding the watchdog lets systemd restart the daemon.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

/// When a stage last showed progress. A retired heartbeat (a stage that has ended, or has not
/// started) is not expected to beat.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

/// The stored value of a retired heartbeat (the default: nothing to watch yet).
const RETIRED: u64 = 0;

/// Milliseconds since the first use, plus one so that a beat is never `RETIRED`.
fn now_millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(now_millis(), Ordering::Relaxed);
    }

    /// The stage has ended on purpose: no longer watched.
    pub fn retire(&self) {
        self.0.store(RETIRED, Ordering::Relaxed);
    }

    /// How long since the last beat; `None` when retired.
    pub fn silence(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            RETIRED => None,
            at => Some(Duration::from_millis(now_millis().saturating_sub(at))),
        }
    }
}

/// The stages, named, whose heartbeats have been silent for longer than `limit`, with how long.
pub fn wedged<'a>(stages: impl IntoIterator<Item = (&'a str, &'a Heartbeat)>, limit: Duration) -> Vec<String> {
    stages
        .into_iter()
        .filter_map(|(name, heartbeat)| {
            heartbeat.silence().filter(|s| *s > limit).map(|s| format!("{name} (silent for {:.0?})", s))
        })
        .collect()
}

/// The service manager, or nothing when the daemon was not started by one.
#[derive(Debug)]
pub struct ServiceManager {
    listening: bool,
    watchdog: Option<Duration>,
    ready: bool,
    status: String,
    /// Whether the watchdog was last withheld, so that it is said once per episode.
    withheld: bool,
}

impl ServiceManager {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Self {
        let listening = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog = listening.then(sd_notify::watchdog_enabled).flatten();
        if let Some(timeout) = watchdog {
            debug!("systemd watchdog: {timeout:?}");
        }
        Self { listening, watchdog, ready: false, status: String::new(), withheld: false }
    }

    pub fn is_listening(&self) -> bool {
        self.listening
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// How often to check the stages and feed the watchdog: four times per timeout, so a missed
    /// tick or two is not a restart.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 4)
    }

    /// A stage silent for longer than this is wedged: half the watchdog's timeout.
    pub fn wedged_after(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Start-up is over (or a reload is): `READY=1`, with the status.
    pub fn ready(&mut self, status: &str) {
        self.ready = true;
        self.status = status.to_owned();
        self.send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
    }

    /// The status line, sent only when it changed.
    pub fn status(&mut self, status: &str) {
        if self.status != status {
            self.status = status.to_owned();
            self.send(&[sd_notify::NotifyState::Status(status)]);
        }
    }

    /// Feeds the watchdog when no stage is wedged; otherwise says which are, once, and lets
    /// systemd's timeout restart the daemon.
    pub fn watchdog(&mut self, wedged: &[String]) {
        if wedged.is_empty() {
            if self.withheld {
                warn!("every stage shows progress again: feeding the watchdog");
                self.withheld = false;
            }
            self.send(&[sd_notify::NotifyState::Watchdog]);
        } else if !self.withheld {
            self.withheld = true;
            let line = format!("wedged: {}", wedged.join(", "));
            error!("{line}; the watchdog is no longer fed, so systemd will restart the daemon");
            self.status(&line);
        }
    }

    /// A reload begins (`RELOADING=1` with the monotonic time systemd 253 and later require); it
    /// ends with [`ServiceManager::ready`].
    pub fn reloading(&mut self) {
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[sd_notify::NotifyState::Reloading, now]),
            Err(e) => debug!("no monotonic clock for RELOADING: {e}"),
        }
    }

    pub fn stopping(&mut self) {
        self.send(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("stopping")]);
    }

    fn send(&self, states: &[sd_notify::NotifyState]) {
        if self.listening {
            if let Err(e) = sd_notify::notify(states) {
                warn!("cannot tell systemd {states:?}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_heartbeat_is_not_watched_and_a_silent_one_is_wedged() {
        let (retired, fresh, silent) = (Heartbeat::default(), Heartbeat::default(), Heartbeat::default());
        fresh.beat();
        silent.beat();
        std::thread::sleep(Duration::from_millis(60));
        fresh.beat();
        let stages = [("camera", &retired), ("motion gate", &fresh), ("model", &silent)];
        let found = wedged(stages, Duration::from_millis(40));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("model (silent for "), "{found:?}");

        silent.retire();
        assert!(wedged([("model", &silent)], Duration::from_millis(40)).is_empty());
        silent.beat();
        assert!(wedged([("model", &silent)], Duration::from_millis(40)).is_empty(), "beating again");
    }
}
