//! An ALSA external I/O plugin (ioplug) that behaves like a real capture device, for testing the
//! daemon's ALSA microphone through the real alsa-lib code path on a machine without a sound card.
//!
//! alsa-lib loads this library for a PCM of type `outpost_emu` (see README.md):
//!
//! - It offers exactly one rate and one channel count (from the config), RW interleaved S16_LE,
//!   so a program asking for 16 kHz mono from a 48 kHz stereo device must convert itself.
//! - It is paced by CLOCK_MONOTONIC: after `start`, `rate` frames a second become available. A
//!   program that falls behind by a whole buffer gets an overrun (`readi` returns -EPIPE).
//! - With `present`, the device exists only while that file exists: opening fails with -ENODEV
//!   while it is missing, and an open PCM whose file disappears reports itself disconnected
//!   (`readi` returns -ENODEV).
//! - With `stall`, the device delivers nothing while that file exists (its clock stands still,
//!   without an error), so a program's stall timeout can be tested.
//!
//! The samples come from `infile` (raw S16_LE interleaved), played like a tape that runs while the
//! PCM runs and loops at the end of the file.

// `snd_pcm_uframes_t` and `c_long` are 64 bits here but 32 bits on 32-bit ARM: the casts that
// look useless on a 64-bit build are not.
#![allow(clippy::unnecessary_cast, clippy::useless_conversion)]

mod ffi;

use std::ffi::{c_char, c_int, c_long, c_uint, c_ushort, c_void, CStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ffi::*;

/// The version symbol alsa-lib checks before it calls the open function: what
/// `SND_PCM_PLUGIN_SYMBOL(outpost_emu)` expands to in a shared library, a `char` named
/// `_` + `_snd_pcm_outpost_emu_open` + `SND_PCM_DLSYM_VERSION` (`_dlsym_pcm_001`).
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static __snd_pcm_outpost_emu_open_dlsym_pcm_001: c_char = 0;

/// Frames a second are limited to this range, channels to 1..=32.
const RATES: std::ops::RangeInclusive<i64> = 1000..=768_000;
const MAX_CHANNELS: i64 = 32;
/// Period sizes from 16 frames to one second, buffers of 2 to 1024 periods up to 10 seconds.
const MIN_PERIOD_FRAMES: u32 = 16;
const MAX_BUFFER_SECONDS: u32 = 10;

/// One open PCM. `io` comes first and stays at a fixed address (the `Emu` is boxed): alsa-lib keeps
/// a pointer to it from `snd_pcm_ioplug_create` until the close callback, which frees the box.
#[repr(C)]
struct Emu {
    io: snd_pcm_ioplug_t,
    /// The configured (only) rate and channel count.
    rate: u32,
    channels: u32,
    /// The whole infile, raw S16_LE interleaved, a whole number of frames (at least one).
    samples: Vec<u8>,
    /// Frames in `samples`.
    frames: u64,
    /// With `present`: the file whose existence is the device's.
    present: Option<PathBuf>,
    /// Set once `present` was seen missing: the PCM stays disconnected until closed.
    disconnected: bool,
    /// With `stall`: while this file exists the device's clock stands still.
    stall: Option<Stall>,
    /// A timerfd ticking once a period while running: the poll descriptor, so that a blocking
    /// `readi` (or `snd_pcm_wait`) sleeps in poll until the next period is due.
    timer: OwnedFd,
    /// The file frame that the device records first in the next run (the tape position).
    tape: u64,
    /// The current run, from `start` to `stop`.
    run: Option<Run>,
    /// The hw position last returned by `pointer` (0..buffer_size).
    last_hw: snd_pcm_sframes_t,
}

/// The `stall` file, and the inotify watch that wakes poll when it goes: with the timer stopped
/// during a stall, a blocking read (which alsa-lib lets wait without a timeout) has nothing else
/// to wake it. The poll descriptor is then an epoll of the timer and the inotify descriptor.
struct Stall {
    path: PathBuf,
    inotify: OwnedFd,
    epoll: OwnedFd,
    /// The watch on the file while stalled.
    watch: Option<c_int>,
}

impl Stall {
    fn new(path: PathBuf, timer: &OwnedFd) -> Result<Stall, c_int> {
        // SAFETY: plain syscalls; each descriptor is owned as soon as it exists.
        unsafe {
            let inotify = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            if inotify < 0 {
                return Err(-errno());
            }
            let inotify = OwnedFd::from_raw_fd(inotify);
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if epoll < 0 {
                return Err(-errno());
            }
            let epoll = OwnedFd::from_raw_fd(epoll);
            for fd in [timer.as_raw_fd(), inotify.as_raw_fd()] {
                let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
                if libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) < 0 {
                    return Err(-errno());
                }
            }
            Ok(Stall { path, inotify, epoll, watch: None })
        }
    }

    /// Watches the file for its removal; false when it is already gone.
    fn watch(&mut self) -> bool {
        let Ok(path) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) else { return false };
        let mask = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_ATTRIB;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let watch = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), mask) };
        self.watch = (watch >= 0).then_some(watch);
        self.watch.is_some()
    }

    fn unwatch(&mut self) {
        if let Some(watch) = self.watch.take() {
            // SAFETY: plain syscall; fails harmlessly when the kernel already dropped the watch.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), watch) };
        }
    }

    /// Reads away pending events, so that poll sleeps again.
    fn drain(&self) {
        let mut events = [0u8; 4096];
        // SAFETY: reads into `events` from a non-blocking descriptor (EAGAIN when none).
        while unsafe { libc::read(self.inotify.as_raw_fd(), events.as_mut_ptr().cast(), events.len()) } > 0 {}
    }
}

