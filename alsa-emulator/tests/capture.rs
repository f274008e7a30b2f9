//! The plugin through real alsa-lib and the `alsa` crate, as the daemon uses it: pacing, the one
//! rate and channel count, overruns and a device that vanishes and returns.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use alsa::pcm::{Access, Format, HwParams, State, PCM};
use alsa::{Direction, ValueOr};

/// 1 s of 16 kHz mono: sample i is i, so any slice tells where in the file it is.
const MONO_FRAMES: usize = 16_000;
/// 1 s of 48 kHz stereo: left is the frame number (as 16 bits), right its complement.
const STEREO_FRAMES: usize = 48_000;

fn mono() -> Vec<i16> {
    (0..MONO_FRAMES).map(|i| i as i16).collect()
}

fn stereo() -> Vec<i16> {
    (0..STEREO_FRAMES).flat_map(|i| [i as u16 as i16, !(i as u16 as i16)]).collect()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn present(&self) -> PathBuf {
        self.dir.path().join("mic-present")
    }

    fn stall(&self) -> PathBuf {
        self.dir.path().join("mic-stall")
    }
}

/// The recordings and one ALSA config with all the test PCMs, installed before the first open.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (mono_raw, stereo_raw) = (dir.path().join("mono.raw"), dir.path().join("stereo.raw"));
        common::write_raw(&mono_raw, &mono());
        common::write_raw(&stereo_raw, &stereo());
        let present = dir.path().join("mic-present");
        std::fs::write(&present, "").unwrap();
        let pcms = common::pcm("emu_mono", &mono_raw, 16_000, 1, None)
            + &common::pcm("emu_overrun", &mono_raw, 16_000, 1, None)
            + &common::pcm("emu_stereo", &stereo_raw, 48_000, 2, None)
            + &common::pcm("emu_present", &mono_raw, 16_000, 1, Some(&present))
            + &format!(
                "pcm.emu_stall {{ type outpost_emu infile \"{}\" rate 16000 channels 1 stall \"{}\" }}\n",
                mono_raw.display(),
                dir.path().join("mic-stall").display()
            );
        common::install_config(dir.path(), &pcms);
        Setup { dir }
    })
}

/// Opens a capture PCM with the given period and buffer (frames), RW interleaved S16_LE, asking
/// for 16 kHz mono as the daemon does; returns the rate and channels it got.
fn open(name: &str, period: i64, buffer: i64) -> (PCM, u32, u32) {
    setup();
    let pcm = PCM::new(name, Direction::Capture, false).unwrap();
    let (rate, channels) = {
        let hw = HwParams::any(&pcm).unwrap();
        hw.set_access(Access::RWInterleaved).unwrap();
        hw.set_format(Format::s16()).unwrap();
        let channels = hw.set_channels_near(1).unwrap();
        let rate = hw.set_rate_near(16_000, ValueOr::Nearest).unwrap();
        assert_eq!(hw.set_period_size_near(period, ValueOr::Nearest).unwrap(), period);
        assert_eq!(hw.set_buffer_size_near(buffer).unwrap(), buffer);
        pcm.hw_params(&hw).unwrap();
        (rate, channels)
    };
    pcm.prepare().unwrap();
    (pcm, rate, channels)
}

