//! The emulated camera: per open descriptor a vb2-like buffer queue, and the ioctls answered on it.

use std::collections::VecDeque;
use std::ffi::c_void;

use libc::{c_int, EAGAIN, EBUSY, EFAULT, EINVAL, ENODEV, ENOTTY};

use crate::config::{nearest_rate, Config, PixFmt};
use crate::real;
use crate::uapi::*;

/// What an ioctl came to: done (0 or an errno), or a blocking DQBUF that must wait, without the
/// lock, until the given monotonic time (`None`: until something changes) and then try again.
pub enum Outcome {
    Done(Result<(), c_int>),
    WaitUntil(Option<u64>),
}

/// What `poll` sees on an emulated descriptor.
pub enum PollState {
    /// Unplugged: POLLERR|POLLHUP.
    Gone,
    /// Not streaming: POLLERR, as vb2 answers.
    Error,
    Readable,
    /// Nothing to read before the given monotonic time (`None`: no buffer is queued).
    NotBefore(Option<u64>),
}

pub struct Emulator {
    open: Vec<OpenFd>,
    /// The frame rate S_PARM set, in force for every descriptor (it is the device's, as in V4L2).
    rate: u32,
    /// The node's identity when `rate` was set; a replugged camera starts again at its default.
    rate_node: (u64, u64),
}

struct OpenFd {
    fd: c_int,
    /// (st_dev, st_ino) of the node this descriptor opened; a node that is gone or another file
    /// means the camera it opened was unplugged.
    node: (u64, u64),
    dead: bool,
    queue: Option<Queue>,
}

#[derive(Clone, Copy, PartialEq)]
enum BufState {
    Dequeued,
    Queued,
    Done,
}

struct Buf {
    state: BufState,
    mapped: bool,
    bytesused: u32,
    sequence: u32,
    timestamp_ns: u64,
}

/// The buffers of one REQBUFS. Their memory is a memfd: the application's mmap maps it and the
/// emulator writes frames through its own mapping of it, so every view sees the same bytes.
struct Queue {
    memfd: c_int,
    view: usize,
    view_len: usize,
    length: u32,
    /// Offset between buffers in the memfd: `length` rounded up to a page.
    stride: usize,
    bufs: Vec<Buf>,
    queued: VecDeque<usize>,
    done: VecDeque<usize>,
    streaming: bool,
    start_ns: u64,
    period_ns: u64,
    /// Sequence number of the next frame the camera delivers.
    next_seq: u64,
    /// The stall file was there at the last `advance`.
    stalled: bool,
}