struct Run {
    start: Instant,
    /// Frames handed to the application in this run.
    consumed: u64,
    /// Set when an overrun was detected: the frames the device had recorded by then.
    overrun_at: Option<u64>,
    /// Time spent stalled in earlier stalls, and when the current one began: neither records.
    frozen: Duration,
    stalled_since: Option<Instant>,
}

impl Emu {
    fn frame_bytes(&self) -> usize {
        self.channels as usize * 2
    }

    /// Frames the device has recorded since `start`, by CLOCK_MONOTONIC (`Instant`), less the
    /// time it was stalled.
    fn elapsed_frames(&self, run: &Run) -> u64 {
        let until = run.stalled_since.unwrap_or_else(Instant::now);
        let recording = until.saturating_duration_since(run.start).saturating_sub(run.frozen);
        (recording.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64
    }

    /// One timer tick a period, rounded up so that a period is always due when it fires.
    fn period_ns(&self) -> u64 {
        let rate = u128::from(self.rate);
        (self.io.period_size as u128 * 1_000_000_000).div_ceil(rate).max(1) as u64
    }

    /// Whether the running device is stalled (`stall` exists: one `stat`). Freezes or resumes its
    /// clock when that changes; the timer stops meanwhile, so that poll (`snd_pcm_wait`) waits
    /// out its timeout rather than waking each period to find nothing.
    fn stalled(&mut self) -> bool {
        let Some(stall) = &mut self.stall else { return false };
        let stalled = stall.path.exists();
        let Some(run) = &mut self.run else { return stalled };
        match (stalled, run.stalled_since) {
            (true, None) => {
                // A file gone before the watch is set is a stall that already ended.
                if !stall.watch() {
                    return false;
                }
                run.stalled_since = Some(Instant::now());
                self.set_timer(None);
            }
            (false, Some(since)) => {
                stall.unwatch();
                run.frozen += since.elapsed();
                run.stalled_since = None;
                self.set_timer(Some(self.period_ns()));
            }
            _ => {}
        }
        stalled
    }

    /// Whether the emulated device has gone: `present` is set and missing (one `stat`), now or
    /// before. Marks the PCM disconnected the first time.
    fn vanished(&mut self) -> bool {
        if !self.disconnected {
            if let Some(present) = &self.present {
                if !present.exists() {
                    self.disconnected = true;
                    // SAFETY: `io` is the live ioplug handle; set_state only stores the state.
                    unsafe { snd_pcm_ioplug_set_state(&mut self.io, alsa_sys::SND_PCM_STATE_DISCONNECTED) };
                }
            }
        }
        self.disconnected
    }

    /// Whether the application has fallen a whole buffer behind (the kernel's capture xrun
    /// condition, avail >= buffer size): records the moment once.
    fn overrun(&mut self) -> bool {
        let buffer = self.io.buffer_size as u64;
        let Some(run) = &self.run else { return false };
        if run.overrun_at.is_some() {
            return true;
        }
        let elapsed = self.elapsed_frames(run);
        if elapsed.saturating_sub(run.consumed) < buffer {
            return false;
        }
        if let Some(run) = &mut self.run {
            run.overrun_at = Some(elapsed);
        }
        true
    }

    /// Arms (`Some(ns)`: every `ns` nanoseconds, first after `ns`) or disarms the timer.
    fn set_timer(&self, interval_ns: Option<u64>) -> c_int {
        let ns = interval_ns.unwrap_or(0);
        let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as _ };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: a valid timerfd and a valid itimerspec.
        if unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return -errno();
        }
        0
    }

    /// Empties the timer's expiry count, so that poll sleeps until the next tick.
    fn drain_timer(&self) {
        let mut ticks = 0u64;
        // SAFETY: reads 8 bytes into `ticks` from a non-blocking timerfd (EAGAIN when none).
        unsafe { libc::read(self.timer.as_raw_fd(), (&mut ticks as *mut u64).cast(), 8) };
    }

    /// Ends the current run: the tape moves on by what the device recorded (up to the overrun, if
    /// there was one), and what the application had not read is lost, as on a real device.
    fn end_run(&mut self) {
        if let Some(run) = self.run.take() {
            let recorded = run.overrun_at.unwrap_or_else(|| self.elapsed_frames(&run));
            self.tape = (self.tape + recorded) % self.frames;
        }
        self.last_hw = 0;
        self.set_timer(None);
        if let Some(stall) = &mut self.stall {
            stall.unwatch();
        }
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// The `Emu` behind an ioplug handle.
///
/// # Safety
/// `io` must be a handle created by `_snd_pcm_outpost_emu_open` and not yet closed.
unsafe fn emu<'a>(io: *mut snd_pcm_ioplug_t) -> &'a mut Emu {
    unsafe { &mut *((*io).private_data as *mut Emu) }
}

unsafe extern "C" fn emu_start(io: *mut snd_pcm_ioplug_t) -> c_int {
    let emu = unsafe { emu(io) };
    if emu.vanished() {
        return -libc::ENODEV;
    }
    emu.run =
        Some(Run { start: Instant::now(), consumed: 0, overrun_at: None, frozen: Duration::ZERO, stalled_since: None });
    emu.last_hw = 0;
    let err = emu.set_timer(Some(emu.period_ns()));
    emu.stalled();
    err
}

unsafe extern "C" fn emu_stop(io: *mut snd_pcm_ioplug_t) -> c_int {
    // alsa-lib calls stop from drop and prepare, also when the PCM is not running.
    unsafe { emu(io) }.end_run();
    0
}

/// The hardware position, 0..buffer_size (ioplug adds the distance from the last position to its
/// hw_ptr, wrapping at the buffer size). ioplug itself cannot see an overrun through a position
/// that wraps: it is detected here and reported as -EPIPE, on which ioplug sets the XRUN state.
unsafe extern "C" fn emu_pointer(io: *mut snd_pcm_ioplug_t) -> snd_pcm_sframes_t {
    let emu = unsafe { emu(io) };
    if emu.vanished() {
        // Not an error return: ioplug turns any negative position into XRUN (-EPIPE), which would
        // hide the disconnection. The state is DISCONNECTED now; readi reports -ENODEV.
        return emu.last_hw;
    }
    emu.stalled();
    if emu.overrun() {
        return -(libc::EPIPE as snd_pcm_sframes_t);
    }
    let Some(run) = &emu.run else { return emu.last_hw };
    let buffer = (emu.io.buffer_size as u64).max(1);
    emu.last_hw = (emu.elapsed_frames(run) % buffer) as snd_pcm_sframes_t;
    emu.last_hw
}

/// Copies the next `size` frames of the tape into the application's areas at `offset`.
unsafe extern "C" fn emu_transfer(
    io: *mut snd_pcm_ioplug_t,
    areas: *const snd_pcm_channel_area_t,
    offset: snd_pcm_uframes_t,
    size: snd_pcm_uframes_t,
) -> snd_pcm_sframes_t {
    let emu = unsafe { emu(io) };
    if emu.disconnected {
        return -(libc::ENODEV as snd_pcm_sframes_t);
    }
    let frame_bytes = emu.frame_bytes();
    let Some(run) = &mut emu.run else { return -(libc::EBADFD as snd_pcm_sframes_t) };
    let first_frame = emu.tape + run.consumed;
    for channel in 0..emu.channels as usize {
        // SAFETY: alsa-lib passes one area per channel.
        let area = unsafe { &*areas.add(channel) };
        for i in 0..size as u64 {
            let frame = ((first_frame + i) % emu.frames) as usize;
            let sample = &emu.samples[frame * frame_bytes + channel * 2..][..2];
            let bit = u64::from(area.first) + (offset as u64 + i) * u64::from(area.step);
            // SAFETY: the area covers the buffer's `offset..offset + size` frames; S16 samples
            // start on a byte boundary (bit / 8).
            unsafe {
                std::ptr::copy_nonoverlapping(sample.as_ptr(), area.addr.cast::<u8>().add((bit / 8) as usize), 2)
            };
        }
    }
    run.consumed += size as u64;
    size as snd_pcm_sframes_t
}

unsafe extern "C" fn emu_prepare(io: *mut snd_pcm_ioplug_t) -> c_int {
    let emu = unsafe { emu(io) };
    emu.end_run();
    if emu.vanished() {
        return -libc::ENODEV;
    }
    0
}

/// Called after poll woke up on the timer (or the stall file's watch): a period is due, so POLLIN;
/// POLLERR (with the state set) when the device has gone or the application has overrun, as a
/// sound card's driver does; nothing while stalled.
unsafe extern "C" fn emu_poll_revents(
    io: *mut snd_pcm_ioplug_t,
    pfd: *mut libc::pollfd,
    nfds: c_uint,
    revents: *mut c_ushort,
) -> c_int {
    let emu = unsafe { emu(io) };
    emu.drain_timer();
    if let Some(stall) = &emu.stall {
        stall.drain();
    }
    let mut events = if nfds > 0 { unsafe { (*pfd).revents as c_ushort } } else { 0 };
    if emu.vanished() {
        events = libc::POLLERR as c_ushort;
    } else if emu.stalled() {
        // A tick from before the stall: nothing is due.
        events = 0;
    } else if emu.overrun() {
        // SAFETY: the live ioplug handle; set_state only stores the state.
        unsafe { snd_pcm_ioplug_set_state(io, alsa_sys::SND_PCM_STATE_XRUN) };
        events = libc::POLLERR as c_ushort;
    }
    unsafe { *revents = events };
    0
}

unsafe extern "C" fn emu_close(io: *mut snd_pcm_ioplug_t) -> c_int {
    // SAFETY: the box made in the open function; alsa-lib does not touch `io` after close.
    drop(unsafe { Box::from_raw((*io).private_data as *mut Emu) });
    0
}

static CALLBACKS: snd_pcm_ioplug_callback_t = snd_pcm_ioplug_callback_t {
    start: Some(emu_start),
    stop: Some(emu_stop),
    pointer: Some(emu_pointer),
    transfer: Some(emu_transfer),
    close: Some(emu_close),
    hw_params: None,
    hw_free: None,
    sw_params: None,
    prepare: Some(emu_prepare),
    drain: None,
    pause: None,
    resume: None,
    poll_descriptors_count: None,
    poll_descriptors: None,
    poll_revents: Some(emu_poll_revents),
    dump: None,
    delay: None,
    query_chmaps: None,
    get_chmap: None,
    set_chmap: None,
};

/// Reports a configuration error the way alsa-lib's `SNDERR` does (through its error handler,
/// by default "ALSA lib FILE:LINE:(FUNCTION) message" on stderr) and returns `-errno`.
#[track_caller]
fn config_error(errno: c_int, message: String) -> c_int {
    let message = std::ffi::CString::new(message.replace('\0', " ")).unwrap_or_default();
    let line = std::panic::Location::caller().line() as c_int;
    // SAFETY: reads the handler variable; the handler is printf-like and gets "%s" and a string.
    unsafe {
        if let Some(handler) = std::ptr::addr_of!(snd_lib_error).read() {
            handler(
                concat!(file!(), "\0").as_ptr().cast(),
                line,
                c"_snd_pcm_outpost_emu_open".as_ptr(),
                0,
                c"%s".as_ptr(),
                message.as_ptr(),
            );
        }
    }
    -errno
}

/// The configuration of one PCM.
struct Config {
    infile: PathBuf,
    rate: u32,
    channels: u32,
    present: Option<PathBuf>,
    stall: Option<PathBuf>,
}

/// Reads the PCM's config node: `infile`, `rate`, `channels` (required), `present` and `stall`.
///
/// # Safety
/// `conf` must be a valid compound config node.
unsafe fn read_config(name: &str, conf: *mut snd_config_t) -> Result<Config, c_int> {
    let (mut infile, mut rate, mut channels, mut present, mut stall) = (None, None, None, None, None);
    unsafe {
        let end = alsa_sys::snd_config_iterator_end(conf);
        let mut it = alsa_sys::snd_config_iterator_first(conf);
        while it != end {
            let node = alsa_sys::snd_config_iterator_entry(it);
            it = alsa_sys::snd_config_iterator_next(it);
            let mut id: *const c_char = std::ptr::null();
            if alsa_sys::snd_config_get_id(node, &mut id) < 0 || id.is_null() {
                continue;
            }
            let id = CStr::from_ptr(id).to_string_lossy();
            let string = || {
                let mut value: *const c_char = std::ptr::null();
                match alsa_sys::snd_config_get_string(node, &mut value) {
                    0 if !value.is_null() => Ok(PathBuf::from(CStr::from_ptr(value).to_string_lossy().as_ref())),
                    _ => Err(config_error(libc::EINVAL, format!("{name}: field {id} must be a string"))),
                }
            };
            let integer = || {
                let mut value: c_long = 0;
                match alsa_sys::snd_config_get_integer(node, &mut value) {
                    0 => Ok(i64::from(value)),
                    _ => Err(config_error(libc::EINVAL, format!("{name}: field {id} must be an integer"))),
                }
            };
            match id.as_ref() {
                "comment" | "type" | "hint" => {}
                "infile" => infile = Some(string()?),
                "present" => present = Some(string()?),
                "stall" => stall = Some(string()?),
                "rate" => rate = Some(integer()?),
                "channels" => channels = Some(integer()?),
                _ => return Err(config_error(libc::EINVAL, format!("{name}: unknown field {id}"))),
            }
        }
    }
    let missing = |field: &str| config_error(libc::EINVAL, format!("{name}: the field {field} is required"));
    let infile = infile.ok_or_else(|| missing("infile"))?;
    let rate = rate.ok_or_else(|| missing("rate"))?;
    let channels = channels.ok_or_else(|| missing("channels"))?;
    if !RATES.contains(&rate) {
        return Err(config_error(libc::EINVAL, format!("{name}: rate {rate} is outside {RATES:?}")));
    }
    if !(1..=MAX_CHANNELS).contains(&channels) {
        return Err(config_error(libc::EINVAL, format!("{name}: channels {channels} is outside 1..={MAX_CHANNELS}")));
    }
    Ok(Config { infile, rate: rate as u32, channels: channels as u32, present, stall })
}

/// The open function alsa-lib calls for a PCM of type `outpost_emu`: what
/// `SND_PCM_PLUGIN_DEFINE_FUNC(outpost_emu)` declares.
///
/// # Safety
/// Called by alsa-lib only, with its own valid arguments.
#[no_mangle]
pub unsafe extern "C" fn _snd_pcm_outpost_emu_open(
    pcmp: *mut *mut snd_pcm_t,
    name: *const c_char,
    _root: *mut snd_config_t,
    conf: *mut snd_config_t,
    stream: snd_pcm_stream_t,
    mode: c_int,
) -> c_int {
    let pcm_name =
        if name.is_null() { "outpost_emu".into() } else { unsafe { CStr::from_ptr(name) }.to_string_lossy() };
    let config = match unsafe { read_config(&pcm_name, conf) } {
        Ok(config) => config,
        Err(err) => return err,
    };
    if stream != alsa_sys::SND_PCM_STREAM_CAPTURE {
        return config_error(libc::EINVAL, format!("{pcm_name}: an emulated microphone: capture only"));
    }
    // Not plugged in: fail quietly, as opening a missing card's device does.
    if config.present.as_ref().is_some_and(|present| !present.exists()) {
        return -libc::ENODEV;
    }
    let samples = match std::fs::read(&config.infile) {
        Ok(samples) => samples,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            return config_error(errno, format!("{pcm_name}: cannot read infile {}: {e}", config.infile.display()));
        }
    };
    let frame_bytes = config.channels as usize * 2;
    if samples.is_empty() || samples.len() % frame_bytes != 0 {
        return config_error(
            libc::EINVAL,
            format!(
                "{pcm_name}: infile {} has {} bytes: not a whole, nonzero number of {}-channel S16_LE frames",
                config.infile.display(),
                samples.len(),
                config.channels
            ),
        );
    }
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let timer = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if timer < 0 {
        return -errno();
    }
    let timer = unsafe { OwnedFd::from_raw_fd(timer) };
    let stall = match config.stall.map(|path| Stall::new(path, &timer)).transpose() {
        Ok(stall) => stall,
        Err(err) => return err,
    };
    let poll_fd = stall.as_ref().map_or(timer.as_raw_fd(), |stall| stall.epoll.as_raw_fd());
    let emu = Box::new(Emu {
        io: snd_pcm_ioplug_t {
            version: SND_PCM_IOPLUG_VERSION,
            name: c"Outpost emulated microphone".as_ptr(),
            flags: SND_PCM_IOPLUG_FLAG_MONOTONIC,
            poll_fd,
            poll_events: libc::POLLIN as c_uint,
            mmap_rw: 0,
            callback: &CALLBACKS,
            private_data: std::ptr::null_mut(),
            pcm: std::ptr::null_mut(),
            stream: 0,
            state: 0,
            appl_ptr: 0,
            hw_ptr: 0,
            nonblock: 0,
            access: 0,
            format: 0,
            channels: 0,
            rate: 0,
            period_size: 0,
            buffer_size: 0,
        },
        rate: config.rate,
        channels: config.channels,
        frames: (samples.len() / frame_bytes) as u64,
        samples,
        present: config.present,
        disconnected: false,
        stall,
        timer,
        tape: 0,
        run: None,
        last_hw: 0,
    });
    let emu = Box::into_raw(emu);
    unsafe {
        let io = &raw mut (*emu).io;
        (*io).private_data = emu.cast::<c_void>();
        let err = snd_pcm_ioplug_create(io, name, stream, mode);
        if err < 0 {
            // Not created: alsa-lib will not call close.
            drop(Box::from_raw(emu));
            return err;
        }
        if let Err(err) = constrain(io, &*emu) {
            // Closes the PCM, which frees `emu` in the close callback.
            snd_pcm_ioplug_delete(io);
            return err;
        }
        *pcmp = (*io).pcm;
    }
    0
}

