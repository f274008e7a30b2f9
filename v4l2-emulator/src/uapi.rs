//! The few definitions of the V4L2 UAPI (linux/videodev2.h) the emulator answers, in the 64-bit
//! layout that x86_64 and aarch64 share. Written out rather than generated so the library needs no
//! bindgen. An ioctl number encodes the size of its argument, so the asserts at the end check each
//! struct against the kernel's number for it.

use std::mem::{offset_of, size_of};

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, 'V', nr, size)` from asm-generic/ioctl.h.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'V' as u32) << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iow(nr: u32, size: usize) -> u32 {
    ioc(IOC_WRITE, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

pub const VIDIOC_QUERYCAP: u32 = ior(0, size_of::<Capability>());
pub const VIDIOC_ENUM_FMT: u32 = iowr(2, size_of::<FmtDesc>());
pub const VIDIOC_G_FMT: u32 = iowr(4, size_of::<Format>());
pub const VIDIOC_S_FMT: u32 = iowr(5, size_of::<Format>());
pub const VIDIOC_REQBUFS: u32 = iowr(8, size_of::<RequestBuffers>());
pub const VIDIOC_QUERYBUF: u32 = iowr(9, size_of::<Buffer>());
pub const VIDIOC_QBUF: u32 = iowr(15, size_of::<Buffer>());
pub const VIDIOC_DQBUF: u32 = iowr(17, size_of::<Buffer>());
pub const VIDIOC_STREAMON: u32 = iow(18, size_of::<i32>());
pub const VIDIOC_STREAMOFF: u32 = iow(19, size_of::<i32>());
pub const VIDIOC_G_PARM: u32 = iowr(21, size_of::<StreamParm>());
pub const VIDIOC_S_PARM: u32 = iowr(22, size_of::<StreamParm>());
pub const VIDIOC_ENUMINPUT: u32 = iowr(26, size_of::<Input>());
pub const VIDIOC_G_INPUT: u32 = ior(38, size_of::<i32>());
pub const VIDIOC_S_INPUT: u32 = iowr(39, size_of::<i32>());
pub const VIDIOC_TRY_FMT: u32 = iowr(64, size_of::<Format>());
pub const VIDIOC_ENUM_FRAMESIZES: u32 = iowr(74, size_of::<FrmSizeEnum>());
pub const VIDIOC_ENUM_FRAMEINTERVALS: u32 = iowr(75, size_of::<FrmIvalEnum>());

/// Control ioctls (`nr` only): a camera without controls answers them EINVAL, as a driver with an
/// empty control handler does; `v4l::Device::query_controls` then lists none.
pub const CONTROL_IOCTL_NRS: [u32; 8] = [27, 28, 36, 37, 71, 72, 73, 103];

pub fn ioctl_name(request: u32) -> &'static str {
    match request {
        VIDIOC_QUERYCAP => "VIDIOC_QUERYCAP",
        VIDIOC_ENUM_FMT => "VIDIOC_ENUM_FMT",
        VIDIOC_G_FMT => "VIDIOC_G_FMT",
        VIDIOC_S_FMT => "VIDIOC_S_FMT",
        VIDIOC_TRY_FMT => "VIDIOC_TRY_FMT",
        VIDIOC_REQBUFS => "VIDIOC_REQBUFS",
        VIDIOC_QUERYBUF => "VIDIOC_QUERYBUF",
        VIDIOC_QBUF => "VIDIOC_QBUF",
        VIDIOC_DQBUF => "VIDIOC_DQBUF",
        VIDIOC_STREAMON => "VIDIOC_STREAMON",
        VIDIOC_STREAMOFF => "VIDIOC_STREAMOFF",
        VIDIOC_G_PARM => "VIDIOC_G_PARM",
        VIDIOC_S_PARM => "VIDIOC_S_PARM",
        VIDIOC_ENUMINPUT => "VIDIOC_ENUMINPUT",
        VIDIOC_G_INPUT => "VIDIOC_G_INPUT",
        VIDIOC_S_INPUT => "VIDIOC_S_INPUT",
        VIDIOC_ENUM_FRAMESIZES => "VIDIOC_ENUM_FRAMESIZES",
        VIDIOC_ENUM_FRAMEINTERVALS => "VIDIOC_ENUM_FRAMEINTERVALS",
        _ => "an unemulated ioctl",
    }
}

pub const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
pub const MEMORY_MMAP: u32 = 1;
pub const FIELD_NONE: u32 = 1;
pub const COLORSPACE_JPEG: u32 = 7;
pub const COLORSPACE_SRGB: u32 = 8;
pub const CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
pub const CAP_STREAMING: u32 = 0x0400_0000;
pub const CAP_DEVICE_CAPS: u32 = 0x8000_0000;
pub const CAP_TIMEPERFRAME: u32 = 0x1000;
pub const FMT_FLAG_COMPRESSED: u32 = 0x0001;
pub const FRMSIZE_TYPE_DISCRETE: u32 = 1;
pub const FRMIVAL_TYPE_DISCRETE: u32 = 1;
pub const BUF_FLAG_MAPPED: u32 = 0x0001;
pub const BUF_FLAG_QUEUED: u32 = 0x0002;
pub const BUF_FLAG_DONE: u32 = 0x0004;
pub const BUF_FLAG_TIMESTAMP_MONOTONIC: u32 = 0x2000;
pub const BUF_CAP_SUPPORTS_MMAP: u32 = 0x0001;
pub const INPUT_TYPE_CAMERA: u32 = 2;

pub const fn fourcc(code: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*code)
}
pub const PIX_FMT_YUYV: u32 = fourcc(b"YUYV");
pub const PIX_FMT_MJPEG: u32 = fourcc(b"MJPG");

/// Copies `text` into a fixed, NUL-terminated C string field, cut at a character boundary
/// (applications read these fields as UTF-8).
pub fn set_str(field: &mut [u8], text: &str) {
    field.fill(0);
    let mut n = text.len().min(field.len() - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
}

#[repr(C)]
pub struct Capability {
    pub driver: [u8; 16],
    pub card: [u8; 32],
    pub bus_info: [u8; 32],
    pub version: u32,
    pub capabilities: u32,
    pub device_caps: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
pub struct FmtDesc {
    pub index: u32,
    pub type_: u32,
    pub flags: u32,
    pub description: [u8; 32],
    pub pixelformat: u32,
    pub mbus_code: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
pub struct PixFormat {
    pub width: u32,
    pub height: u32,
    pub pixelformat: u32,
    pub field: u32,
    pub bytesperline: u32,
    pub sizeimage: u32,
    pub colorspace: u32,
    pub priv_: u32,
    pub flags: u32,
    pub ycbcr_enc: u32,
    pub quantization: u32,
    pub xfer_func: u32,
}

/// `struct v4l2_format`: the 200-byte union holds pointers in some members (v4l2_window), so it is
/// 8-aligned and starts at offset 8. Only its `pix` member is used here.
#[repr(C)]
pub struct Format {
    pub type_: u32,
    _pad: u32,
    pub pix: PixFormat,
    _rest_of_union: [u8; 200 - size_of::<PixFormat>()],
    _align: [u64; 0],
}

#[repr(C)]
pub struct RequestBuffers {
    pub count: u32,
    pub type_: u32,
    pub memory: u32,
    pub capabilities: u32,
    pub flags: u8,
    pub reserved: [u8; 3],
}

#[repr(C)]
pub struct Timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

#[repr(C)]
pub struct Timecode {
    pub type_: u32,
    pub flags: u32,
    pub frames: u8,
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub userbits: [u8; 4],
}

/// `m` of `struct v4l2_buffer`: the MMAP offset, a user pointer, a plane array or a dmabuf fd.
#[repr(C)]
pub union BufferM {
    pub offset: u32,
    pub userptr: u64,
}

#[repr(C)]
pub struct Buffer {
    pub index: u32,
    pub type_: u32,
    pub bytesused: u32,
    pub flags: u32,
    pub field: u32,
    pub timestamp: Timeval,
    pub timecode: Timecode,
    pub sequence: u32,
    pub memory: u32,
    pub m: BufferM,
    pub length: u32,
    pub reserved2: u32,
    pub request_fd: i32,
}

#[repr(C)]
pub struct Fract {
    pub numerator: u32,
    pub denominator: u32,
}

#[repr(C)]
pub struct CaptureParm {
    pub capability: u32,
    pub capturemode: u32,
    pub timeperframe: Fract,
    pub extendedmode: u32,
    pub readbuffers: u32,
    pub reserved: [u32; 4],
}

/// `struct v4l2_streamparm`: a type and a 200-byte union of capture/output parameters.
#[repr(C)]
pub struct StreamParm {
    pub type_: u32,
    pub capture: CaptureParm,
    _rest_of_union: [u8; 200 - size_of::<CaptureParm>()],
}

/// `struct v4l2_frmsizeenum`; the union holds `discrete` (width, height) or `stepwise`.
#[repr(C)]
pub struct FrmSizeEnum {
    pub index: u32,
    pub pixel_format: u32,
    pub type_: u32,
    pub size: [u32; 6],
    pub reserved: [u32; 2],
}

/// `struct v4l2_frmivalenum`; the union holds `discrete` (a fraction) or `stepwise`.
#[repr(C)]
pub struct FrmIvalEnum {
    pub index: u32,
    pub pixel_format: u32,
    pub width: u32,
    pub height: u32,
    pub type_: u32,
    pub interval: [u32; 6],
    pub reserved: [u32; 2],
}

#[repr(C)]
pub struct Input {
    pub index: u32,
    pub name: [u8; 32],
    pub type_: u32,
    pub audioset: u32,
    pub tuner: u32,
    pub std: u64,
    pub status: u32,
    pub capabilities: u32,
    pub reserved: [u32; 3],
}

// The kernel's numbers (and so sizes); a layout mistake fails the build.
const _: () = assert!(VIDIOC_QUERYCAP == 0x8068_5600);
const _: () = assert!(VIDIOC_ENUM_FMT == 0xC040_5602);
const _: () = assert!(VIDIOC_G_FMT == 0xC0D0_5604);
const _: () = assert!(VIDIOC_S_FMT == 0xC0D0_5605);
const _: () = assert!(VIDIOC_REQBUFS == 0xC014_5608);
const _: () = assert!(VIDIOC_QUERYBUF == 0xC058_5609);
const _: () = assert!(VIDIOC_QBUF == 0xC058_560F);
const _: () = assert!(VIDIOC_DQBUF == 0xC058_5611);
const _: () = assert!(VIDIOC_STREAMON == 0x4004_5612);
const _: () = assert!(VIDIOC_STREAMOFF == 0x4004_5613);
const _: () = assert!(VIDIOC_G_PARM == 0xC0CC_5615);
const _: () = assert!(VIDIOC_S_PARM == 0xC0CC_5616);
const _: () = assert!(VIDIOC_ENUMINPUT == 0xC050_561A);
const _: () = assert!(VIDIOC_G_INPUT == 0x8004_5626);
const _: () = assert!(VIDIOC_S_INPUT == 0xC004_5627);
const _: () = assert!(VIDIOC_TRY_FMT == 0xC0D0_5640);
const _: () = assert!(VIDIOC_ENUM_FRAMESIZES == 0xC02C_564A);
const _: () = assert!(VIDIOC_ENUM_FRAMEINTERVALS == 0xC034_564B);
const _: () = assert!(size_of::<PixFormat>() == 48 && offset_of!(Format, pix) == 8);
const _: () = assert!(size_of::<CaptureParm>() == 40);
const _: () = assert!(offset_of!(Buffer, timestamp) == 24 && offset_of!(Buffer, m) == 64);
const _: () = assert!(offset_of!(Input, std) == 48);
