//! `outpost-bench` on the real Gemma 3 270M: our Q8_0 bundle against llama.cpp on the GGUF it
//! was prepared from (`deploy/models/prepare_test_models.sh` gives both; without them the
//! side-by-side test says so and passes, unless OUTPOST_REQUIRE_REAL_MODEL is set, as in test.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn prepared(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ if std::env::var_os("OUTPOST_REQUIRE_REAL_MODEL").is_some() => {
            panic!("{var} is not set to a prepared file: run deploy/models/prepare_test_models.sh")
        }
        _ => {
            eprintln!("skipped: {var} is not set (deploy/models/prepare_test_models.sh prepares it)");
            None
        }
    }
}

fn outpost_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-bench")).args(args).output().unwrap()
}

fn tiny_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/gemma4-tiny")
}

fn median(figures: &Value) -> f64 {
    figures["median"].as_f64().unwrap()
}

#[test]
fn both_sides_run_the_same_model_and_the_ratios_are_ours_over_llama_cpps() {
    let (Some(bundle), Some(gguf)) = (prepared("OUTPOST_GEMMA3_Q8_BUNDLE"), prepared("OUTPOST_GEMMA3_GGUF")) else {
        return;
    };
    let output = outpost_bench(&[
        bundle.to_str().unwrap(),
        gguf.to_str().unwrap(),
        "--threads",
        "2",
        "--runs",
        "1",
        "--prefill",
        "8,32",
        "--decode",
        "4",
        "--json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let (ours, theirs, ratios) = (&report["ours"], &report["llama_cpp"], &report["ours_over_llama_cpp"]);

    // The same tokens: the bundle's tokenizer was converted from this GGUF.
    assert_eq!(theirs["same_prompt_ids"], true);
    let parameters = theirs["parameters"].as_f64().unwrap();
    assert!((2.5e8..3.0e8).contains(&parameters), "llama.cpp counts {parameters} parameters");
    assert_eq!(theirs["peak_rss_mb"].as_f64().map(|mb| mb > 100.0), Some(true), "{theirs}");

    for (side, report) in [("ours", ours), ("llama.cpp", theirs)] {
        let lengths: Vec<u64> =
            report["prefill"].as_array().unwrap().iter().map(|p| p["tokens"].as_u64().unwrap()).collect();
        assert_eq!(lengths, [8, 32], "{side}");
        for rate in report["prefill"].as_array().unwrap().iter().map(|p| median(&p["tokens_per_sec"])) {
            assert!(rate.is_finite() && rate > 0.0, "{side} prefill {rate}");
        }
        assert!(median(&report["decode_tokens_per_sec"]) > 0.0, "{side}");
    }
    for (index, pair) in ratios["prefill"].as_array().unwrap().iter().enumerate() {
        let expected =
            median(&ours["prefill"][index]["tokens_per_sec"]) / median(&theirs["prefill"][index]["tokens_per_sec"]);
        assert_eq!(pair[0], ours["prefill"][index]["tokens"]);
        assert!((pair[1].as_f64().unwrap() - expected).abs() <= 1e-9 * expected);
    }
    let decode = median(&ours["decode_tokens_per_sec"]) / median(&theirs["decode_tokens_per_sec"]);
    assert!((ratios["decode"].as_f64().unwrap() - decode).abs() <= 1e-9 * decode);
}

#[test]
fn a_file_that_is_not_gguf_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"PK\x03\x04 not a model").unwrap();
    let missing = dir.path().join("missing.gguf");
    for (path, message) in [(&not_gguf, "is not a GGUF file"), (&missing, "cannot read the GGUF file")] {
        let output = outpost_bench(&[tiny_bundle().to_str().unwrap(), path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(message) && stderr.contains(path.to_str().unwrap()), "{stderr}");
        assert!(output.stdout.is_empty(), "nothing measured: {}", String::from_utf8_lossy(&output.stdout));
    }
}
