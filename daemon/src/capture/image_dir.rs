//! A directory of still images, replayed in file-name order.

use std::path::PathBuf;

use image::RgbImage;

use super::replay::{FrameStore, Replay};
use super::SourceError;
use crate::media::MediaRef;

pub type ImageDirReplay = Replay<ImageFiles>;

impl ImageDirReplay {
    pub fn open(media: &MediaRef, fps: f64, looping: bool) -> Result<Self, SourceError> {
        Ok(Replay::new(ImageFiles::open(media)?, fps, looping))
    }
}

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

pub struct ImageFiles {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl ImageFiles {
    pub fn open(media: &MediaRef) -> Result<Self, SourceError> {
        let MediaRef::Path(dir) = media else {
            return Err(SourceError::Format {
                media: media.to_string(),
                problem: "built-in media is a file, not a directory of images".into(),
            });
        };
        let name = media.to_string();
        let entries = std::fs::read_dir(dir).map_err(|source| SourceError::Read { media: name.clone(), source })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        if files.is_empty() {
            return Err(SourceError::Format {
                media: name,
                problem: "no .png, .jpg or .jpeg images in this directory".into(),
            });
        }
        files.sort();
        Ok(Self { dir: dir.clone(), files })
    }
}

impl FrameStore for ImageFiles {
    fn frame_count(&self) -> usize {
        self.files.len()
    }

    fn decode(&self, index: usize) -> Result<RgbImage, SourceError> {
        let path = &self.files[index];
        image::open(path).map(|image| image.to_rgb8()).map_err(|e| SourceError::BadFrame {
            media: path.display().to_string(),
            index,
            problem: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!("image directory {} ({} images)", self.dir.display(), self.files.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::FrameSource;

    #[test]
    fn replays_images_in_name_order_and_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, shade) in [("b.png", 20u8), ("a.png", 10), ("c.jpg", 30)] {
            let image = RgbImage::from_pixel(4, 4, image::Rgb([shade; 3]));
            image.save(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let mut replay = ImageDirReplay::open(&MediaRef::Path(dir.path().into()), 1000.0, false).unwrap();
        let mut shades = Vec::new();
        while let Some(frame) = replay.next_frame().unwrap() {
            shades.push(frame.image.get_pixel(0, 0)[0]);
        }
        assert_eq!(shades.len(), 3);
        assert_eq!(&shades[..2], &[10, 20]);
        assert!((i16::from(shades[2]) - 30).abs() <= 2, "jpeg is lossy, not that lossy: {}", shades[2]);
    }

    #[test]
    fn empty_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFiles::open(&MediaRef::Path(dir.path().into())).err().unwrap().to_string();
        assert!(err.ends_with("no .png, .jpg or .jpeg images in this directory"), "{err}");
    }
}
