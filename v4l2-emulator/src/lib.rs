//! An LD_PRELOAD library that makes an ordinary file act as a V4L2 camera, so the daemon's real
//! V4L2 path (the `v4l` crate) can be tested without a camera or kernel modules. See README.md.
//!
//! It interposes the libc functions the `v4l` crate reaches the kernel through (open*, close,
//! ioctl, syscall(SYS_ioctl), mmap*, poll), answers them for descriptors of the emulated node and
//! hands everything else to the next definition (`dlsym(RTLD_NEXT)`).
//!
//! Variadic C functions (open, ioctl, syscall) are defined here with fixed trailing integer or
//! pointer parameters, because stable Rust cannot define variadic functions. That is sound on
//! x86_64 SysV and aarch64 Linux (AAPCS64), where variadic integer arguments travel in the same
//! registers and stack slots as fixed ones; a caller that passes fewer arguments leaves garbage in
//! the extra ones, which are forwarded untouched and ignored, as glibc's own wrappers do.

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
compile_error!(
    "outpost-v4l2-emulator defines variadic libc functions with fixed parameters, which is only sound \
     on x86_64 and aarch64 Linux"
);

mod config;
mod device;
mod uapi;

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use libc::{c_char, c_int, c_long, c_uint, c_ulong, nfds_t, off_t, pollfd, size_t};

use config::Config;
use device::{monotonic_ns, node_now, Emulator, Outcome, PollState};

/// The next definitions of the interposed functions, found once with `dlsym(RTLD_NEXT)`. They are
/// called through variadic pointer types where the C function is variadic.
pub(crate) mod real {
    use std::ffi::CStr;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use libc::{c_char, c_int, c_long, c_ulong, c_void, nfds_t, off_t, pollfd, size_t};

