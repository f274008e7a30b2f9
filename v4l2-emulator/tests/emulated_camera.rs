//! Drives the emulator with the unmodified `v4l` crate. A test cannot preload a library into
//! itself, so each test re-runs this binary, filtered to that one test, as a child process with
//! LD_PRELOAD and the emulator's variables set; the child (`OUTPOST_EMU_TEST_CHILD` set) does the
//! V4L2 work and asserts, and the parent checks that it passed.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use v4l::buffer::Type;
use v4l::capability::Flags as CapFlags;
use v4l::format::description::Flags as FmtFlags;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, Format, FourCC, Fraction};

const CHILD: &str = "OUTPOST_EMU_TEST_CHILD";
const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const ENOTTY: i32 = 25;

// ---- media ----

fn yuyv_frames() -> Vec<Vec<u8>> {
    let size = (WIDTH * HEIGHT * 2) as usize;
    (0..3u8).map(|f| (0..size).map(|i| (i as u8).wrapping_mul(7).wrapping_add(f * 85)).collect()).collect()
}

/// Marker-correct stand-ins for JPEG images (the emulator never decodes them). The second holds an
/// EXIF-like thumbnail with an end marker of its own, which must not end the frame.
fn mjpg_frames() -> Vec<Vec<u8>> {
    let fake = |seed: u8, len: usize, thumbnail: bool| {
        let mut jpeg = vec![0xFF, 0xD8];
        if thumbnail {
            jpeg.extend([0xFF, 0xE1, 0x00, 0x0A, 0xFF, 0xD8, 0x01, 0x02, 0x03, 0x04, 0xFF, 0xD9]);
        }
        jpeg.extend([0xFF, 0xDA, 0x00, 0x03, seed]);
        jpeg.extend((0..len).map(|i| ((i * 13 + usize::from(seed)) % 0xFE) as u8));
        jpeg.extend([0xFF, 0x00, 0x42, 0xFF, 0xD9]); // a stuffed FF 00, then the end marker
        jpeg
    };
    vec![fake(1, 100, false), fake(2, 333, true), fake(3, 57, false)]
}

fn frames_for(format: &str) -> Vec<Vec<u8>> {
    if format == "MJPG" {
        mjpg_frames()
    } else {
        yuyv_frames()
    }
}

// ---- parent side ----

/// The emulator, built beside this test binary.
fn emulator_library() -> PathBuf {
    const NAME: &str = "liboutpost_v4l2_emulator.so";
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps");
    // `cargo test` builds the library into deps/; `cargo build` copies it one level up, and only
    // it refreshes that copy.
    let candidates = [deps.join(NAME), deps.parent().expect("target/<profile>").join(NAME)];
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{NAME} is missing: build it first with `cargo build -p outpost-v4l2-emulator`"))
}

/// A scratch directory with an emulated camera node and its media.
struct Camera {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Camera {
    fn new(name: &str, format: &str, extra: &[(&str, &str)]) -> Camera {
        let dir = std::env::temp_dir().join(format!("outpost-v4l2-emu-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("by-id")).unwrap();
        let device = dir.join("video0");
        fs::write(&device, b"").unwrap();
        std::os::unix::fs::symlink(&device, dir.join("by-id/usb-Outpost_Emulated_Camera-video-index0")).unwrap();
        let media = dir.join(if format == "MJPG" { "clip.mjpeg" } else { "clip.yuyv" });
        fs::write(&media, frames_for(format).concat()).unwrap();
        let mut env = vec![
            ("OUTPOST_V4L2_EMU_DEVICE".to_string(), device.display().to_string()),
            ("OUTPOST_V4L2_EMU_MEDIA".to_string(), media.display().to_string()),
            ("OUTPOST_V4L2_EMU_FORMAT".to_string(), format.to_string()),
            ("OUTPOST_V4L2_EMU_WIDTH".to_string(), WIDTH.to_string()),
            ("OUTPOST_V4L2_EMU_HEIGHT".to_string(), HEIGHT.to_string()),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.to_string()));
        }
        Camera { dir, env }
    }

