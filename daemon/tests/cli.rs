//! The command line as a person meets it: exit codes and what is printed.

mod common;

use std::time::Duration;

use common::{write_config, Daemon, Mosquitto, CLIP_CAMERA};

fn outpostd(args: &[&str]) -> std::process::Output {
    common::outpostd().args(args).output().expect("run outpostd")
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "checked", 1883, CLIP_CAMERA);
    let output = outpostd(&["check-config", config.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    // Defaults the file left out are shown too.
    assert!(shown.contains("topic_prefix = \"outpost\""), "{shown}");
    assert!(shown.contains("[gates.motion]") && shown.contains("cooldown_secs = 5.0"), "{shown}");
    assert!(String::from_utf8_lossy(&output.stderr).ends_with("config is valid\n"));
}

#[test]
fn bad_config_exits_78_with_every_problem_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "bad", 1883, "[camera]\nsource = \"mjpeg\"\npath = \"gone.mjpeg\"\nfps = 0");
    for args in [vec!["check-config", config.to_str().unwrap()], vec!["run", "--config", config.to_str().unwrap()]] {
        let output = outpostd(&args);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {output:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        let file = config.display();
        assert_eq!(
            stderr,
            format!(
                "{file}:13:1: camera.path: cannot read {dir}/gone.mjpeg: No such file or directory (os error 2)\n\
                 {file}:14:1: camera.fps: must be more than 0 and at most 120 frames a second, got 0\n\
                 outpostd: the config has 2 problem(s); nothing was started\n",
                dir = dir.path().display()
            ),
            "{args:?}"
        );
    }
}

#[test]
fn version_is_printed() {
    let output = outpostd(&["--version"]);
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), format!("outpostd {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn credentials_reach_the_broker_and_a_wrong_password_is_reported() {
    let broker = Mosquitto::start_with_password("station", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let station = |name: &str, password: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "[station]\nid = \"{name}\"\n[mqtt]\nport = {}\nusername = \"station\"\npassword = \"{password}\"\n{CLIP_CAMERA}loop = true\n",
            broker.port
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let wait = Duration::from_secs(20);

    let refused = Daemon::run_config(&station("intruder", "guess"));
    refused.wait_for_log(&format!("cannot connect to MQTT broker at 127.0.0.1:{}", broker.port), wait);
    assert!(refused.stderr().contains("Connection refused, return code: `NotAuthorized`"), "{}", refused.stderr());

    let admitted = Daemon::run_config(&station("trusted", "s3cret"));
    admitted.wait_for_log(&format!("connected to MQTT broker at 127.0.0.1:{} as outpostd-trusted", broker.port), wait);
}

fn tiny_model() -> String {
    format!("{}/tests/fixtures/gemma4-tiny", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn bench_measures_the_model_and_the_limit_its_weights_set() {
    let output = outpostd(&[
        "bench",
        &tiny_model(),
        "--runs",
        "2",
        "--prefill",
        "16,48",
        "--decode",
        "8",
        "--decode-after",
        "40",
        "--json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["bundle"], "gemma4-tiny-random");
    assert_eq!((report["runs"].as_u64(), report["decode_tokens"].as_u64()), (Some(2), Some(8)));
    assert_eq!(report["decode_after"].as_u64(), Some(40));
    let lengths: Vec<_> = report["prefill"].as_array().unwrap().iter().map(|p| p["tokens"].as_u64().unwrap()).collect();
    assert_eq!(lengths, [16, 48]);
    let spreads = report["prefill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["tokens_per_sec"])
        .chain([&report["decode_tokens_per_sec"], &report["scene_first_token_ms"]])
        .chain([&report["image_encoder_ms"], &report["audio_encoder_ms"], &report["gate_to_report_ms"]]);
    for spread in spreads {
        let (min, median, max) =
            (spread["min"].as_f64().unwrap(), spread["median"].as_f64().unwrap(), spread["max"].as_f64().unwrap());
        assert!(0.0 < min && min <= median && median <= max, "{spread}");
    }
    // Every decoder weight is read once per token: the decoder graph's size, from the manifest.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/manifest.json", tiny_model())).unwrap()).unwrap();
    let limit = &report["limit"];
    assert_eq!(limit["weight_bytes_per_token"], manifest["files"]["decoder"]["bytes"]);
    let ceiling =
        limit["read_bandwidth_gb_per_sec"].as_f64().unwrap() * 1e9 / limit["weight_bytes_per_token"].as_f64().unwrap();
    assert!((limit["ceiling_tokens_per_sec"].as_f64().unwrap() - ceiling).abs() < 1e-6 * ceiling, "{limit}");
    let fraction = report["decode_tokens_per_sec"]["median"].as_f64().unwrap() / ceiling;
    assert!((limit["fraction_reached"].as_f64().unwrap() - fraction).abs() < 1e-9, "{limit}");
    let (loaded, peak) = (report["loaded_rss_mb"].as_f64().unwrap(), report["peak_rss_mb"].as_f64().unwrap());
    assert!(0.0 < loaded && loaded <= peak, "{report}");
    // The scene requests' own peak, restarted from the memory held when they began: within the
    // whole run's.
    let scene_peak = report["scene_peak_rss_mb"].as_f64().unwrap();
    assert!(0.0 < scene_peak && scene_peak <= peak, "{report}");
    // A report is the model's whole answer after the gate fired: never quicker than a first token.
    let first_token = report["scene_first_token_ms"]["min"].as_f64().unwrap();
    assert!(report["gate_to_report_ms"]["min"].as_f64().unwrap() > first_token, "{report}");

    let table = outpostd(&["bench", &tiny_model(), "--runs", "1", "--prefill", "16", "--decode", "4"]);
    let table = String::from_utf8(table.stdout).unwrap();
    for row in [
        "prefill 16 tokens (tokens/s)",
        "decode 4 tokens after 16 (tokens/s)",
        "image encoder (ms)",
        "gate firing to report PUBACK (ms)",
        "limit: ",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
}

#[test]
fn bench_refuses_a_prompt_longer_than_the_context() {
    let output = outpostd(&["bench", &tiny_model(), "--runs", "1", "--prefill", "5000"]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("prefill needs 5000 positions, but the model's context holds 4096"), "{said}");
    let output = outpostd(&["bench", &tiny_model(), "--runs", "1", "--decode", "100", "--decode-after", "4000"]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("decoding 100 tokens after a 4000-token prompt"), "{said}");
}
