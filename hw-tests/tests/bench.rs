//! The model's speed on the Pi itself: `outpostd bench` on the deployed bundle (or
//! `OUTPOST_HW_BUNDLE`), and, given `OUTPOST_HW_GGUF`, llama.cpp beside it on the same model
//! (`bench/side-by-side.sh`). Figures are printed, for docs/benchmarks.md; nothing here is timed
//! against a limit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::skip;
use outpost::bench::{run, BenchOptions};

fn is_a_raspberry_pi() -> bool {
    std::fs::read_to_string("/proc/device-tree/model").is_ok_and(|model| model.starts_with("Raspberry Pi"))
}

/// The bundle to measure: `OUTPOST_HW_BUNDLE`, else the one the station's config names.
fn bundle() -> Result<PathBuf, String> {
    if let Some(bundle) = std::env::var_os("OUTPOST_HW_BUNDLE") {
        return Ok(bundle.into());
    }
    let config = Path::new("/etc/outpost/outpostd.toml");
    let station = outpost::config::load(config).map_err(|e| format!("no OUTPOST_HW_BUNDLE, and {e}"))?;
    let model = station.model.as_ref().ok_or("no OUTPOST_HW_BUNDLE, and the station's config has no [model]")?;
    Ok(station.resolve_path(&model.bundle))
}

#[test]
fn the_deployed_model_runs_the_bench_and_prints_its_figures() {
    let test = "the_deployed_model_runs_the_bench_and_prints_its_figures";
    if !is_a_raspberry_pi() {
        return skip(test, "not a Raspberry Pi (/proc/device-tree/model)");
    }
    let bundle = match bundle() {
        Ok(bundle) => bundle,
        Err(why) => return skip(test, &why),
    };
    // The station's own model would compete for the cores and the memory bandwidth.
    if common::service_is_running() {
        return skip(test, "outpostd.service is running: `sudo systemctl stop outpostd` first");
    }
    let options = BenchOptions { runs: 3, ..BenchOptions::default() };
    let report = run(&bundle, &options).unwrap_or_else(|e| panic!("benchmarking {}: {e}", bundle.display()));
    println!("{report}");
    assert!(report.decode_tokens_per_sec.median > 0.0);
    assert!(report.limit.ceiling_tokens_per_sec > 0.0 && report.limit.read_bandwidth_gb_per_sec > 0.0);

    let Some(gguf) = std::env::var_os("OUTPOST_HW_GGUF") else {
        return skip("llama.cpp side by side", "OUTPOST_HW_GGUF does not name a GGUF of the same model");
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/side-by-side.sh");
    let output = Command::new("bash").arg(script).arg(&bundle).arg(&gguf).output().expect("bash runs");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