    /// Runs test `name` of this binary in a child with the emulator preloaded; returns its stderr.
    fn run_child(&self, name: &str) -> String {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .env("LD_PRELOAD", emulator_library())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child {name} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        assert!(stdout.contains("1 passed"), "child {name} ran no test\n{stdout}");
        eprintln!("{stdout}");
        stderr.into_owned()
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The errno a call that must fail failed with.
fn os_error<T>(result: std::io::Result<T>) -> Option<i32> {
    result.map(|_| ()).expect_err("the call should fail").raw_os_error()
}

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

// ---- child side ----

fn fourcc() -> FourCC {
    FourCC::new(var("OUTPOST_V4L2_EMU_FORMAT").as_bytes().try_into().unwrap())
}

/// Takes `count` frames and checks each against the media frame its sequence number names (the
/// camera loops the file); returns the sequences and timestamps (µs).
fn take_frames(stream: &mut Stream, count: usize) -> Vec<(u32, i64)> {
    let frames = frames_for(&var("OUTPOST_V4L2_EMU_FORMAT"));
    let mut seen = Vec::new();
    for _ in 0..count {
        let (data, meta) = stream.next().expect("a frame");
        let expected = &frames[meta.sequence as usize % frames.len()];
        assert_eq!(meta.bytesused as usize, expected.len(), "frame {}", meta.sequence);
        assert!(&data[..meta.bytesused as usize] == expected.as_slice(), "frame {} differs", meta.sequence);
        if let Some((last, _)) = seen.last() {
            assert!(meta.sequence > *last, "sequence {} after {last}", meta.sequence);
        }
        seen.push((meta.sequence, meta.timestamp.sec * 1_000_000 + meta.timestamp.usec));
    }
    seen
}

fn child_streams_the_media() {
    let fourcc = fourcc();
    let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
    let caps = dev.query_caps().unwrap();
    assert_eq!(
        (caps.driver.as_str(), caps.card.as_str(), caps.bus.as_str()),
        ("outpost-emu", "Outpost emulated camera", "usb-emulated")
    );
    assert!(caps.capabilities.contains(CapFlags::VIDEO_CAPTURE | CapFlags::STREAMING), "{:?}", caps.capabilities);

    let formats = dev.enum_formats().unwrap();
    assert_eq!(formats.len(), 1, "{formats:?}");
    assert_eq!(formats[0].fourcc, fourcc);
    let mjpg = fourcc == FourCC::new(b"MJPG");
    assert_eq!(formats[0].description, if mjpg { "Motion-JPEG" } else { "YUYV 4:2:2" });
    assert_eq!(formats[0].flags.contains(FmtFlags::COMPRESSED), mjpg);

    let sizes = dev.enum_framesizes(fourcc).unwrap();
    assert_eq!(sizes.len(), 1);
    match &sizes[0].size {
        FrameSizeEnum::Discrete(d) => assert_eq!((d.width, d.height), (WIDTH, HEIGHT)),
        other => panic!("{other:?}"),
    }
    let intervals = dev.enum_frameintervals(fourcc, WIDTH, HEIGHT).unwrap();
    assert_eq!(intervals.len(), 1);
    assert!(matches!(intervals[0].interval, FrameIntervalEnum::Discrete(Fraction { numerator: 1, denominator: 30 })));

    let format = dev.set_format(&Format::new(WIDTH, HEIGHT, fourcc)).unwrap();
    assert_eq!((format.width, format.height, format.fourcc), (WIDTH, HEIGHT, fourcc));
    let params = dev.set_params(&v4l::video::capture::Parameters::with_fps(30)).unwrap();
    assert_eq!((params.interval.numerator, params.interval.denominator), (1, 30));

    let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).unwrap();
    let seen = take_frames(&mut stream, 7);
    assert!(seen.last().unwrap().0 >= 6, "seven frames wrap a three-frame file: {seen:?}");
    println!("streamed 7 frames: {seen:?}");
}

#[test]
fn yuyv_camera_streams_the_media_frames_to_an_unmodified_v4l_client() {
    if in_child() {
        return child_streams_the_media();
    }
    Camera::new("yuyv", "YUYV", &[]).run_child("yuyv_camera_streams_the_media_frames_to_an_unmodified_v4l_client");
}

#[test]
fn mjpg_camera_streams_each_jpeg_with_its_own_length() {
    if in_child() {
        return child_streams_the_media();
    }
    Camera::new("mjpg", "MJPG", &[]).run_child("mjpg_camera_streams_each_jpeg_with_its_own_length");
}

#[test]
fn format_and_frame_rate_requests_are_adjusted_like_a_driver_does() {
    if in_child() {
        let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        let yuyv = FourCC::new(b"YUYV");
        let mjpg = FourCC::new(b"MJPG");
        let format = dev.set_format(&Format::new(1280, 720, mjpg)).unwrap();
        assert_eq!((format.width, format.height, format.fourcc), (WIDTH, HEIGHT, yuyv));
        assert_eq!((format.stride, format.size), (WIDTH * 2, WIDTH * HEIGHT * 2));

        let rates: Vec<u32> = dev
            .enum_frameintervals(yuyv, WIDTH, HEIGHT)
            .unwrap()
            .iter()
            .map(|i| match i.interval {
                FrameIntervalEnum::Discrete(f) => f.denominator / f.numerator,
                FrameIntervalEnum::Stepwise(_) => panic!("stepwise"),
            })
            .collect();
        assert_eq!(rates, [30, 15, 10]);
        assert_eq!(os_error(dev.enum_frameintervals(mjpg, WIDTH, HEIGHT)), Some(EINVAL));
        assert_eq!(os_error(dev.enum_frameintervals(yuyv, 1280, 720)), Some(EINVAL));
        assert_eq!(os_error(dev.enum_framesizes(mjpg)), Some(EINVAL));
        // No controls: QUERY_EXT_CTRL answers EINVAL, which v4l passes on when the list is empty.
        assert_eq!(os_error(dev.query_controls()), Some(EINVAL));

        let fps = |asked: u32| {
            let p = dev.set_params(&v4l::video::capture::Parameters::with_fps(asked)).unwrap();
            p.interval.denominator / p.interval.numerator
        };
        assert_eq!(fps(25), 30);
        assert_eq!(fps(11), 10);
        assert_eq!(dev.params().unwrap().interval.denominator, 10, "what S_PARM set stays set");
        println!("negotiated");
        return;
    }
    Camera::new("negotiate", "YUYV", &[("OUTPOST_V4L2_EMU_INTERVALS", "30,15,10")])
        .run_child("format_and_frame_rate_requests_are_adjusted_like_a_driver_does");
}

#[test]
fn frames_are_paced_at_the_rate_set() {
    if in_child() {
        let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        let params = dev.set_params(&v4l::video::capture::Parameters::with_fps(20)).unwrap();
        assert_eq!(params.interval.denominator, 20);
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).unwrap();
        let started = Instant::now();
        let seen = take_frames(&mut stream, 10);
        let elapsed = started.elapsed();
        // Frame n arrives (n+1) periods after STREAMON: the tenth at 0.5 s.
        assert!(elapsed >= Duration::from_millis(450) && elapsed <= Duration::from_secs(5), "{elapsed:?}");
        for pair in seen.windows(2) {
            let frames_apart = i64::from(pair[1].0 - pair[0].0);
            assert_eq!(pair[1].1 - pair[0].1, 50_000 * frames_apart, "timestamps 1/20 s apart: {seen:?}");
        }
        println!("10 frames in {elapsed:?}");
        return;
    }
    Camera::new("pacing", "YUYV", &[("OUTPOST_V4L2_EMU_INTERVALS", "30,20"), ("OUTPOST_V4L2_EMU_FPS", "30")])
        .run_child("frames_are_paced_at_the_rate_set");
}

#[test]
fn unplugging_fails_the_stream_with_enodev_and_a_replugged_camera_streams_again() {
    if in_child() {
        let device = var("OUTPOST_V4L2_EMU_DEVICE");
        let link = Path::new(&device).parent().unwrap().join("by-id/usb-Outpost_Emulated_Camera-video-index0");
        let dev = Device::with_path(&link).unwrap();
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).unwrap();
        take_frames(&mut stream, 3);

        fs::remove_file(&device).unwrap();
        let err = stream.next().map(|_| ()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENODEV), "{err}");
        let mut pollfd = libc::pollfd { fd: dev.handle().fd(), events: libc::POLLIN, revents: 0 };
        let polled_at = Instant::now();
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 5000) }, 1);
        assert_eq!(pollfd.revents, libc::POLLERR | libc::POLLHUP);
        assert!(polled_at.elapsed() < Duration::from_secs(1), "poll on an unplugged camera returns at once");
        drop(stream); // STREAMOFF, munmap and REQBUFS 0 meet ENODEV, which v4l tolerates
        assert_eq!(Device::with_path(&link).map(|_| ()).unwrap_err().kind(), ErrorKind::NotFound);

        fs::write(&device, b"").unwrap();
        let err = dev.query_caps().map(|_| ()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENODEV), "a descriptor from before the unplug stays dead");
        drop(dev);

        let dev = Device::with_path(&link).unwrap();
        assert_eq!(dev.query_caps().unwrap().driver, "outpost-emu");
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 2).unwrap();
        let seen = take_frames(&mut stream, 3);
        assert_eq!(seen[0].0, 0, "a new stream starts at sequence 0");
        println!("replugged: {seen:?}");
        return;
    }
    Camera::new("unplug", "YUYV", &[])
        .run_child("unplugging_fails_the_stream_with_enodev_and_a_replugged_camera_streams_again");
}

