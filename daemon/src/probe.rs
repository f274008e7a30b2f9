//! `outpostd probe`: the capture devices this machine offers, named as a config wants them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use alsa::device_name::HintIter;
use alsa::Direction;

use crate::capture::describe_camera;

/// An ALSA PCM that can capture, from alsa-lib's device hints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturePcm {
    /// What `[microphone] device` takes, e.g. `plughw:CARD=Device,DEV=0`.
    pub name: String,
    pub description: String,
}

/// The PCMs alsa-lib lists for capture (those for both directions included).
pub fn capture_pcms() -> Result<Vec<CapturePcm>, alsa::Error> {
    Ok(HintIter::new_str(None, "pcm")?
        .filter(|hint| hint.direction != Some(Direction::Playback))
        .filter_map(|hint| {
            let name = hint.name?;
            // alsa-lib separates a description's lines with newlines.
            let description = hint.desc.unwrap_or_default().replace('\n', ", ");
            Some(CapturePcm { name, description })
        })
        .collect())
}

/// V4L2 device nodes: the stable /dev/v4l/by-id names first (they survive replugging), then
/// /dev/video*.
pub fn camera_nodes(dev: &Path) -> Vec<PathBuf> {
    let list = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_str().is_some_and(keep))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    };
    let mut nodes = list(&dev.join("v4l/by-id"), &|_| true);
    nodes.extend(list(dev, &|name| name.strip_prefix("video").is_some_and(|n| n.parse::<u32>().is_ok())));
    nodes
}

/// What `outpostd probe` prints: every capture PCM, and the cameras named (every node under
/// /dev when none is).
pub fn report(cameras: &[PathBuf]) -> String {
    let mut out = String::new();
    out.push_str("Microphones (ALSA capture PCMs, for [microphone] source = \"alsa\", device = NAME):\n");
    match capture_pcms() {
        Ok(pcms) if pcms.is_empty() => out.push_str(
            "  none: alsa-lib lists no capture PCM (is a microphone plugged in? `arecord -l` lists sound cards)\n",
        ),
        Ok(pcms) => {
            for pcm in pcms {
                let _ = writeln!(out, "  {}  ({})", pcm.name, pcm.description);
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  cannot list them: {e}");
        }
    }
    out.push_str("Cameras (V4L2 device nodes, for [camera] source = \"v4l2\", device = NODE):\n");
    let cameras = if cameras.is_empty() { camera_nodes(Path::new("/dev")) } else { cameras.to_vec() };
    if cameras.is_empty() {
        out.push_str("  none: no /dev/video* (is a USB camera plugged in? `dmesg` says whether the kernel saw one)\n");
        out.push_str("  A Pi camera module on the CSI connector is read through libcamera: use source = \"pipe\" with rpicam-vid.\n");
    }
    // A by-id name and the /dev/videoN it points to are one camera: described once, by-id first.
    let mut seen = std::collections::HashSet::new();
    for node in cameras {
        let real = std::fs::canonicalize(&node).unwrap_or_else(|_| node.clone());
        if real == node {
            let _ = writeln!(out, "  {}", node.display());
        } else {
            let _ = writeln!(out, "  {} -> {}", node.display(), real.display());
        }
        if !seen.insert(real) {
            let _ = writeln!(out, "    (the same camera as above)");
            continue;
        }
        match describe_camera(&node) {
            Ok(lines) => {
                for line in lines {
                    let _ = writeln!(out, "    {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "    {e}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_nodes_lists_stable_names_then_video_nodes() {
        let dev = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dev.path().join("v4l/by-id")).unwrap();
        for name in ["video10", "video2", "videonope", "vcs", "v4l/by-id/usb-Cam-video-index0"] {
            std::fs::write(dev.path().join(name), "").unwrap();
        }
        let names: Vec<String> = camera_nodes(dev.path())
            .iter()
            .map(|p| p.strip_prefix(dev.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["v4l/by-id/usb-Cam-video-index0", "video10", "video2"]);
    }
}