/// Reads exactly `frames` frames with blocking `readi` calls.
fn read(pcm: &PCM, frames: usize, channels: usize) -> Result<Vec<i16>, alsa::Error> {
    let io = pcm.io_i16()?;
    let mut samples = vec![0; frames * channels];
    let mut filled = 0;
    while filled < samples.len() {
        filled += io.readi(&mut samples[filled..])? * channels;
    }
    Ok(samples)
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether `samples` are consecutive mono samples of the file (looping at its end), and where
/// they start.
fn position_in_mono(samples: &[i16]) -> Option<usize> {
    let start = samples[0] as usize;
    let consecutive = samples.iter().enumerate().all(|(k, &s)| s as usize == (start + k) % MONO_FRAMES);
    consecutive.then_some(start)
}

#[test]
fn capture_is_paced_and_equals_the_file() {
    let (pcm, rate, channels) = open("emu_mono", 1600, 8000);
    assert_eq!((rate, channels), (16_000, 1));
    let (started, cpu) = (Instant::now(), thread_cpu_time());
    let captured = read(&pcm, MONO_FRAMES, 1).unwrap();
    let (took, cpu) = (started.elapsed(), thread_cpu_time() - cpu);
    println!("1 s of audio took {took:?}, {cpu:?} of CPU");
    assert!(captured == mono(), "the captured frames differ from the file");
    assert!(took >= Duration::from_millis(800) && took <= Duration::from_secs(5), "{took:?}");
    // A blocking readi sleeps in poll on the plugin's timer between periods: it does not spin.
    assert!(cpu < Duration::from_millis(200), "{cpu:?} of CPU for 1 s of blocking reads");
    // Past its end the file starts again.
    let wrapped = read(&pcm, 4000, 1).unwrap();
    assert!(wrapped[..] == mono()[..4000], "the file does not loop");
}

#[test]
fn a_48k_stereo_device_offers_only_its_rate_and_channels() {
    let (pcm, rate, channels) = open("emu_stereo", 4800, 24_000);
    assert_eq!((rate, channels), (48_000, 2));
    let started = Instant::now();
    let captured = read(&pcm, 12_000, 2).unwrap();
    let took = started.elapsed();
    assert!(captured[..] == stereo()[..24_000], "the captured frames differ from the file");
    assert!(took >= Duration::from_millis(200) && took <= Duration::from_secs(5), "{took:?}");
    // 16 kHz mono is not on offer at all.
    let pcm = PCM::new("emu_stereo", Direction::Capture, false).unwrap();
    let hw = HwParams::any(&pcm).unwrap();
    assert!(hw.set_rate(16_000, ValueOr::Nearest).is_err());
    assert!(hw.set_channels(1).is_err());
}

#[test]
fn reading_too_late_is_an_overrun_and_capture_recovers() {
    let (pcm, _, _) = open("emu_overrun", 1600, 4800);
    let first = read(&pcm, 1600, 1).unwrap();
    assert_eq!(position_in_mono(&first), Some(0));
    // Twice the buffer time (0.3 s) without reading.
    std::thread::sleep(Duration::from_millis(600));
    let err = read(&pcm, 1600, 1).unwrap_err();
    println!("after sleeping: {err} (errno {})", err.errno());
    assert_eq!(err.errno(), libc::EPIPE);
    assert_eq!(pcm.state(), State::XRun);
    pcm.try_recover(err, true).unwrap();
    let after = read(&pcm, 3200, 1).unwrap();
    // Capture goes on where the device was when the overrun was seen: the audio in between
    // (more than a buffer) is lost, and what follows is consecutive again.
    let position = position_in_mono(&after).expect("consecutive samples after the overrun");
    println!("capture resumed at frame {position} of the file");
    assert!(position >= 1600 + 4800, "{position}");
    assert_eq!(pcm.state(), State::Running);
}

#[test]
fn a_device_that_vanishes_fails_and_comes_back() {
    let present = setup().present();
    let (pcm, _, _) = open("emu_present", 800, 3200);
    read(&pcm, 1600, 1).unwrap();
    // Unplugged while a blocking read waits for its data: the plugin sees it at the next period.
    let unplug = {
        let present = present.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::remove_file(&present).unwrap();
            Instant::now()
        })
    };
    let err = read(&pcm, 16_000, 1).unwrap_err();
    let unplugged = unplug.join().unwrap();
    println!("after the device went: {err} (errno {}), {:?} later", err.errno(), unplugged.elapsed());
    assert_eq!(err.errno(), libc::ENODEV);
    assert!(unplugged.elapsed() < Duration::from_secs(2), "{:?}", unplugged.elapsed());
    assert_eq!(pcm.state(), State::Disconnected);
    // Every later call fails the same way, and recovery in place fails: the daemon has to close
    // and reopen.
    assert_eq!(read(&pcm, 800, 1).unwrap_err().errno(), libc::ENODEV);
    assert!(pcm.try_recover(err, true).is_err());
    drop(pcm);
    let err = PCM::new("emu_present", Direction::Capture, false).unwrap_err();
    println!("opening while it is gone: {err} (errno {})", err.errno());
    assert_eq!(err.errno(), libc::ENODEV);
    std::fs::write(&present, "").unwrap();
    let (pcm, _, _) = open("emu_present", 800, 3200);
    let captured = read(&pcm, 1600, 1).unwrap();
    assert!(captured[..] == mono()[..1600], "the returned device does not start at the file's start");
    // Unplugged between reads: the next read fails at once.
    std::fs::remove_file(&present).unwrap();
    assert_eq!(read(&pcm, 800, 1).unwrap_err().errno(), libc::ENODEV);
    std::fs::write(&present, "").unwrap();
}

