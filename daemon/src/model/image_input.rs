//! Pictures for Gemma 4's vision encoder, prepared as transformers' `Gemma4ImageProcessor` does:
//! resize keeping the aspect ratio to the largest size within the soft-token budget whose sides
//! are multiples of 48 (bicubic, antialiased), rescale by 1/255, cut into 16x16 patches flattened
//! as (row, column, channel), with (x, y) patch positions; padding patches are zeros at (-1, -1).

use image::RgbImage;

/// The budgets the model was trained with.
pub const SOFT_TOKEN_BUDGETS: [usize; 5] = [70, 140, 280, 560, 1120];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageParams {
    pub patch_size: usize,
    pub pooling_kernel_size: usize,
    pub max_soft_tokens: usize,
}

impl ImageParams {
    pub fn gemma4(max_soft_tokens: usize) -> Self {
        Self { patch_size: 16, pooling_kernel_size: 3, max_soft_tokens }
    }

    pub fn max_patches(&self) -> usize {
        self.max_soft_tokens * self.pooling_kernel_size.pow(2)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageInputError {
    #[error("a soft-token budget of {0} is not one the model knows ({SOFT_TOKEN_BUDGETS:?})")]
    Budget(usize),
    #[error("a {width}x{height} picture is too narrow to keep its shape within the budget")]
    TooNarrow { width: u32, height: u32 },
    #[error("cannot resize the picture: {0}")]
    Resize(String),
}

/// Patches padded to the budget's `max_patches`, ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePatches {
    /// `max_patches x patch_size² x 3`, in [0, 1].
    pub pixel_values: Vec<f32>,
    /// `max_patches x 2`: (x, y) of each patch, (-1, -1) for padding.
    pub positions: Vec<i64>,
    pub max_patches: usize,
    pub patch_values: usize,
    /// Soft tokens the encoder will give: real patches / pooling².
    pub soft_tokens: usize,
    /// The size the picture was resized to.
    pub resized: (u32, u32),
}

/// Target `(height, width)` as transformers' `get_aspect_ratio_preserving_size` computes it.
pub fn target_size(height: u32, width: u32, params: &ImageParams) -> Result<(u32, u32), ImageInputError> {
    let patch = params.patch_size as f64;
    let target_px = params.max_patches() as f64 * patch * patch;
    let factor = (target_px / (f64::from(height) * f64::from(width))).sqrt();
    let side = (params.pooling_kernel_size * params.patch_size) as u32;
    let mut target_height = (factor * f64::from(height) / f64::from(side)).floor() as u32 * side;
    let mut target_width = (factor * f64::from(width) / f64::from(side)).floor() as u32 * side;
    let max_side = (params.max_patches() / params.pooling_kernel_size.pow(2)) as u32 * side;
    match (target_height, target_width) {
        (0, 0) => return Err(ImageInputError::TooNarrow { width, height }),
        (0, _) => {
            target_height = side;
            target_width = ((width / height) * side).min(max_side);
        }
        (_, 0) => {
            target_width = side;
            target_height = ((height / width) * side).min(max_side);
        }
        _ => {}
    }
    Ok((target_height, target_width))
}

pub fn prepare(image: &RgbImage, params: &ImageParams) -> Result<ImagePatches, ImageInputError> {
    if !SOFT_TOKEN_BUDGETS.contains(&params.max_soft_tokens) {
        return Err(ImageInputError::Budget(params.max_soft_tokens));
    }
    let (height, width) = target_size(image.height(), image.width(), params)?;
    let resized = if (width, height) == image.dimensions() { image.clone() } else { resize(image, width, height)? };

    let patch = params.patch_size;
    let (columns, rows) = (width as usize / patch, height as usize / patch);
    let patch_values = patch * patch * 3;
    let max_patches = params.max_patches();
    let mut pixel_values = vec![0.0f32; max_patches * patch_values];
    let mut positions = vec![-1i64; max_patches * 2];
    let raw = resized.as_raw();
    let scale = 1.0f32 / 255.0;
    for row in 0..rows {
        for column in 0..columns {
            let index = row * columns + column;
            let out = &mut pixel_values[index * patch_values..(index + 1) * patch_values];
            for y in 0..patch {
                let start = ((row * patch + y) * width as usize + column * patch) * 3;
                for (slot, &value) in
                    out[y * patch * 3..(y + 1) * patch * 3].iter_mut().zip(&raw[start..start + patch * 3])
                {
                    *slot = f32::from(value) * scale;
                }
            }
            positions[index * 2] = column as i64;
            positions[index * 2 + 1] = row as i64;
        }
    }
    Ok(ImagePatches {
        pixel_values,
        positions,
        max_patches,
        patch_values,
        soft_tokens: rows * columns / params.pooling_kernel_size.pow(2),
        resized: (width, height),
    })
}

/// Bicubic (a = -0.5) with antialiasing on 8-bit pixels, one axis at a time (width first), with
/// the weights of each axis rounded to 16-bit fixed point at the highest precision that fits, as
/// torchvision's uint8 kernel (which transformers uses) does. Pillow and the resize crates round
/// differently, and the model sees the difference; hence this hand-written pass.
fn resize(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage, ImageInputError> {
    let (in_width, in_height) = (image.width() as usize, image.height() as usize);
    let (width, height) = (width as usize, height as usize);
    let mut rows = image.as_raw().clone();
    if width != in_width {
        let axis = AxisWeights::new(in_width, width);
        let mut out = vec![0u8; in_height * width * 3];
        for y in 0..in_height {
            let source = &rows[y * in_width * 3..(y + 1) * in_width * 3];
            for x in 0..width {
                for c in 0..3 {
                    out[(y * width + x) * 3 + c] = axis.apply(x, |i| source[i * 3 + c]);
                }
            }
        }
        rows = out;
    }
    if height != in_height {
        let axis = AxisWeights::new(in_height, height);
        let mut out = vec![0u8; height * width * 3];
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    out[(y * width + x) * 3 + c] = axis.apply(y, |i| rows[(i * width + x) * 3 + c]);
                }
            }
        }
        rows = out;
    }
    RgbImage::from_raw(width as u32, height as u32, rows)
        .ok_or_else(|| ImageInputError::Resize("wrong buffer size".into()))
}

