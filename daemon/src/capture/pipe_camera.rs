//! MJPEG from a command's standard output. The Pi's CSI camera modules are driven by libcamera,
//! not plain V4L2, and `rpicam-vid --codec mjpeg -t 0 -o -` is the supported way to stream them;
//! any other program that writes JPEG frames back to back works the same way.
//!
//! The command runs without a shell. When it exits, stalls or writes something that is not MJPEG,
//! it is stopped and started again with back-off, like a camera that was unplugged.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::mjpeg::{decode_jpeg, JpegStreamSplitter};
use super::pacing::RateLimiter;
use super::status::{Backoff, StatusReporter};
use super::{Frame, FrameSource, SourceError};

/// A command that writes nothing for this long is taken as stalled (rpicam-vid needs a second or
/// two to start the sensor).
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames in a row that cannot be decoded before the command is restarted.
const MAX_BAD_FRAMES: u32 = 10;
/// Lines of the command's standard error kept to explain why it stopped.
const STDERR_LINES: usize = 5;

pub struct PipeCamera {
    command: Vec<String>,
    status: StatusReporter,
    running: Option<Running>,
    splitter: JpegStreamSplitter,
    read_buffer: Vec<u8>,
    /// Set while the command cannot be started or keeps failing: the next start waits first.
    start_failed: bool,
    /// Whether `online` has been reported since the command last (re)started.
    online: bool,
    backoff: Backoff,
    limiter: RateLimiter,
    seq: u64,
    bad_frames_in_a_row: u32,
    restarts: u64,
}

/// The command while it runs.
struct Running {
    child: Child,
    stdout: ChildStdout,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl PipeCamera {
    /// Starts the command now; if it cannot start, says so and tries again from `next_frame`.
    pub fn start(command: Vec<String>, fps: f64, status: StatusReporter) -> Self {
        let mut camera = Self {
            command,
            status,
            running: None,
            splitter: JpegStreamSplitter::default(),
            read_buffer: vec![0; 64 << 10],
            start_failed: false,
            online: false,
            backoff: Backoff::new(),
            limiter: RateLimiter::new(Duration::from_secs_f64(1.0 / fps)),
            seq: 0,
            bad_frames_in_a_row: 0,
            restarts: 0,
        };
        camera.try_start();
        camera
    }

    /// How often the command was started again after it stopped or failed.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    fn name(&self) -> String {
        self.command.join(" ")
    }

