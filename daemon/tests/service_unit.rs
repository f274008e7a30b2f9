//! The systemd unit, checked by systemd's own tools: `systemd-analyze verify` finds no problem with
//! it, and `systemd-analyze security` rates its exposure no worse than the README says.

use std::path::Path;
use std::process::Command;

/// The unit as shipped, with `ExecStart` pointing at the binary under test (verify insists that
/// the program exists), in a directory of its own.
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/outpostd.service");
    let text = std::fs::read_to_string(shipped).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/outpostd run"), "{text}");
    let path = dir.join("outpostd.service");
    std::fs::write(&path, text.replace("/usr/bin/outpostd", env!("CARGO_BIN_EXE_outpostd"))).unwrap();
    path
}

fn systemd_analyze(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(output) => Some(output),
        Err(e) => {
            eprintln!("skipped: systemd-analyze cannot run here ({e}); install systemd to check the unit");
            None
        }
    }
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let Some(output) = systemd_analyze(&["verify", unit.to_str().unwrap()]) else { return };
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{said}");
    // verify reports unknown keys and bad values as warnings, with a zero exit status.
    assert!(!said.contains("outpostd.service"), "{said}");
}

#[test]
fn the_units_exposure_is_at_most_what_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    // The README states 1.5; the threshold is on systemd's 0-100 scale (1.5 is 15).
    let Some(output) = systemd_analyze(&["security", "--offline=yes", "--threshold=15", unit.to_str().unwrap()]) else {
        return;
    };
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "exposure above 1.5:\n{said}{}", String::from_utf8_lossy(&output.stderr));
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let rated = said.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
    assert!(rated.contains(": 1.5 OK"), "{rated}");
    assert!(readme.contains("rates it **1.5 OK**"), "the README states another figure");
}
