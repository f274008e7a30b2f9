//! Hand-written declarations of alsa-lib's external I/O plugin API (`alsa/pcm_ioplug.h` and
//! `alsa/pcm_external.h`), which alsa-sys does not bind. They match the header of alsa-lib 1.2.8
//! (Debian 12, ioplug protocol 1.0.2) field for field; the offsets are checked at compile time
//! against what `offsetof` gives for that header on 64-bit Linux (x86_64 and aarch64 alike).
//! The plain PCM and config types come from alsa-sys, which also links libasound.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_ushort};

pub use alsa_sys::{
    snd_config_t, snd_output_t, snd_pcm_access_t, snd_pcm_channel_area_t, snd_pcm_chmap_query_t, snd_pcm_chmap_t,
    snd_pcm_format_t, snd_pcm_hw_params_t, snd_pcm_sframes_t, snd_pcm_state_t, snd_pcm_stream_t, snd_pcm_sw_params_t,
    snd_pcm_t, snd_pcm_uframes_t,
};

/// `SND_PCM_IOPLUG_VERSION`: (major 1 << 16) | (minor 0 << 8) | tiny 2.
pub const SND_PCM_IOPLUG_VERSION: c_uint = 0x01_00_02;

/// `SND_PCM_IOPLUG_FLAG_MONOTONIC`: timestamps from CLOCK_MONOTONIC.
pub const SND_PCM_IOPLUG_FLAG_MONOTONIC: c_uint = 1 << 1;

/// The hw constraint kinds of `snd_pcm_ioplug_set_param_*` (`SND_PCM_IOPLUG_HW_*`).
pub const SND_PCM_IOPLUG_HW_ACCESS: c_int = 0;
pub const SND_PCM_IOPLUG_HW_FORMAT: c_int = 1;
pub const SND_PCM_IOPLUG_HW_CHANNELS: c_int = 2;
pub const SND_PCM_IOPLUG_HW_RATE: c_int = 3;
pub const SND_PCM_IOPLUG_HW_PERIOD_BYTES: c_int = 4;
pub const SND_PCM_IOPLUG_HW_BUFFER_BYTES: c_int = 5;
pub const SND_PCM_IOPLUG_HW_PERIODS: c_int = 6;

/// `struct snd_pcm_ioplug`. The plugin fills the first eight fields before
/// `snd_pcm_ioplug_create`; alsa-lib fills the rest (`appl_ptr` and `hw_ptr` are `volatile`).
#[repr(C)]
pub struct snd_pcm_ioplug_t {
    pub version: c_uint,
    pub name: *const c_char,
    pub flags: c_uint,
    pub poll_fd: c_int,
    pub poll_events: c_uint,
    pub mmap_rw: c_uint,
    pub callback: *const snd_pcm_ioplug_callback_t,
    pub private_data: *mut std::ffi::c_void,
    pub pcm: *mut snd_pcm_t,
    pub stream: snd_pcm_stream_t,
    pub state: snd_pcm_state_t,
    pub appl_ptr: snd_pcm_uframes_t,
    pub hw_ptr: snd_pcm_uframes_t,
    pub nonblock: c_int,
    pub access: snd_pcm_access_t,
    pub format: snd_pcm_format_t,
    pub channels: c_uint,
    pub rate: c_uint,
    pub period_size: snd_pcm_uframes_t,
    pub buffer_size: snd_pcm_uframes_t,
}

type Io = *mut snd_pcm_ioplug_t;

