//! MJPEG from a command's standard output. The Pi's CSI camera modules are driven by libcamera,
//! not plain V4L2, and `rpicam-vid --codec mjpeg -t 0 -o -` is the supported way to stream them;
//! any other program that writes JPEG frames back to back works the same way.
//!
//! The command runs without a shell, in a process group of its own (so that a wrapper script's
//! children stop with it). When it exits, stalls or writes something that is not MJPEG, it is
//! stopped and started again with back-off, like a camera that was unplugged.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::mjpeg::{decode_jpeg, JpegStreamSplitter};
use super::pacing::RateLimiter;
use super::status::{Reconnect, StatusReporter, StopFlag};
use super::{Frame, FrameSource, SourceError};

/// A command that writes nothing for this long is taken as stalled (rpicam-vid needs a second or
/// two to start the sensor).
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait for output looks up to see whether the pipeline is stopping.
const STOP_CHECK: Duration = Duration::from_millis(250);
/// How long a stopped command gets to exit on SIGTERM before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_millis(500);

pub struct PipeCamera {
    command: Vec<String>,
    running: Option<Running>,
    splitter: JpegStreamSplitter,
    read_buffer: Vec<u8>,
    reconnect: Reconnect,
    limiter: RateLimiter,
    seq: u64,
    started_before: bool,
    restarts: u64,
}

/// The command while it runs.
struct Running {
    child: Child,
    stdout: ChildStdout,
    /// The last line it wrote to standard error: why it stopped, usually.
    last_message: Arc<Mutex<Option<String>>>,
}

impl PipeCamera {
    /// Starts the command now; if it cannot start, says so and tries again from `next_frame`.
    pub fn start(command: Vec<String>, fps: f64, status: StatusReporter, stop: StopFlag) -> Self {
        let mut camera = Self {
            reconnect: Reconnect::new("camera command", command.join(" "), status, stop),
            command,
            running: None,
            splitter: JpegStreamSplitter::default(),
            read_buffer: vec![0; 64 << 10],
            limiter: RateLimiter::new(Duration::from_secs_f64(1.0 / fps)),
            seq: 0,
            started_before: false,
            restarts: 0,
        };
        camera.try_start();
        camera
    }

    /// How often the command was started again after it stopped or failed.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    fn try_start(&mut self) {
        let Some((program, args)) = self.command.split_first() else {
            return self.reconnect.failed("the command is empty".into());
        };
        let spawned = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return self.reconnect.failed(format!("cannot start `{program}`: {e}")),
        };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            // Both were asked for as pipes: std always provides them.
            let _ = child.kill();
            let _ = child.wait();
            return self.reconnect.failed("its output pipes could not be set up".into());
        };
        let last_message = Arc::new(Mutex::new(None));
        let last = Arc::clone(&last_message);
        let name = program.clone();
        // The command's own log (rpicam-vid writes plenty) goes to ours at debug level; the
        // thread ends when the command's stderr closes.
        let spawned = std::thread::Builder::new().name("camera-command-log".into()).spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::debug!("{name}: {line}");
                if let Ok(mut last) = last.lock() {
                    *last = Some(line);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the thread that logs the camera command's messages: {e}");
        }
        if self.started_before {
            self.restarts += 1;
        }
        self.started_before = true;
        tracing::info!("camera command started (pid {}): {}", child.id(), self.reconnect.source());
        self.splitter.clear();
        self.running = Some(Running { child, stdout, last_message });
    }

    /// Stops a command that failed; the next `next_frame` starts it again after its back-off.
    fn fail(&mut self, error: String) {
        let error = match self.running.take() {
            Some(running) => running.stop(error),
            None => error,
        };
        self.reconnect.failed(error);
    }

    /// Reads what the command has written into the splitter. `Err` says why the stream is over;
    /// `Ok(false)`: the pipeline is stopping.
    fn read_some(&mut self) -> Result<bool, String> {
        let Some(running) = self.running.as_mut() else { return Err("not running".into()) };
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            if self.reconnect.stopping() {
                return Ok(false);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("wrote nothing for {} s", STALL_TIMEOUT.as_secs()));
            }
            if wait_readable(&running.stdout, left.min(STOP_CHECK))? {
                break;
            }
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
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(format!("cannot read its output: {e}")),
        }
    }
}

impl Running {
    /// Stops the command's process group (if the command has not exited) and adds how it ended
    /// to `error`.
    fn stop(mut self, mut error: String) -> String {
        // A command whose output ended is usually exiting: a moment lets its status be told.
        let exited = self.exited_within(Duration::from_millis(200));
        if !exited {
            self.terminate();
        }
        let status = self.child.wait().ok();
        // The log thread sees the pipe close once the command is gone; give it a moment to take
        // the last line.
        std::thread::sleep(Duration::from_millis(50));
        if let (Some(status), true) = (status, exited) {
            error.push_str(&format!(" ({status})"));
        }
        if let Some(line) = self.last_message.lock().ok().and_then(|last| last.clone()) {
            error.push_str(&format!("; its last message: {line}"));
        }
        error
    }

    /// SIGTERM to the whole group, SIGKILL after a grace period.
    fn terminate(&mut self) {
        let Ok(group) = i32::try_from(self.child.id()) else { return };
        // SAFETY: kill(2) with a negative pid signals the process group the child leads.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        if !self.exited_within(EXIT_GRACE) {
            // SAFETY: as above.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }

    fn exited_within(&mut self, time: Duration) -> bool {
        let deadline = Instant::now() + time;
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PipeCamera {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.terminate();
            let _ = running.child.wait();
        }
    }
}

/// Waits until the pipe has bytes (or has closed); false after `timeout` with nothing.
fn wait_readable(stdout: &ChildStdout, timeout: Duration) -> Result<bool, String> {
    let mut fds = [libc::pollfd { fd: stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd for the length given; the descriptor stays open meanwhile.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    match ready {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(format!("cannot wait for its output: {e}"))
            }
        }
    }
}

impl FrameSource for PipeCamera {
    fn describe(&self) -> String {
        format!("MJPEG from the command `{}`", self.reconnect.source())
    }

    /// Blocks until a frame arrives. A command that stops or fails is started again with
    /// back-off (1 s doubling to 30 s) for as long as it takes; `Ok(None)` once the pipeline stops.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        loop {
            if self.reconnect.stopping() {
                return Ok(None);
            }
            if self.running.is_none() {
                if self.reconnect.ready_to_open() {
                    self.try_start();
                }
                continue;
            }
            let jpeg = match self.splitter.next_frame() {
                Some(Ok(jpeg)) => jpeg,
                Some(Err(problem)) => {
                    if let Some(error) = self.reconnect.bad_frame(&problem) {
                        self.fail(error);
                    }
                    continue;
                }
                None => {
                    if let Err(error) = self.read_some() {
                        self.fail(error);
                    }
                    continue;
                }
            };
            if !self.limiter.admit(Instant::now()) {
                continue;
            }
            match decode_jpeg(&jpeg) {
                Ok(image) => {
                    // Only a frame proves the command works: starting it is not enough.
                    self.reconnect.delivered(|| format!("MJPEG {}x{}", image.width(), image.height()));
                    let seq = self.seq;
                    self.seq += 1;
                    return Ok(Some(Frame { seq, captured_at: SystemTime::now(), image: Arc::new(image) }));
                }
                Err(problem) => {
                    if let Some(error) = self.reconnect.bad_frame(&problem) {
                        self.fail(error);
                    }
                }
            }
        }
    }
}