/// What the device offers: RW interleaved S16_LE at the one rate and channel count, periods of
/// 16 frames to one second, 2 to 1024 periods in a buffer of up to 10 seconds.
///
/// # Safety
/// `io` must be a created ioplug handle.
unsafe fn constrain(io: *mut snd_pcm_ioplug_t, emu: &Emu) -> Result<(), c_int> {
    let frame_bytes = emu.frame_bytes() as u32;
    let check = |err: c_int| if err < 0 { Err(err) } else { Ok(()) };
    unsafe {
        let list = |kind, value: c_uint| check(snd_pcm_ioplug_set_param_list(io, kind, 1, &value));
        list(SND_PCM_IOPLUG_HW_ACCESS, alsa_sys::SND_PCM_ACCESS_RW_INTERLEAVED)?;
        list(SND_PCM_IOPLUG_HW_FORMAT, alsa_sys::SND_PCM_FORMAT_S16_LE as c_uint)?;
        list(SND_PCM_IOPLUG_HW_CHANNELS, emu.channels)?;
        list(SND_PCM_IOPLUG_HW_RATE, emu.rate)?;
        let minmax = |kind, min, max| check(snd_pcm_ioplug_set_param_minmax(io, kind, min, max));
        let max_buffer = frame_bytes * emu.rate * MAX_BUFFER_SECONDS;
        minmax(SND_PCM_IOPLUG_HW_PERIOD_BYTES, frame_bytes * MIN_PERIOD_FRAMES, frame_bytes * emu.rate)?;
        minmax(SND_PCM_IOPLUG_HW_BUFFER_BYTES, 2 * frame_bytes * MIN_PERIOD_FRAMES, max_buffer)?;
        minmax(SND_PCM_IOPLUG_HW_PERIODS, 2, 1024)?;
    }
    Ok(())
}