    fn try_start(&mut self) {
        let Some((program, args)) = self.command.split_first() else {
            self.status.offline("", "the command is empty", self.backoff.delay());
            self.start_failed = true;
            return;
        };
        let spawned =
            Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let error = format!("cannot start `{program}`: {e}");
                tracing::warn!("camera command: {error}; trying again in {:?}", self.backoff.delay());
                self.status.offline(&self.name(), error, self.backoff.delay());
                self.start_failed = true;
                return;
            }
        };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            // Both were asked for as pipes: std always provides them.
            let _ = child.kill();
            let _ = child.wait();
            self.start_failed = true;
            return;
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_LINES)));
        let tail = Arc::clone(&stderr_tail);
        let name = program.clone();
        // The command's own log (rpicam-vid writes plenty) goes to ours at debug level.
        let spawned = std::thread::Builder::new().name("camera-command-log".into()).spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::debug!("{name}: {line}");
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == STDERR_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the thread that logs the camera command's messages: {e}");
        }
        if self.start_failed || self.seq > 0 {
            self.restarts += 1;
        }
        tracing::info!("camera command started (pid {}): {}", child.id(), self.name());
        self.splitter.clear();
        self.running = Some(Running { child, stdout, stderr_tail });
    }

    /// Stops a command that failed; the next `next_frame` starts it again after its back-off.
    fn fail(&mut self, error: String) {
        let error = match self.running.take() {
            Some(running) => running.stop(error),
            None => error,
        };
        tracing::warn!("camera command failed, starting it again in {:?}: {error}", self.backoff.delay());
        self.status.offline(&self.name(), error, self.backoff.delay());
        self.start_failed = true;
        self.online = false;
        self.bad_frames_in_a_row = 0;
    }

    /// Reads what the command has written into the splitter. `Err` says why the stream is over.
    fn read_some(&mut self) -> Result<(), String> {
        let Some(running) = self.running.as_mut() else { return Err("not running".into()) };
        if !wait_readable(&running.stdout, STALL_TIMEOUT)? {
            return Err(format!("wrote nothing for {} s", STALL_TIMEOUT.as_secs()));
        }
        match running.stdout.read(&mut self.read_buffer) {
            Ok(0) => Err("its output ended".into()),
            Ok(n) => {
                self.splitter.push(&self.read_buffer[..n]);
                if self.splitter.pending() > JpegStreamSplitter::MAX_PENDING {
                    return Err(format!(
                        "wrote {} MiB without a complete JPEG frame: is it writing MJPEG (`--codec mjpeg`)?",
                        JpegStreamSplitter::MAX_PENDING >> 20
                    ));
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(format!("cannot read its output: {e}")),
        }
    }
}

impl Running {
    /// Stops the command (if it has not stopped) and adds how it ended to `error`.
    fn stop(mut self, error: String) -> String {
        let exited = match self.child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                let _ = self.child.kill();
                None
            }
        };
        let status = self.child.wait().ok();
        // The log thread sees the pipe close once the command is gone; give it a moment to
        // take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        let last_words = self.stderr_tail.lock().map(|tail| tail.back().cloned()).unwrap_or_default();
        let mut error = error;
        if let (Some(status), true) = (status, exited.is_some()) {
            error.push_str(&format!(" ({status})"));
        }
        if let Some(line) = last_words {
            error.push_str(&format!("; its last message: {line}"));
        }
        error
    }
}

impl Drop for PipeCamera {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// Waits until the pipe has bytes (or has closed); false after `timeout` with nothing.
fn wait_readable(stdout: &ChildStdout, timeout: Duration) -> Result<bool, String> {
    let mut fds = [libc::pollfd { fd: stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd for the length given; the descriptor stays open meanwhile.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match ready {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("cannot wait for its output: {e}"));
                }
            }
        }
    }
}

impl FrameSource for PipeCamera {
    fn describe(&self) -> String {
        format!("MJPEG from the command `{}`", self.name())
    }

    /// Blocks until a frame arrives. A command that stops or fails is started again with
    /// back-off (1 s doubling to 30 s) for as long as it takes.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        loop {
            if self.running.is_none() {
                if self.start_failed {
                    self.backoff.wait();
                }
                self.try_start();
                continue;
            }
            let Some(jpeg) = self.splitter.next_frame() else {
                if let Err(error) = self.read_some() {
                    self.fail(error);
                }
                continue;
            };
            if !self.limiter.admit(Instant::now()) {
                continue;
            }
            match decode_jpeg(&jpeg) {
                Ok(image) => {
                    // Only a frame proves the command works: starting it is not enough.
                    if !self.online {
                        self.status.online(&self.name(), format!("MJPEG {}x{}", image.width(), image.height()));
                        self.online = true;
                        self.start_failed = false;
                        self.backoff.reset();
                    }
                    self.bad_frames_in_a_row = 0;
                    let seq = self.seq;
                    self.seq += 1;
                    return Ok(Some(Frame { seq, captured_at: SystemTime::now(), image: Arc::new(image) }));
                }
                Err(problem) => {
                    self.bad_frames_in_a_row += 1;
                    if self.bad_frames_in_a_row == 1 {
                        tracing::warn!("camera command: a frame cannot be decoded, skipping it: {problem}");
                    }
                    if self.bad_frames_in_a_row >= MAX_BAD_FRAMES {
                        self.fail(format!("{MAX_BAD_FRAMES} frames in a row cannot be decoded: {problem}"));
                    }
                }
            }
        }
    }
}