/// `struct snd_pcm_ioplug_callback`: `start`, `stop` and `pointer` are required, the rest optional.
#[repr(C)]
pub struct snd_pcm_ioplug_callback_t {
    pub start: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub stop: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub pointer: Option<unsafe extern "C" fn(io: Io) -> snd_pcm_sframes_t>,
    pub transfer: Option<
        unsafe extern "C" fn(
            io: Io,
            areas: *const snd_pcm_channel_area_t,
            offset: snd_pcm_uframes_t,
            size: snd_pcm_uframes_t,
        ) -> snd_pcm_sframes_t,
    >,
    pub close: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub hw_params: Option<unsafe extern "C" fn(io: Io, params: *mut snd_pcm_hw_params_t) -> c_int>,
    pub hw_free: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub sw_params: Option<unsafe extern "C" fn(io: Io, params: *mut snd_pcm_sw_params_t) -> c_int>,
    pub prepare: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub drain: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub pause: Option<unsafe extern "C" fn(io: Io, enable: c_int) -> c_int>,
    pub resume: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub poll_descriptors_count: Option<unsafe extern "C" fn(io: Io) -> c_int>,
    pub poll_descriptors: Option<unsafe extern "C" fn(io: Io, pfd: *mut libc::pollfd, space: c_uint) -> c_int>,
    pub poll_revents:
        Option<unsafe extern "C" fn(io: Io, pfd: *mut libc::pollfd, nfds: c_uint, revents: *mut c_ushort) -> c_int>,
    pub dump: Option<unsafe extern "C" fn(io: Io, out: *mut snd_output_t)>,
    pub delay: Option<unsafe extern "C" fn(io: Io, delayp: *mut snd_pcm_sframes_t) -> c_int>,
    pub query_chmaps: Option<unsafe extern "C" fn(io: Io) -> *mut *mut snd_pcm_chmap_query_t>,
    pub get_chmap: Option<unsafe extern "C" fn(io: Io) -> *mut snd_pcm_chmap_t>,
    pub set_chmap: Option<unsafe extern "C" fn(io: Io, map: *const snd_pcm_chmap_t) -> c_int>,
}

unsafe extern "C" {
    pub fn snd_pcm_ioplug_create(io: Io, name: *const c_char, stream: snd_pcm_stream_t, mode: c_int) -> c_int;
    pub fn snd_pcm_ioplug_delete(io: Io) -> c_int;
    pub fn snd_pcm_ioplug_set_param_minmax(io: Io, kind: c_int, min: c_uint, max: c_uint) -> c_int;
    pub fn snd_pcm_ioplug_set_param_list(io: Io, kind: c_int, num_list: c_uint, list: *const c_uint) -> c_int;
    pub fn snd_pcm_ioplug_set_state(io: Io, state: snd_pcm_state_t) -> c_int;

    /// alsa-lib's error handler (`SNDERR` calls it): a variable, replaced by
    /// `snd_lib_error_set_handler`.
    pub static mut snd_lib_error: alsa_sys::snd_lib_error_handler_t;
}

// The layout alsa-lib 1.2.8's header gives on LP64 Linux (printed with offsetof).
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(snd_pcm_ioplug_t, name) == 8);
    assert!(offset_of!(snd_pcm_ioplug_t, poll_fd) == 20);
    assert!(offset_of!(snd_pcm_ioplug_t, callback) == 32);
    assert!(offset_of!(snd_pcm_ioplug_t, private_data) == 40);
    assert!(offset_of!(snd_pcm_ioplug_t, pcm) == 48);
    assert!(offset_of!(snd_pcm_ioplug_t, stream) == 56);
    assert!(offset_of!(snd_pcm_ioplug_t, state) == 60);
    assert!(offset_of!(snd_pcm_ioplug_t, appl_ptr) == 64);
    assert!(offset_of!(snd_pcm_ioplug_t, hw_ptr) == 72);
    assert!(offset_of!(snd_pcm_ioplug_t, nonblock) == 80);
    assert!(offset_of!(snd_pcm_ioplug_t, channels) == 92);
    assert!(offset_of!(snd_pcm_ioplug_t, rate) == 96);
    assert!(offset_of!(snd_pcm_ioplug_t, period_size) == 104);
    assert!(offset_of!(snd_pcm_ioplug_t, buffer_size) == 112);
    assert!(size_of::<snd_pcm_ioplug_t>() == 120);
    assert!(offset_of!(snd_pcm_ioplug_callback_t, set_chmap) == 152);
    assert!(size_of::<snd_pcm_ioplug_callback_t>() == 160);
};
