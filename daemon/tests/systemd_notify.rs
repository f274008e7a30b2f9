//! What the daemon tells systemd as a `Type=notify` service, read from a real notify socket as
//! systemd would: READY once the broker link is up, STATUS lines, the watchdog fed while every
//! stage shows progress (a paused capture included), RELOADING then READY around a reload (and
//! the watchdog fed while a reload loads a model), and STOPPING.

mod common;
#[path = "common/prepared.rs"]
mod prepared;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_port, outpostd, write_config, Mosquitto, Subscriber, CLIP_CAMERA, FAST_MOTION_GATE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(30);
/// The watchdog timeout the test gives: the daemon checks every second, and a stage silent for
/// two is wedged.
const WATCHDOG_USEC: &str = "4000000";

/// The notify socket, as systemd holds it, and the daemon it was given to.
struct Supervised {
    socket: UnixDatagram,
    daemon: std::process::Child,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Supervised {
    fn start(config: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let daemon = outpostd()
            .args(["run", "--config", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .env("XDG_STATE_HOME", dir.path())
            .env_remove("STATE_DIRECTORY")
            .env_remove("JOURNAL_STREAM")
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        Self { socket, daemon, seen: Vec::new(), _dir: dir }
    }

    /// The next notification with a line for which `wanted` holds, within `timeout`; each
    /// notification is a datagram of `KEY=value` lines.
    fn wait_for(&mut self, what: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {timeout:?}; notifications so far:\n{}", self.seen.join("\n"));
            self.socket.set_read_timeout(Some(left)).unwrap();
            let Ok(length) = self.socket.recv(&mut buffer) else { continue };
            let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
            self.seen.push(message.clone());
            if message.lines().any(&wanted) {
                return message;
            }
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.daemon.id() as i32), signal).unwrap();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn ready_waits_for_the_broker_and_the_watchdog_is_fed_while_the_pipeline_runs_or_is_paused() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "supervised", port, &format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}"));
    let mut supervised = Supervised::start(&config);

    // Capture runs, but the broker is not there yet: not ready, and the status says why.
    let status = supervised.wait_for("a status", WAIT, |line| line.starts_with("STATUS="));
    assert!(status.contains("broker 127.0.0.1 unreachable"), "{status}");
    assert!(!status.contains("READY=1"), "{status}");
    supervised.wait_for("the watchdog fed while waiting", WAIT, |line| line == "WATCHDOG=1");
    assert!(!supervised.seen.iter().any(|m| m.contains("READY=1")), "{:?}", supervised.seen);

    let broker = Mosquitto::start_on(port);
    let ready = supervised.wait_for("READY", WAIT, |line| line == "READY=1");
    assert!(ready.contains("STATUS=broker 127.0.0.1 connected"), "{ready}");

    // Paused, the capture stages are not expected to beat: the watchdog is still fed, for longer
    // than a silent stage would be tolerated.
    let client = Subscriber::connect(broker.port, "outpost/supervised/#");
    client.publish("outpost/supervised/cmd/pause", r#"{"id":"p"}"#);
    supervised.wait_for("the paused status", WAIT, |line| line.contains("capture paused"));
    let paused_at = Instant::now();
    while paused_at.elapsed() < Duration::from_secs(5) {
        supervised.wait_for("the watchdog fed while paused", WAIT, |line| line == "WATCHDOG=1");
    }
    client.publish("outpost/supervised/cmd/resume", r#"{"id":"r"}"#);
    supervised.wait_for("the resumed status", WAIT, |line| line.starts_with("STATUS=") && !line.contains("paused"));
    let resumed_at = Instant::now();
    while resumed_at.elapsed() < Duration::from_secs(3) {
        supervised.wait_for("the watchdog fed after the resume", WAIT, |line| line == "WATCHDOG=1");
    }
    let wedged: Vec<_> = supervised.seen.iter().filter(|m| m.contains("wedged")).collect();
    assert!(wedged.is_empty(), "{wedged:?}");

    // A reload is bracketed by RELOADING (with the monotonic time systemd 253 wants) and READY.
    let text = std::fs::read_to_string(&config).unwrap().replace("cooldown_secs = 0.3", "cooldown_secs = 0.4");
    std::fs::write(&config, text).unwrap();
    supervised.signal(Signal::SIGHUP);
    let reloading = supervised.wait_for("RELOADING", WAIT, |line| line == "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    supervised.wait_for("READY after the reload", WAIT, |line| line == "READY=1");

    supervised.signal(Signal::SIGTERM);
    supervised.wait_for("STOPPING", WAIT, |line| line == "STOPPING=1");
    let status = supervised.daemon.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_reload_that_loads_a_model_keeps_the_watchdog_fed_while_it_loads() {
    let Some(bundle) = prepared::prepared_path("OUTPOST_GEMMA3_BUNDLE") else { return };
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), "reloaded", broker.port, &format!("{CLIP_CAMERA}loop = true\n{FAST_MOTION_GATE}"));
    let mut supervised = Supervised::start(&config);
    supervised.wait_for("READY", WAIT, |line| line == "READY=1");

    // The real 270M bundle, f32: checking its 1.7 GB of sha256s and loading its graphs takes
    // seconds, longer than the watchdog lets a silent daemon live. No look is asked of it.
    let model = format!("[model]\nbundle = \"{}\"\n\n[analysis]\ntriggers = []\n", bundle.display());
    let text = std::fs::read_to_string(&config).unwrap() + &model;
    std::fs::write(&config, text).unwrap();
    supervised.signal(Signal::SIGHUP);
    supervised.wait_for("RELOADING", WAIT, |line| line == "RELOADING=1");
    let reloading_at = Instant::now();
    let (mut last_ping, mut longest_silence) = (reloading_at, Duration::ZERO);
    loop {
        let message = supervised.wait_for("READY once the model has loaded", Duration::from_secs(300), |line| {
            line == "READY=1" || line == "WATCHDOG=1"
        });
        longest_silence = longest_silence.max(last_ping.elapsed());
        last_ping = Instant::now();
        if message.lines().any(|line| line == "READY=1") {
            break;
        }
    }
    let took = reloading_at.elapsed();
    eprintln!("the reload took {took:?}; the watchdog went unfed for at most {longest_silence:?}");
    let limit = Duration::from_micros(WATCHDOG_USEC.parse().unwrap());
    assert!(longest_silence < limit, "systemd would have killed the daemon: no WATCHDOG=1 for {longest_silence:?}");
    if took > Duration::from_secs(2) {
        let loading = supervised.seen.iter().any(|m| m.contains("STATUS=loading the model"));
        assert!(loading, "{:?}", supervised.seen);
    }
    let wedged: Vec<_> = supervised.seen.iter().filter(|m| m.contains("wedged")).collect();
    assert!(wedged.is_empty(), "{wedged:?}");
}
