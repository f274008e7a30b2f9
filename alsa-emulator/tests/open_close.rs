//! Opening and closing: configuration errors are reported, and repeated use leaks nothing. A
//! separate test program from capture.rs, so that nothing else opens PCMs while descriptors and
//! memory are counted.

mod common;

use std::path::Path;

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};

fn setup() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        common::write_raw(&d.join("mono.raw"), &(0..16_000).map(|i| i as i16).collect::<Vec<_>>());
        // Three samples: not a whole number of stereo frames.
        common::write_raw(&d.join("odd.raw"), &[1, 2, 3]);
        std::fs::write(d.join("empty.raw"), "").unwrap();
        let mut pcms = common::pcm("emu_mono", &d.join("mono.raw"), 16_000, 1, None)
            + &common::pcm("emu_no_file", &d.join("missing.raw"), 16_000, 1, None)
            + &common::pcm("emu_odd", &d.join("odd.raw"), 48_000, 2, None)
            + &common::pcm("emu_empty", &d.join("empty.raw"), 16_000, 1, None)
            + &common::pcm("emu_bad_rate", &d.join("mono.raw"), 10, 1, None);
        pcms += &format!(
            "pcm.emu_no_channels {{ type outpost_emu infile \"{}\" rate 16000 }}\n",
            d.join("mono.raw").display()
        );
        pcms += &format!(
            "pcm.emu_unknown_key {{ type outpost_emu infile \"{}\" rate 16000 channels 1 loudness 11 }}\n",
            d.join("mono.raw").display()
        );
        pcms += "pcm.emu_rate_string { type outpost_emu infile \"/x\" rate \"fast\" channels 1 }\n";
        common::install_config(d, &pcms);
        dir
    })
    .path()
}

#[test]
fn configuration_errors_fail_the_open() {
    setup();
    let errno = |name: &str, direction| PCM::new(name, direction, false).map(|_| ()).unwrap_err().errno();
    assert_eq!(errno("emu_no_file", Direction::Capture), libc::ENOENT);
    assert_eq!(errno("emu_odd", Direction::Capture), libc::EINVAL);
    assert_eq!(errno("emu_empty", Direction::Capture), libc::EINVAL);
    assert_eq!(errno("emu_bad_rate", Direction::Capture), libc::EINVAL);
    assert_eq!(errno("emu_no_channels", Direction::Capture), libc::EINVAL);
    assert_eq!(errno("emu_unknown_key", Direction::Capture), libc::EINVAL);
    assert_eq!(errno("emu_rate_string", Direction::Capture), libc::EINVAL);
    // A microphone: no playback.
    assert_eq!(errno("emu_mono", Direction::Playback), libc::EINVAL);
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Open, set up, read a little and close: as the daemon's reopen loop does.
fn cycle() {
    let pcm = PCM::new("emu_mono", Direction::Capture, false).unwrap();
    {
        let hw = HwParams::any(&pcm).unwrap();
        hw.set_access(Access::RWInterleaved).unwrap();
        hw.set_format(Format::s16()).unwrap();
        hw.set_period_size_near(16, ValueOr::Nearest).unwrap();
        hw.set_buffer_size_near(1600).unwrap();
        pcm.hw_params(&hw).unwrap();
    }
    pcm.prepare().unwrap();
    let mut buf = [0i16; 16];
    assert_eq!(pcm.io_i16().unwrap().readi(&mut buf).unwrap(), 16);
    assert_eq!(buf[..], (0..16).collect::<Vec<i16>>()[..]);
}

#[test]
fn repeated_open_and_close_leaks_nothing() {
    setup();
    // alsa-lib loads its configuration and the plugin on first use: count after that.
    for _ in 0..5 {
        cycle();
    }
    let (fds, rss) = (open_descriptors(), resident_kib());
    for _ in 0..300 {
        cycle();
    }
    let (fds_after, rss_after) = (open_descriptors(), resident_kib());
    println!("descriptors {fds} -> {fds_after}, resident {rss} -> {rss_after} KiB");
    assert_eq!(fds_after, fds);
    // Each open reads the 32 KB file: 300 leaked copies would be about 9.6 MB.
    assert!(rss_after < rss + 2048, "resident memory grew from {rss} to {rss_after} KiB");
}