    fn resolve(slot: &AtomicUsize, name: &CStr) -> usize {
        let mut address = slot.load(Relaxed);
        if address == 0 {
            address = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
            if address == 0 {
                let msg = b"outpost-v4l2-emu: a libc function to forward to is missing\n";
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::abort();
                }
            }
            slot.store(address, Relaxed);
        }
        address
    }

    macro_rules! next {
        ($name:ident, $symbol:literal, fn($($arg:ident: $ty:ty),*) -> $ret:ty, $fnty:ty) => {
            pub unsafe fn $name($($arg: $ty),*) -> $ret {
                static SLOT: AtomicUsize = AtomicUsize::new(0);
                let f: $fnty = unsafe { std::mem::transmute(resolve(&SLOT, $symbol)) };
                unsafe { f($($arg),*) }
            }
        };
    }

    type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    type MmapFn = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    next!(open, c"open", fn(path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int, OpenFn);
    next!(open64, c"open64", fn(path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int, OpenFn);
    next!(openat, c"openat", fn(dir: c_int, path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int, OpenatFn);
    next!(
        openat64,
        c"openat64",
        fn(dir: c_int, path: *const c_char, flags: c_int, mode: libc::c_uint) -> c_int,
        OpenatFn
    );
    next!(close, c"close", fn(fd: c_int) -> c_int, unsafe extern "C" fn(c_int) -> c_int);
    next!(
        ioctl,
        c"ioctl",
        fn(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int,
        unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int
    );
    next!(
        syscall,
        c"syscall",
        fn(num: c_long, a1: c_long, a2: c_long, a3: c_long, a4: c_long, a5: c_long, a6: c_long) -> c_long,
        unsafe extern "C" fn(c_long, ...) -> c_long
    );
    next!(
        mmap,
        c"mmap",
        fn(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off_t) -> *mut c_void,
        MmapFn
    );
    next!(
        mmap64,
        c"mmap64",
        fn(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off_t) -> *mut c_void,
        MmapFn
    );
    next!(
        poll,
        c"poll",
        fn(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int,
        unsafe extern "C" fn(*mut pollfd, nfds_t, c_int) -> c_int
    );

    /// Not interposed (the buffers are memfd mappings the kernel unmaps like any other).
    pub unsafe fn munmap(addr: *mut c_void, len: size_t) -> c_int {
        unsafe { libc::munmap(addr, len) }
    }
}

thread_local! {
    /// Set while this thread runs emulator code: any libc call that code makes (std reading the
    /// media file, the Mutex's futex, stat) goes straight to the real function.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

struct Busy;

impl Busy {
    fn enter() -> Option<Busy> {
        BUSY.try_with(|busy| (!busy.replace(true)).then_some(Busy)).ok().flatten()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|busy| busy.set(false));
    }
}

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
static STATE: Mutex<Emulator> = Mutex::new(Emulator::new());
/// How many emulated descriptors are open, so calls on other descriptors skip the lock.
static EMULATED: AtomicUsize = AtomicUsize::new(0);

/// The camera to emulate; only called with a `Busy` held, since reading it opens the media file.
fn config() -> Option<&'static Config> {
    CONFIG
        .get_or_init(|| match Config::from_env() {
            Ok(config) => config,
            Err(problem) => {
                say(&format!("{problem}; no camera is emulated"));
                None
            }
        })
        .as_ref()
}

fn state() -> MutexGuard<'static, Emulator> {
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn say(message: &str) {
    let line = format!("outpost-v4l2-emu: {message}\n");
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn set_errno(e: c_int) {
    unsafe { *libc::__errno_location() = e };
}

/// Registers `fd` when it is the camera node (however it was named: a symlink, a relative path).
fn after_open(fd: c_int, flags: c_int) -> c_int {
    if fd < 0 || flags & libc::O_PATH != 0 {
        return fd;
    }
    let Some(_busy) = Busy::enter() else { return fd };
    let Some(config) = config() else { return fd };
    let Some(node) = node_now(config) else { return fd };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || (st.st_dev, st.st_ino) != node {
        return fd;
    }
    let mut state = state();
    state.register(fd, node);
    EMULATED.store(state.count(), Relaxed);
    if config.log {
        say(&format!("fd {fd}: open"));
    }
    fd
}

fn emulated_ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> Option<c_int> {
    if EMULATED.load(Relaxed) == 0 {
        return None;
    }
    let _busy = Busy::enter()?;
    let config = config()?;
    // The kernel takes the request as 32 bits; glibc's unsigned long may carry sign extension.
    let request = request as u32;
    loop {
        let outcome = {
            let mut state = state();
            if !state.is_emulated(fd) {
                return None;
            }
            state.ioctl(config, fd, request, arg)
        };
        let result = match outcome {
            Outcome::Done(result) => result,
            Outcome::WaitUntil(until) => {
                // A blocking DQBUF: wait for the frame, rechecking (unplug, STREAMOFF elsewhere).
                sleep_until(until, None);
                continue;
            }
        };
        if config.log {
            let name = uapi::ioctl_name(request);
            match result {
                Ok(()) => say(&format!("fd {fd}: {name}")),
                Err(e) => say(&format!("fd {fd}: {name} ({request:#010x}) -> errno {e}")),
            }
        }
        return Some(match result {
            Ok(()) => 0,
            Err(e) => {
                set_errno(e);
                -1
            }
        });
    }
}

/// Sleeps until the earliest of `a`, `b` and 50 ms from now (so an unplug is noticed soon).
fn sleep_until(a: Option<u64>, b: Option<u64>) {
    let now = monotonic_ns();
    let until = [a, b, Some(now + 50_000_000)].into_iter().flatten().min().unwrap_or(now);
    std::thread::sleep(Duration::from_nanos(until.saturating_sub(now)));
}

fn emulated_mmap(len: size_t, prot: c_int, flags: c_int, fd: c_int, offset: off_t) -> Option<*mut c_void> {
    if fd < 0 || EMULATED.load(Relaxed) == 0 {
        return None;
    }
    let _busy = Busy::enter()?;
    let config = config()?;
    let mut state = state();
    if !state.is_emulated(fd) {
        return None;
    }
    Some(match state.map_target(config, fd, offset, len) {
        // Mapped where the kernel chooses; a V4L2 application passes no address.
        Ok((memfd, offset)) => unsafe { real::mmap(std::ptr::null_mut(), len, prot, flags, memfd, offset) },
        Err(e) => {
            set_errno(e);
            libc::MAP_FAILED
        }
    })
}

/// poll on emulated descriptors. Limit: a set that mixes them with other descriptors reports
/// nothing for the others (the daemon polls one camera descriptor at a time).
fn emulated_poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> Option<c_int> {
    if fds.is_null() || nfds == 0 || EMULATED.load(Relaxed) == 0 {
        return None;
    }
    let _busy = Busy::enter()?;
    let config = config()?;
    let fds = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
    if !fds.iter().any(|p| state().is_emulated(p.fd)) {
        return None;
    }
    let deadline = u64::try_from(timeout).ok().map(|ms| monotonic_ns() + ms * 1_000_000);
    loop {
        let now = monotonic_ns();
        let mut ready = 0;
        let mut wake: Option<u64> = None;
        {
            let mut state = state();
            for p in fds.iter_mut() {
                p.revents = match state.poll_state(config, p.fd, now) {
                    None => 0,
                    Some(PollState::Gone) => libc::POLLERR | libc::POLLHUP,
                    Some(PollState::Error) => libc::POLLERR,
                    Some(PollState::Readable) => p.events & (libc::POLLIN | libc::POLLRDNORM),
                    Some(PollState::NotBefore(due)) => {
                        wake = [wake, due].into_iter().flatten().min();
                        0
                    }
                };
                ready += c_int::from(p.revents != 0);
            }
        }
        if ready > 0 {
            return Some(ready);
        }
        if deadline.is_some_and(|d| monotonic_ns() >= d) {
            return Some(0);
        }
        sleep_until(wake, deadline);
    }
}

// The interposed functions. Each is only ever called by C code through the symbol, with the
// arguments the C prototype names; their safety contract is that prototype's.

/// # Safety
/// As open(2).
#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    after_open(unsafe { real::open(path, flags, mode) }, flags)
}

/// # Safety
/// As open(2).
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    after_open(unsafe { real::open64(path, flags, mode) }, flags)
}

/// # Safety
/// As openat(2).
#[no_mangle]
pub unsafe extern "C" fn openat(dir: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    after_open(unsafe { real::openat(dir, path, flags, mode) }, flags)
}

/// # Safety
/// As openat(2).
#[no_mangle]
pub unsafe extern "C" fn openat64(dir: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    after_open(unsafe { real::openat64(dir, path, flags, mode) }, flags)
}

/// # Safety
/// As close(2).
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if EMULATED.load(Relaxed) > 0 {
        if let Some(_busy) = Busy::enter() {
            let mut state = state();
            // Forgotten before the real close, after which another thread may get the number.
            if state.unregister(fd) {
                EMULATED.store(state.count(), Relaxed);
                if CONFIG.get().and_then(Option::as_ref).is_some_and(|c| c.log) {
                    say(&format!("fd {fd}: close"));
                }
            }
        }
    }
    unsafe { real::close(fd) }
}

/// # Safety
/// As ioctl(2).
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    match emulated_ioctl(fd, request, arg) {
        Some(result) => result,
        None => unsafe { real::ioctl(fd, request, arg) },
    }
}

/// The `v4l` crate issues its ioctls as `syscall(SYS_ioctl, ...)`; every other call is forwarded
/// with all six argument registers.
///
/// # Safety
/// As syscall(2).
#[no_mangle]
pub unsafe extern "C" fn syscall(
    num: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    if num == libc::SYS_ioctl {
        if let Some(result) = emulated_ioctl(a1 as c_int, a2 as c_ulong, a3 as *mut c_void) {
            return c_long::from(result);
        }
    }
    unsafe { real::syscall(num, a1, a2, a3, a4, a5, a6) }
}

/// # Safety
/// As mmap(2).
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    match emulated_mmap(len, prot, flags, fd, offset) {
        Some(result) => result,
        None => unsafe { real::mmap(addr, len, prot, flags, fd, offset) },
    }
}

/// # Safety
/// As mmap(2).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    match emulated_mmap(len, prot, flags, fd, offset) {
        Some(result) => result,
        None => unsafe { real::mmap64(addr, len, prot, flags, fd, offset) },
    }
}

/// # Safety
/// As poll(2).
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    match emulated_poll(fds, nfds, timeout) {
        Some(result) => result,
        None => unsafe { real::poll(fds, nfds, timeout) },
    }
}
