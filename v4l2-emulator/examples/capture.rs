//! A plain `v4l` client for trying the emulator by hand (see README.md): prints what the camera
//! at PATH says about itself and the sequence, size and timestamp of COUNT frames.
//!
//! Usage: capture PATH [COUNT]

use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::Device;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/dev/video0".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(5);
    let dev = Device::with_path(&path)?;
    print!("{}", dev.query_caps()?);
    for format in dev.enum_formats()? {
        print!("{format}");
        for size in dev.enum_framesizes(format.fourcc)? {
            for discrete in size.size.to_discrete() {
                let rates = dev.enum_frameintervals(format.fourcc, discrete.width, discrete.height)?;
                let rates: Vec<String> = rates.iter().map(|r| r.interval.to_string()).collect();
                println!("  {discrete}: {}", rates.join(", "));
            }
        }
    }
    print!("{}{}", dev.format()?, dev.params()?);
    let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, 4)?;
    for _ in 0..count {
        let (_, meta) = stream.next()?;
        println!("frame {} bytes {} at {}", meta.sequence, meta.bytesused, meta.timestamp);
    }
    Ok(())
}
