//! Model bundles: a good one is described, each kind of broken one gets its own message.

#[path = "common/binary.rs"]
mod binary;

use std::path::Path;

use outpost::model::{sha256_file, Bundle};
use serde_json::json;

/// A small gemma4-shaped bundle; the graph bytes are stand-ins, since only the files are checked.
fn write_bundle(dir: &Path) {
    std::fs::write(dir.join("decoder.onnx"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("embed.onnx"), vec![9u8; 1000]).unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version":"1.0"}"#).unwrap();
    let entry = |name: &str| {
        let path = dir.join(name);
        json!({"path": name, "sha256": sha256_file(&path).unwrap(), "bytes": std::fs::metadata(&path).unwrap().len()})
    };
    let manifest = json!({
        "format": "outpost-model-bundle",
        "format_version": 1,
        "name": "test-bundle",
        "architecture": "gemma4",
        "instruction_tuned": true,
        "graph_format": "onnx",
        "dtype": "f32",
        "quantization": "none",
        "files": {"decoder": entry("decoder.onnx"), "embed": entry("embed.onnx"), "tokenizer": entry("tokenizer.json")},
        "text": {"hidden_size": 64, "num_layers": 6},
    });
    write_manifest(dir, &manifest);
}

fn write_manifest(dir: &Path, manifest: &serde_json::Value) {
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(manifest).unwrap()).unwrap();
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    edit(&mut manifest);
    write_manifest(dir, &manifest);
}

#[test]
fn good_bundle_opens_and_is_described() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path());
    let bundle = Bundle::open(dir.path()).unwrap();
    assert_eq!(bundle.architecture.to_string(), "gemma4");
    assert_eq!(bundle.file("decoder"), Some(dir.path().join("decoder.onnx")));
    assert_eq!(bundle.total_bytes(), 4096 + 1000 + 17);

    let output = binary::outpostd().args(["model", "inspect", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "architecture  gemma4",
        "chat template yes (instruction-tuned)",
        "quantization: none",
        "decoder",
        "hidden_size",
    ] {
        assert!(shown.contains(expected), "no `{expected}` in:\n{shown}");
    }
}

#[test]
fn each_broken_bundle_has_its_own_message() {
    type Break = fn(&Path);
    let cases: &[(&str, Break, &str)] = &[
        ("no manifest", |d| std::fs::remove_file(d.join("manifest.json")).unwrap(), "{dir}: no manifest.json: not a model bundle (prepare the bundle again with deploy/models/ or copy it again)"),
        ("missing file", |d| std::fs::remove_file(d.join("embed.onnx")).unwrap(), "{dir}/embed.onnx: `embed` file is missing (prepare the bundle again with deploy/models/ or copy it again)"),
        (
            "truncated graph",
            |d| std::fs::write(d.join("decoder.onnx"), vec![7u8; 1000]).unwrap(),
            "{dir}/decoder.onnx: `decoder` file is truncated: 1000 of 4096 bytes (prepare the bundle again with deploy/models/ or copy it again)",
        ),
        (
            "flipped byte",
            |d| {
                let mut bytes = std::fs::read(d.join("decoder.onnx")).unwrap();
                bytes[100] ^= 1;
                std::fs::write(d.join("decoder.onnx"), bytes).unwrap();
            },
            "{dir}/decoder.onnx: `decoder` file is corrupt: sha256 ",
        ),
        ("not JSON", |d| std::fs::write(d.join("manifest.json"), "{\"format\": ").unwrap(), "{dir}/manifest.json: not a valid manifest: EOF while parsing a value at line 1 column 11"),
        (
            "unsupported architecture",
            |d| edit_manifest(d, |m| m["architecture"] = json!("llama")),
            "{dir}/manifest.json: architecture `llama` is not supported (this build runs gemma4 and gemma3)",
        ),
        (
            "newer format",
            |d| edit_manifest(d, |m| m["format_version"] = json!(2)),
            "{dir}/manifest.json: not a valid manifest: `format_version` 2 is not the 1 this outpostd reads: use the outpostd that matches the bundle, or prepare it again",
        ),
        (
            "no decoder listed",
            |d| edit_manifest(d, |m| drop(m["files"].as_object_mut().unwrap().remove("decoder"))),
            "{dir}/manifest.json: lists no `decoder` file, which a gemma4 bundle needs (prepare the bundle again with deploy/models/ or copy it again)",
        ),
        (
            "path outside",
            |d| edit_manifest(d, |m| m["files"]["embed"]["path"] = json!("../embed.onnx")),
            "{dir}/manifest.json: not a valid manifest: `files.embed.path` \"../embed.onnx\" must be a relative path inside the bundle",
        ),
        (
            "missing field",
            |d| edit_manifest(d, |m| drop(m.as_object_mut().unwrap().remove("dtype"))),
            "{dir}/manifest.json: not a valid manifest: missing field `dtype`",
        ),
    ];
    let mut mismatches = Vec::new();
    for (what, break_it, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path());
        break_it(dir.path());
        let got = Bundle::open(dir.path()).map(|_| "opened".to_string()).unwrap_or_else(|e| e.to_string());
        let expected = expected.replace("{dir}", &dir.path().display().to_string());
        if !got.starts_with(&expected) {
            mismatches.push(format!("{what}:\n  expected: {expected}\n  got:      {got}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn inspect_of_a_broken_bundle_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let output = binary::outpostd().args(["model", "inspect", dir.path().to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("tokenizer.json: `tokenizer` file is missing"), "{stderr}");
}