impl Drop for Queue {
    fn drop(&mut self) {
        // The application's own mappings keep the memory alive until it unmaps them.
        unsafe {
            real::munmap(self.view as *mut c_void, self.view_len);
            real::close(self.memfd);
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// (st_dev, st_ino) of the camera node as it is now, or `None` when it is gone.
pub fn node_now(config: &Config) -> Option<(u64, u64)> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::stat(config.device.as_ptr(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Whether `OUTPOST_V4L2_EMU_STALL` names a file that exists now.
fn stall_now(config: &Config) -> bool {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    config.stall.as_ref().is_some_and(|path| unsafe { libc::stat(path.as_ptr(), &mut st) } == 0)
}

impl Emulator {
    pub const fn new() -> Self {
        Emulator { open: Vec::new(), rate: 0, rate_node: (0, 0) }
    }

    pub fn is_emulated(&self, fd: c_int) -> bool {
        self.open.iter().any(|o| o.fd == fd)
    }

    pub fn register(&mut self, fd: c_int, node: (u64, u64)) {
        // A descriptor closed behind our back (close_range, a raw syscall) may come back.
        self.open.retain(|o| o.fd != fd);
        self.open.push(OpenFd { fd, node, dead: false, queue: None });
    }

    /// Forgets `fd`; true when it was emulated.
    pub fn unregister(&mut self, fd: c_int) -> bool {
        let before = self.open.len();
        self.open.retain(|o| o.fd != fd);
        self.open.len() != before
    }

    pub fn count(&self) -> usize {
        self.open.len()
    }

    fn rate(&mut self, config: &Config, node: (u64, u64)) -> u32 {
        if self.rate == 0 || self.rate_node != node {
            self.rate = config.default_rate;
            self.rate_node = node;
        }
        self.rate
    }

    /// Index of `fd`'s entry, and whether its camera is still plugged in (checked on every call,
    /// so an unplug is seen at once; a descriptor from before an unplug stays dead after a replug).
    fn lookup(&mut self, config: &Config, fd: c_int) -> Option<(usize, bool)> {
        let index = self.open.iter().position(|o| o.fd == fd)?;
        let entry = &mut self.open[index];
        if !entry.dead && node_now(config) != Some(entry.node) {
            entry.dead = true;
            if let Some(queue) = &mut entry.queue {
                queue.streaming = false;
            }
        }
        Some((index, !entry.dead))
    }

    pub fn poll_state(&mut self, config: &Config, fd: c_int, now: u64) -> Option<PollState> {
        let (index, alive) = self.lookup(config, fd)?;
        if !alive {
            return Some(PollState::Gone);
        }
        let Some(queue) = self.open[index].queue.as_mut().filter(|q| q.streaming) else {
            return Some(PollState::Error);
        };
        queue.advance(config, now);
        Some(if !queue.done.is_empty() { PollState::Readable } else { PollState::NotBefore(queue.next_due()) })
    }

    /// mmap of a buffer: the memfd and the offset in it to map, after checking `offset` and `len`.
    pub fn map_target(&mut self, config: &Config, fd: c_int, offset: i64, len: usize) -> Result<(c_int, i64), c_int> {
        let (index, alive) = self.lookup(config, fd).ok_or(EINVAL)?;
        if !alive {
            return Err(ENODEV);
        }
        let queue = self.open[index].queue.as_mut().ok_or(EINVAL)?;
        let buf = usize::try_from(offset).ok().filter(|o| o % queue.stride == 0).map(|o| o / queue.stride);
        let buf = buf.filter(|&b| b < queue.bufs.len() && len > 0 && len <= queue.stride).ok_or(EINVAL)?;
        queue.bufs[buf].mapped = true;
        Ok((queue.memfd, offset))
    }

    pub fn ioctl(&mut self, config: &Config, fd: c_int, request: u32, arg: *mut c_void) -> Outcome {
        let Some((index, alive)) = self.lookup(config, fd) else { return Outcome::Done(Err(EINVAL)) };
        if !alive {
            return Outcome::Done(Err(ENODEV));
        }
        if arg.is_null() {
            return Outcome::Done(Err(EFAULT));
        }
        let node = self.open[index].node;
        let rate = self.rate(config, node);
        let mut new_rate = None;
        let entry = &mut self.open[index];
        // SAFETY (all casts below): the request number encodes the argument's type and size, and
        // the caller passed a pointer to it, as the kernel would trust.
        let result = unsafe {
            match request {
                VIDIOC_QUERYCAP => querycap(config, &mut *(arg as *mut Capability)),
                VIDIOC_ENUM_FMT => enum_fmt(config, &mut *(arg as *mut FmtDesc)),
                VIDIOC_ENUM_FRAMESIZES => enum_framesizes(config, &mut *(arg as *mut FrmSizeEnum)),
                VIDIOC_ENUM_FRAMEINTERVALS => enum_frameintervals(config, &mut *(arg as *mut FrmIvalEnum)),
                VIDIOC_G_FMT | VIDIOC_TRY_FMT => fill_format(config, &mut *(arg as *mut Format)),
                VIDIOC_S_FMT if entry.queue.is_some() => Err(EBUSY),
                VIDIOC_S_FMT => fill_format(config, &mut *(arg as *mut Format)),
                VIDIOC_G_PARM => fill_parm(&mut *(arg as *mut StreamParm), rate),
                VIDIOC_S_PARM => {
                    let parm = &mut *(arg as *mut StreamParm);
                    if entry.queue.as_ref().is_some_and(|q| q.streaming) {
                        Err(EBUSY)
                    } else if parm.type_ != BUF_TYPE_VIDEO_CAPTURE {
                        Err(EINVAL)
                    } else {
                        let t = &parm.capture.timeperframe;
                        let rate = nearest_rate(&config.rates, t.numerator, t.denominator);
                        new_rate = Some(rate);
                        fill_parm(parm, rate)
                    }
                }
                VIDIOC_ENUMINPUT => {
                    let input = &mut *(arg as *mut Input);
                    if input.index != 0 {
                        Err(EINVAL)
                    } else {
                        set_str(&mut input.name, "Camera 1");
                        input.type_ = INPUT_TYPE_CAMERA;
                        (input.audioset, input.tuner, input.std, input.status, input.capabilities) = (0, 0, 0, 0, 0);
                        Ok(())
                    }
                }
                VIDIOC_G_INPUT => {
                    *(arg as *mut c_int) = 0;
                    Ok(())
                }
                VIDIOC_S_INPUT => {
                    if *(arg as *const c_int) == 0 {
                        Ok(())
                    } else {
                        Err(EINVAL)
                    }
                }
                VIDIOC_REQBUFS => reqbufs(config, entry, &mut *(arg as *mut RequestBuffers)),
                VIDIOC_QUERYBUF => with_buffer(entry, &mut *(arg as *mut Buffer), |queue, i, b| {
                    queue.describe(i, b);
                    Ok(())
                }),
                VIDIOC_QBUF => with_buffer(entry, &mut *(arg as *mut Buffer), |queue, i, b| {
                    if queue.bufs[i].state != BufState::Dequeued {
                        return Err(EINVAL);
                    }
                    queue.bufs[i].state = BufState::Queued;
                    queue.queued.push_back(i);
                    queue.describe(i, b);
                    Ok(())
                }),
                VIDIOC_DQBUF => return dqbuf(config, entry, &mut *(arg as *mut Buffer)),
                VIDIOC_STREAMON | VIDIOC_STREAMOFF => {
                    let on = request == VIDIOC_STREAMON;
                    match (*(arg as *const u32), entry.queue.as_mut()) {
                        (BUF_TYPE_VIDEO_CAPTURE, Some(queue)) => {
                            queue.stream(on, rate);
                            Ok(())
                        }
                        // STREAMOFF without buffers is harmless; STREAMON needs them.
                        (BUF_TYPE_VIDEO_CAPTURE, None) if !on => Ok(()),
                        _ => Err(EINVAL),
                    }
                }
                _ if (request >> 8) & 0xFF == u32::from(b'V') && CONTROL_IOCTL_NRS.contains(&(request & 0xFF)) => {
                    Err(EINVAL)
                }
                _ => Err(ENOTTY),
            }
        };
        if let Some(rate) = new_rate {
            self.rate = rate;
        }
        Outcome::Done(result)
    }
}

fn querycap(config: &Config, cap: &mut Capability) -> Result<(), c_int> {
    set_str(&mut cap.driver, "outpost-emu");
    set_str(&mut cap.card, &config.card);
    set_str(&mut cap.bus_info, "usb-emulated");
    cap.version = (6 << 16) | (1 << 8); // the kernel version a driver reports: 6.1.0
    cap.device_caps = CAP_VIDEO_CAPTURE | CAP_STREAMING;
    cap.capabilities = cap.device_caps | CAP_DEVICE_CAPS;
    cap.reserved = [0; 3];
    Ok(())
}

fn enum_fmt(config: &Config, desc: &mut FmtDesc) -> Result<(), c_int> {
    if desc.index != 0 || desc.type_ != BUF_TYPE_VIDEO_CAPTURE {
        return Err(EINVAL);
    }
    let (flags, description) = match config.format {
        PixFmt::Yuyv => (0, "YUYV 4:2:2"),
        PixFmt::Mjpg => (FMT_FLAG_COMPRESSED, "Motion-JPEG"),
    };
    desc.flags = flags;
    set_str(&mut desc.description, description);
    desc.pixelformat = config.format.fourcc();
    desc.mbus_code = 0;
    desc.reserved = [0; 3];
    Ok(())
}

fn enum_framesizes(config: &Config, size: &mut FrmSizeEnum) -> Result<(), c_int> {
    if size.index != 0 || size.pixel_format != config.format.fourcc() {
        return Err(EINVAL);
    }
    size.type_ = FRMSIZE_TYPE_DISCRETE;
    size.size = [config.width, config.height, 0, 0, 0, 0];
    size.reserved = [0; 2];
    Ok(())
}

fn enum_frameintervals(config: &Config, ival: &mut FrmIvalEnum) -> Result<(), c_int> {
    let matches =
        ival.pixel_format == config.format.fourcc() && (ival.width, ival.height) == (config.width, config.height);
    let rate = config.rates.get(ival.index as usize).filter(|_| matches).ok_or(EINVAL)?;
    ival.type_ = FRMIVAL_TYPE_DISCRETE;
    ival.interval = [1, *rate, 0, 0, 0, 0];
    ival.reserved = [0; 2];
    Ok(())
}

/// G_FMT, and S_FMT/TRY_FMT as a driver answers them: never refused for the capture type, the
/// request adjusted to the one format the camera has.
fn fill_format(config: &Config, format: &mut Format) -> Result<(), c_int> {
    if format.type_ != BUF_TYPE_VIDEO_CAPTURE {
        return Err(EINVAL);
    }
    format.pix = PixFormat {
        width: config.width,
        height: config.height,
        pixelformat: config.format.fourcc(),
        field: FIELD_NONE,
        bytesperline: config.bytesperline(),
        sizeimage: config.sizeimage,
        colorspace: match config.format {
            PixFmt::Yuyv => COLORSPACE_SRGB,
            PixFmt::Mjpg => COLORSPACE_JPEG,
        },
        priv_: 0,
        flags: 0,
        ycbcr_enc: 0,
        quantization: 0,
        xfer_func: 0,
    };
    Ok(())
}

fn fill_parm(parm: &mut StreamParm, rate: u32) -> Result<(), c_int> {
    if parm.type_ != BUF_TYPE_VIDEO_CAPTURE {
        return Err(EINVAL);
    }
    parm.capture = CaptureParm {
        capability: CAP_TIMEPERFRAME,
        capturemode: 0,
        timeperframe: Fract { numerator: 1, denominator: rate },
        extendedmode: 0,
        readbuffers: 0,
        reserved: [0; 4],
    };
    Ok(())
}

fn reqbufs(config: &Config, entry: &mut OpenFd, req: &mut RequestBuffers) -> Result<(), c_int> {
    if req.type_ != BUF_TYPE_VIDEO_CAPTURE || req.memory != MEMORY_MMAP {
        return Err(EINVAL);
    }
    if entry.queue.as_ref().is_some_and(|q| q.streaming) {
        return Err(EBUSY);
    }
    entry.queue = None;
    req.capabilities = BUF_CAP_SUPPORTS_MMAP;
    if req.count == 0 {
        return Ok(());
    }
    let count = req.count.clamp(1, 8);
    entry.queue = Some(Queue::new(count as usize, config.sizeimage)?);
    req.count = count;
    Ok(())
}

/// Runs `f` on the queue and the buffer a QUERYBUF/QBUF names, once the request is checked.
fn with_buffer(
    entry: &mut OpenFd,
    b: &mut Buffer,
    f: impl FnOnce(&mut Queue, usize, &mut Buffer) -> Result<(), c_int>,
) -> Result<(), c_int> {
    let queue = entry.queue.as_mut().ok_or(EINVAL)?;
    let i = b.index as usize;
    if b.type_ != BUF_TYPE_VIDEO_CAPTURE || b.memory != MEMORY_MMAP || i >= queue.bufs.len() {
        return Err(EINVAL);
    }
    f(queue, i, b)
}

fn dqbuf(config: &Config, entry: &mut OpenFd, b: &mut Buffer) -> Outcome {
    let Some(queue) = entry.queue.as_mut() else { return Outcome::Done(Err(EINVAL)) };
    if b.type_ != BUF_TYPE_VIDEO_CAPTURE || b.memory != MEMORY_MMAP || !queue.streaming {
        return Outcome::Done(Err(EINVAL));
    }
    queue.advance(config, monotonic_ns());
    if let Some(i) = queue.done.pop_front() {
        queue.describe(i, b);
        queue.bufs[i].state = BufState::Dequeued;
        return Outcome::Done(Ok(()));
    }
    // The status flags of the real descriptor are the ones fcntl(F_SETFL) last set.
    let nonblocking = unsafe { libc::fcntl(entry.fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    if nonblocking {
        Outcome::Done(Err(EAGAIN))
    } else {
        Outcome::WaitUntil(queue.next_due())
    }
}

impl Queue {
    fn new(count: usize, length: u32) -> Result<Queue, c_int> {
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let stride = (length as usize).div_ceil(page) * page;
        let view_len = stride * count;
        unsafe {
            let memfd = libc::memfd_create(c"outpost-v4l2-emu".as_ptr(), libc::MFD_CLOEXEC);
            if memfd < 0 {
                return Err(errno());
            }
            if libc::ftruncate(memfd, view_len as libc::off_t) != 0 {
                let e = errno();
                real::close(memfd);
                return Err(e);
            }
            let view = real::mmap(
                std::ptr::null_mut(),
                view_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd,
                0,
            );
            if view == libc::MAP_FAILED {
                let e = errno();
                real::close(memfd);
                return Err(e);
            }
            let bufs = (0..count)
                .map(|_| Buf { state: BufState::Dequeued, mapped: false, bytesused: 0, sequence: 0, timestamp_ns: 0 })
                .collect();
            Ok(Queue {
                memfd,
                view: view as usize,
                view_len,
                length,
                stride,
                bufs,
                queued: VecDeque::new(),
                done: VecDeque::new(),
                streaming: false,
                start_ns: 0,
                period_ns: 0,
                next_seq: 0,
                stalled: false,
            })
        }
    }

    fn stream(&mut self, on: bool, rate: u32) {
        if on && !self.streaming {
            self.streaming = true;
            self.start_ns = monotonic_ns();
            self.period_ns = 1_000_000_000 / u64::from(rate.max(1));
            self.next_seq = 0;
            self.stalled = false;
        } else if !on {
            // STREAMOFF hands every buffer back to the application, filled or not.
            self.streaming = false;
            self.queued.clear();
            self.done.clear();
            for buf in &mut self.bufs {
                buf.state = BufState::Dequeued;
            }
        }
    }

    fn due(&self, seq: u64) -> u64 {
        // Frame n arrives one period after frame n-1, the first one period after STREAMON.
        self.start_ns + (seq + 1) * self.period_ns
    }

    /// When the next frame fills a buffer, if one is queued for it and the camera is not stalled
    /// (a stall has no due time: waiters recheck it every 50 ms).
    fn next_due(&self) -> Option<u64> {
        (self.streaming && !self.stalled && !self.queued.is_empty()).then(|| self.due(self.next_seq))
    }

    /// Delivers every frame due by `now` into the queued buffers, oldest first; a frame that finds
    /// no buffer queued is dropped, as a camera drops it, and its sequence number skipped.
    fn advance(&mut self, config: &Config, now: u64) {
        if !self.streaming {
            return;
        }
        let stalled = stall_now(config);
        if self.stalled && !stalled {
            // Pacing restarts: the next frame is one period after the stall ended, none is owed.
            self.start_ns = now.saturating_sub(self.next_seq * self.period_ns);
        }
        self.stalled = stalled;
        while !stalled && self.streaming && self.due(self.next_seq) <= now {
            let Some(i) = self.queued.pop_front() else {
                self.next_seq = self.next_seq.max((now - self.start_ns) / self.period_ns);
                break;
            };
            let frame = config.frame(self.next_seq);
            let n = frame.len().min(self.length as usize);
            // SAFETY: buffer i occupies [i*stride, i*stride+length) of the view, which we own.
            unsafe {
                std::ptr::copy_nonoverlapping(frame.as_ptr(), (self.view + i * self.stride) as *mut u8, n);
            }
            let timestamp_ns = self.due(self.next_seq);
            let buf = &mut self.bufs[i];
            buf.state = BufState::Done;
            buf.bytesused = n as u32;
            buf.sequence = self.next_seq as u32;
            buf.timestamp_ns = timestamp_ns;
            self.done.push_back(i);
            self.next_seq += 1;
        }
    }

    fn describe(&self, i: usize, b: &mut Buffer) {
        let buf = &self.bufs[i];
        b.index = i as u32;
        b.type_ = BUF_TYPE_VIDEO_CAPTURE;
        b.memory = MEMORY_MMAP;
        b.field = FIELD_NONE;
        b.length = self.length;
        b.m = BufferM { offset: (i * self.stride) as u32 };
        b.flags = BUF_FLAG_TIMESTAMP_MONOTONIC
            | if buf.mapped { BUF_FLAG_MAPPED } else { 0 }
            | match buf.state {
                BufState::Dequeued => 0,
                BufState::Queued => BUF_FLAG_QUEUED,
                BufState::Done => BUF_FLAG_DONE,
            };
        let done = buf.state == BufState::Done;
        b.bytesused = if done { buf.bytesused } else { 0 };
        b.sequence = if done { buf.sequence } else { 0 };
        let ts = if done { buf.timestamp_ns } else { 0 };
        b.timestamp = Timeval { tv_sec: (ts / 1_000_000_000) as i64, tv_usec: (ts % 1_000_000_000 / 1000) as i64 };
        b.timecode = Timecode { type_: 0, flags: 0, frames: 0, seconds: 0, minutes: 0, hours: 0, userbits: [0; 4] };
        b.reserved2 = 0;
        b.request_fd = 0;
    }
}

pub fn errno() -> c_int {
    unsafe { *libc::__errno_location() }
}