#[test]
fn a_stalled_camera_times_out_without_an_error_and_streams_again_when_the_stall_ends() {
    if in_child() {
        let stall = var("OUTPOST_V4L2_EMU_STALL");
        let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).unwrap();
        stream.set_timeout(Duration::from_millis(300));
        let mut last = take_frames(&mut stream, 3)[2].0;

        fs::write(&stall, b"").unwrap();
        // Frames delivered before the stall was seen may still be waiting in the queue.
        let mut left = 0;
        let (err, waited) = loop {
            let asked = Instant::now();
            match stream.next() {
                Ok((_, meta)) => (left, last) = (left + 1, meta.sequence),
                Err(err) => break (err, asked.elapsed()),
            }
            assert!(left <= 4, "frames keep coming while stalled");
        };
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(waited >= Duration::from_millis(280), "poll waited out its timeout: {waited:?}");
        // Every buffer is queued now: a non-blocking DQBUF finds nothing, and it is no error.
        let fd = dev.handle().fd();
        let dqbuf = || {
            let mut buf: v4l::v4l_sys::v4l2_buffer = unsafe { std::mem::zeroed() };
            buf.type_ = Type::VideoCapture as u32;
            buf.memory = v4l::memory::Memory::Mmap as u32;
            unsafe { v4l::v4l2::ioctl(fd, v4l::v4l2::vidioc::VIDIOC_DQBUF, (&raw mut buf).cast()) }
                .map(|()| buf.sequence)
        };
        assert_eq!(dqbuf().unwrap_err().raw_os_error(), Some(libc::EAGAIN));
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 200) }, 0);
        assert_eq!(dev.query_caps().unwrap().driver, "outpost-emu", "a stalled camera is still there");

        // The same stream resumes, paced afresh: the next frame one period (33 ms) after the
        // stall ends, with the next sequence number, and no backlog behind it.
        fs::remove_file(&stall).unwrap();
        let resumed = Instant::now();
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 1000) }, 1);
        assert!(resumed.elapsed() < Duration::from_secs(2), "{:?}", resumed.elapsed());
        assert_eq!(dqbuf().unwrap(), last + 1);
        assert_eq!(dqbuf().unwrap_err().raw_os_error(), Some(libc::EAGAIN), "no burst of missed frames");
        drop(stream);
        drop(dev);

        // v4l cannot go on with its own stream after a timeout (next() queues a queued buffer
        // again): a new one streams.
        let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4).unwrap();
        stream.set_timeout(Duration::from_millis(300));
        let seen = take_frames(&mut stream, 3);
        println!("stalled after {left} queued frames, then streamed again: {seen:?}");
        return;
    }
    let mut camera = Camera::new("stall", "YUYV", &[]);
    let stall = camera.dir.join("stall").display().to_string();
    camera.env.push(("OUTPOST_V4L2_EMU_STALL".to_string(), stall));
    camera.run_child("a_stalled_camera_times_out_without_an_error_and_streams_again_when_the_stall_ends");
}

