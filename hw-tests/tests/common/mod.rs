//! What the field tests share: saying what was skipped, and asking systemd about the service.
#![allow(dead_code)] // each test file uses its own part of this

use std::path::Path;
use std::process::Command;

/// Says what was skipped where it is seen: straight to stderr, past the test harness's capture
/// (which holds back a passing test's `println!`).
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "hw-tests: skipped {test}: {why}");
}

/// Whether systemd runs the outpostd service on this machine now.
pub fn service_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && Command::new("systemctl")
            .args(["is-active", "--quiet", "outpostd.service"])
            .status()
            .is_ok_and(|s| s.success())
}

/// A property of the service as systemd shows it (`MainPID`, `NRestarts`, `StatusText`, ...).
pub fn service_property(name: &str) -> String {
    let output = Command::new("systemctl")
        .args(["show", "--value", "--property", name, "outpostd.service"])
        .output()
        .expect("systemctl runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