/// For each output index along one axis: the first input index and 16-bit weights.
struct AxisWeights {
    starts: Vec<usize>,
    weights: Vec<Vec<i16>>,
    precision: u32,
}

impl AxisWeights {
    fn new(input: usize, output: usize) -> Self {
        const SUPPORT: f64 = 2.0;
        let scale = input as f64 / output as f64;
        // Antialiasing: when shrinking, the filter widens with the scale.
        let (support, inverse) = if scale >= 1.0 { (SUPPORT * scale, 1.0 / scale) } else { (SUPPORT, 1.0) };
        let mut starts = Vec::with_capacity(output);
        let mut float_weights = Vec::with_capacity(output);
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut weights: Vec<f64> = (start..end).map(|j| bicubic((j as f64 - center + 0.5) * inverse)).collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            starts.push(start);
            float_weights.push(weights);
        }
        let largest = float_weights.iter().flatten().fold(0.0f64, |m, &w| m.max(w));
        let mut precision = 0;
        while precision < 22 && ((0.5 + largest * f64::from(1u32 << (precision + 1))) as i64) < (1 << 15) {
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let weights = float_weights
            .iter()
            .map(|ws| {
                ws.iter()
                    .map(|&w| {
                        let v = w * unit;
                        (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i16
                    })
                    .collect()
            })
            .collect();
        Self { starts, weights, precision }
    }

    /// Output value `index`, reading input values through `value`.
    fn apply(&self, index: usize, value: impl Fn(usize) -> u8) -> u8 {
        let start = self.starts[index];
        let mut sum: i64 = 1 << (self.precision - 1);
        for (k, &w) in self.weights[index].iter().enumerate() {
            sum += i64::from(w) * i64::from(value(start + k));
        }
        (sum >> self.precision).clamp(0, 255) as u8
    }
}

/// Keys' cubic convolution kernel with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_budget_and_the_48_pixel_grid() {
        assert_eq!(target_size(512, 512, &ImageParams::gemma4(70)), Ok((384, 384)));
        assert_eq!(target_size(512, 512, &ImageParams::gemma4(280)), Ok((768, 768)));
        assert_eq!(target_size(480, 640, &ImageParams::gemma4(280)), Ok((672, 912)));
        // A strip too thin for one row of 48 keeps one row and is capped in length.
        assert_eq!(target_size(10, 5000, &ImageParams::gemma4(70)), Ok((48, 48 * 70)));
    }

    #[test]
    fn patches_are_row_major_with_xy_positions_and_padding() {
        let image = RgbImage::from_fn(96, 48, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let params = ImageParams::gemma4(70);
        let patches = prepare(&image, &params).unwrap();
        // 96x48 grows to 528x240 under a budget of 70: 33 x 15 patches, 55 soft tokens.
        assert_eq!(patches.resized, (528, 240));
        assert_eq!(patches.soft_tokens, 55);
        assert_eq!(patches.pixel_values.len(), 630 * 768);
        assert_eq!(&patches.positions[..4], &[0, 0, 1, 0]);
        assert_eq!(&patches.positions[patches.positions.len() - 2..], &[-1, -1]);
    }
}