#[test]
fn other_files_and_calls_are_untouched() {
    if in_child() {
        let media = var("OUTPOST_V4L2_EMU_MEDIA");
        let expected = yuyv_frames().concat();
        assert!(fs::read(&media).unwrap() == expected);

        // ioctl, syscall(SYS_ioctl), mmap and poll on ordinary descriptors reach the kernel.
        let file = fs::File::open(&media).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut available: libc::c_int = 0;
        assert_eq!(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut available) }, 0);
        assert_eq!(available as usize, expected.len());
        available = 0;
        assert_eq!(unsafe { libc::syscall(libc::SYS_ioctl, fd, libc::FIONREAD, &mut available) }, 0);
        assert_eq!(available as usize, expected.len());
        assert_eq!(unsafe { libc::syscall(libc::SYS_getpid) }, libc::c_long::from(std::process::id() as i32));
        let map = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(map, libc::MAP_FAILED);
        assert!(unsafe { std::slice::from_raw_parts(map as *const u8, 4096) } == &expected[..4096]);
        assert_eq!(unsafe { libc::munmap(map, 4096) }, 0);

        // While a camera descriptor is open, too.
        let camera = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        let mut pipe = [0; 2];
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let mut pollfd = libc::pollfd { fd: pipe[0], events: libc::POLLIN, revents: 0 };
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 10) }, 0);
        assert_eq!(unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 1000) }, 1);
        assert_eq!(pollfd.revents, libc::POLLIN);
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }

        // Another file in the same directory is no camera.
        let other = Path::new(&media).with_file_name("video1");
        fs::write(&other, b"").unwrap();
        let not_camera = Device::with_path(&other).unwrap();
        assert_eq!(os_error(not_camera.query_caps()), Some(ENOTTY));
        assert_eq!(camera.query_caps().unwrap().driver, "outpost-emu");
        println!("untouched");
        return;
    }
    Camera::new("passthrough", "YUYV", &[]).run_child("other_files_and_calls_are_untouched");
}

#[test]
fn a_bad_variable_leaves_the_node_an_ordinary_file_and_says_why() {
    if in_child() {
        let dev = Device::with_path(var("OUTPOST_V4L2_EMU_DEVICE")).unwrap();
        assert_eq!(os_error(dev.query_caps()), Some(ENOTTY));
        return;
    }
    let stderr = Camera::new("bad-env", "YUYV", &[("OUTPOST_V4L2_EMU_WIDTH", "wide")])
        .run_child("a_bad_variable_leaves_the_node_an_ordinary_file_and_says_why");
    assert!(
        stderr.contains(
            "outpost-v4l2-emu: OUTPOST_V4L2_EMU_WIDTH=wide is not a positive whole number; no camera is emulated"
        ),
        "{stderr}"
    );
}