/// What the daemon does when `readi` finds nothing (a non-blocking PCM): `snd_pcm_wait` sleeps in
/// poll until a period is due; it reports an overrun as an error too.
#[test]
fn waiting_sleeps_until_a_period_is_due() {
    setup();
    let pcm = PCM::new("emu_mono", Direction::Capture, true).unwrap();
    {
        let hw = HwParams::any(&pcm).unwrap();
        hw.set_access(Access::RWInterleaved).unwrap();
        hw.set_format(Format::s16()).unwrap();
        hw.set_period_size_near(1600, ValueOr::Nearest).unwrap();
        hw.set_buffer_size_near(4800).unwrap();
        pcm.hw_params(&hw).unwrap();
    }
    pcm.prepare().unwrap();
    pcm.start().unwrap();
    let io = pcm.io_i16().unwrap();
    let mut buf = [0i16; 1600];
    // The first period is due 100 ms after the start.
    let started = Instant::now();
    assert!(pcm.wait(Some(1000)).unwrap());
    let waited = started.elapsed();
    println!("waited {waited:?} for a 100 ms period");
    assert!(waited >= Duration::from_millis(60) && waited <= Duration::from_secs(2), "{waited:?}");
    assert_eq!(io.readi(&mut buf).unwrap(), 1600);
    assert_eq!(position_in_mono(&buf), Some(0));
    std::thread::sleep(Duration::from_millis(600));
    let err = pcm.wait(Some(1000)).unwrap_err();
    println!("waiting after an overrun: {err} (errno {})", err.errno());
    assert_eq!(err.errno(), libc::EPIPE);
}

/// A device that stays present but stops delivering (a hung USB microphone): `snd_pcm_wait`
/// times out, a blocking read waits, and when it resumes the audio goes on where it froze.
#[test]
fn a_stalled_device_delivers_nothing_and_resumes_where_it_froze() {
    let stall = setup().stall();
    let (pcm, _, _) = open("emu_stall", 1600, 4800);
    assert_eq!(position_in_mono(&read(&pcm, 1600, 1).unwrap()), Some(0));
    std::fs::write(&stall, "").unwrap();
    let started = Instant::now();
    assert!(!pcm.wait(Some(500)).unwrap(), "a stalled device has nothing to wait for");
    let waited = started.elapsed();
    println!("waited {waited:?} on a stalled device");
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    // Stalled for longer than the buffer (0.3 s), and a blocking read waits through more of it.
    let resume = {
        let stall = stall.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&stall).unwrap();
            Instant::now()
        })
    };
    let after = read(&pcm, 6400, 1).unwrap();
    let resumed = resume.join().unwrap();
    println!("read went on {:?} after the stall ended", resumed.elapsed());
    assert_eq!(position_in_mono(&after), Some(1600), "the audio goes on where it froze, without an overrun");
    assert_eq!(pcm.state(), State::Running);
}
