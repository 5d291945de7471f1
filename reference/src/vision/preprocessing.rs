//! Image preprocessing: from an image file to the patches the vision tower embeds (shared spec:
//! multimodal §1.1).
//!
//! ```text
//! file ──decode──▶ RGB uint8 ──resize (bicubic, uint8)──▶ [H', W', 3] ──÷255──▶ 16×16 patches [n, 768]
//!       (alpha over white)     (H', W' multiples of 48,           (no mean/std)    + positions (x, y)
//!                               about 9·B·256 pixels)
//! ```
//!
//! The target is Hugging Face transformers 5.23.0's `Gemma4ImageProcessorPil`
//! (`models/gemma4/image_processing_pil_gemma4.py`) with Pillow 13.0.0, reproduced **bit for bit**
//! on PNG inputs: the same RGB bytes, the same resized bytes, the same float32 patches. That
//! needs Pillow's own rules, which this file follows and names where they come from:
//!
//! - **RGB conversion** (`transformers/image_transforms.py`, `convert_to_rgb`): an image with an
//!   alpha band or a `transparency` entry is converted to RGBA and alpha-composited over opaque
//!   white; any other image is converted to RGB. Pillow's PNG modes (`PIL/PngImagePlugin.py`,
//!   `_MODES` and `chunk_tRNS`; `libImaging/Convert.c`) bring their quirks: 16-bit greyscale is
//!   mode `I;16`, which converts by **clipping** to 255 (not by scaling); other 16-bit PNGs keep
//!   the high byte of each sample; a `tRNS` colour is compared, truncated to 8 bits, with the
//!   pixel *after* conversion to 8 bits (a 2-bit grey `tRNS` of 2 makes nothing transparent:
//!   the sample 2 became the level 170). See [`decode_image`].
//!   This is HF's behaviour for a Pillow image handed to the processor; HF's own
//!   `image_utils.load_image` (a path or URL string, as chat templates use) instead applies the
//!   EXIF orientation and `convert("RGB")`, which drops alpha without compositing.
//! - **Target size** (`get_aspect_ratio_preserving_size`): see [`resized_size`].
//! - **Resize** (`libImaging/Resample.c`, `Image.resize`): separable bicubic with antialias,
//!   fixed-point on uint8, a uint8 image between the passes, and (new in Pillow 13) a pass order
//!   chosen by size. See [`resize_bicubic`]. Skipped when the size is unchanged (HF returns the
//!   image as is).
//! - **Rescale** (`image_transforms.rescale`): `float32(float64(v) · (1/255))`.
//! - **Patches** (`convert_image_to_patches`): row-major patches, each flattened as
//!   (row, column, channel); positions `(x, y)` from `np.meshgrid(..., indexing="xy")`.
//!
//! HF then pads to `9·B` patches (pixels 0, positions −1); [`ImagePatches`] keeps the valid
//! patches only, and the padding is added where a batch is built.

use std::io::Cursor;
use std::path::Path;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::memory::available_memory;

// ------------------------------------------------------------------------------------------------
// Constants
// ------------------------------------------------------------------------------------------------

/// Side of a square patch in pixels (`patch_size`).
pub const PATCH_SIZE: usize = 16;

/// Side of the pooling window in patches (`pooling_kernel_size`): each soft token pools 3×3
/// patches, so resized sides are multiples of `3·16 = 48`.
pub const POOLING_KERNEL: usize = 3;

/// The image budgets `B` (maximum soft tokens per image, `max_soft_tokens`) HF accepts. An image
/// has at most `9·B` patches.
pub const SUPPORTED_BUDGETS: [usize; 5] = [70, 140, 280, 560, 1120];

/// Values in one flattened patch: 16 · 16 · 3 = 768.
pub const PATCH_VALUES: usize = PATCH_SIZE * PATCH_SIZE * 3;

/// Side multiple of every resized image: `POOLING_KERNEL · PATCH_SIZE = 48`.
const SIDE_MULTIPLE: usize = POOLING_KERNEL * PATCH_SIZE;

// ------------------------------------------------------------------------------------------------
// The RGB image
// ------------------------------------------------------------------------------------------------

/// An 8-bit RGB image, row-major, 3 bytes per pixel: `pixels[(y·width + x)·3 + channel]`,
/// `pixels.len() == width·height·3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// An image from its pixels; refuses a buffer whose length is not `width·height·3`.
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
        if expected != Some(pixels.len()) {
            return Err(Error::input(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                expected.map_or("more than usize::MAX".to_string(), |n| n.to_string()),
                pixels.len()
            )));
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// Checks the invariant of the public fields (they can be set directly).
    fn check(&self) -> Result<()> {
        let expected = self
            .width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3));
        if expected == Some(self.pixels.len()) {
            Ok(())
        } else {
            Err(Error::input(format!(
                "RgbImage of {}x{} has {} bytes of pixels, expected width·height·3",
                self.width,
                self.height,
                self.pixels.len()
            )))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Decoding: file bytes → RGB, as HF's `convert_to_rgb` on the image Pillow opens
// ------------------------------------------------------------------------------------------------

/// Reads an image file and decodes it with [`decode_image`]. Errors name `path`.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::image(path, format!("cannot read the file: {e}")))?;
    decode_image(&bytes, path)
}

/// Decodes a PNG, JPEG, WebP or GIF (first frame) into RGB as HF does with the image Pillow
/// opens: `convert_to_rgb` composites an image with alpha or transparency over white
/// (shared spec: multimodal §1.1 step 1).
///
/// - PNG is decoded here from the raw samples, following Pillow's modes exactly (bit-exact):
///   greyscale 1/2/4/8 bit scaled to 0..255; 16-bit greyscale clipped to 255 (mode `I;16`);
///   16-bit colour and grey+alpha keep the high byte; palette entries beyond the palette are
///   black; a `tRNS` colour key is compared, truncated to 8 bits, with the 8-bit pixel.
/// - JPEG, WebP and GIF use the `image` crate's decoders (zune-jpeg, image-webp, gif), not
///   Pillow's libjpeg-turbo and libwebp. GIF and lossy WebP matched Pillow exactly on the
///   fixtures; JPEG differs by up to 4 levels (chroma upsampling and IDCT rounding), so JPEG
///   inputs are close to HF, not bit-exact. CMYK JPEGs are converted by the `image` crate's rule,
///   not Pillow's (untested).
/// - No EXIF rotation is applied (`Image.open` applies none; HF's `load_image(str)` does).
///
/// The header's dimensions are checked against the available memory (`memory::available_memory`)
/// before any pixel is decoded. Errors (unreadable, truncated, zero-sized, unsupported format,
/// too large) are [`Error::Image`] naming `path`.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let format = image::guess_format(bytes).map_err(|_| {
        Error::image(
            path,
            "not a recognised image file (expected PNG, JPEG, WebP or GIF)",
        )
    })?;
    match format {
        image::ImageFormat::Png => decode_png(bytes, path),
        image::ImageFormat::Jpeg | image::ImageFormat::WebP | image::ImageFormat::Gif => {
            decode_with_image_crate(bytes, format, path)
        }
        other => Err(Error::image(
            path,
            format!("unsupported image format {other:?} (expected PNG, JPEG, WebP or GIF)"),
        )),
    }
}

/// Refuses an image whose declared size is zero or would need more memory than is available:
/// `bytes_per_pixel` for the decoded buffer plus 7 (RGBA working copy and RGB result).
fn check_decoded_size(path: &Path, width: u32, height: u32, bytes_per_pixel: u64) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::image(
            path,
            format!("the image is empty ({width}x{height} pixels)"),
        ));
    }
    let needed = u64::from(width)
        .checked_mul(u64::from(height))
        .and_then(|pixels| pixels.checked_mul(bytes_per_pixel + 7))
        .filter(|&bytes| usize::try_from(bytes).is_ok_and(|b| b <= isize::MAX as usize));
    let Some(needed) = needed else {
        return Err(Error::image(
            path,
            format!("a {width}x{height} image needs more bytes than this machine can address"),
        ));
    };
    if let Some(available) = available_memory() {
        if needed > available {
            return Err(Error::image(
                path,
                format!(
                    "a {width}x{height} image needs about {needed} bytes to decode, but only \
                     {available} bytes of memory are available (MemAvailable, or \
                     GEMMA4_MEMORY_LIMIT); refusing to decode"
                ),
            ));
        }
    }
    Ok(())
}

/// Decoder memory limit: what is available, or no limit where that is unknown.
fn decoder_memory_limit() -> u64 {
    available_memory().unwrap_or(u64::MAX)
}

/// Pillow's `alpha_composite(white, image)` for one channel (`libImaging/AlphaComposite.c`,
/// fixed point with 7 fractional bits and rounded divisions by 255). Over an opaque white
/// background it equals `round(c·a/255 + 255·(1 − a/255))`; with `a = 255` it returns `c`.
fn composite_over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let background_alpha = 255u32;
    let blend = background_alpha * (255 - a);
    let out_alpha_255 = a * 255 + blend; // 255·255 over an opaque background
    let coefficient_image = a * 255 * 255 * (1 << PRECISION_BITS) / out_alpha_255;
    let coefficient_background = 255 * (1 << PRECISION_BITS) - coefficient_image;
    let sum = c * coefficient_image + 255 * coefficient_background + (0x80 << PRECISION_BITS);
    let divided_by_255 = ((sum >> 8) + sum) >> 8; // Pillow's SHIFTFORDIV255
    (divided_by_255 >> PRECISION_BITS) as u8
}

/// One RGBA pixel composited over white into the RGB output.
fn push_composited(out: &mut Vec<u8>, [r, g, b, a]: [u8; 4]) {
    out.extend_from_slice(&[
        composite_over_white(r, a),
        composite_over_white(g, a),
        composite_over_white(b, a),
    ]);
}

/// PNG → RGB following Pillow's modes and `convert_to_rgb` (see [`decode_image`]).
fn decode_png(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let limit = decoder_memory_limit();
    let png_error = |e: png::DecodingError| match e {
        png::DecodingError::LimitsExceeded => Error::image(
            path,
            format!("decoding this PNG needs more than the {limit} bytes of memory available"),
        ),
        e => Error::image(path, format!("invalid PNG: {e}")),
    };
    let bytes_limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut decoder =
        png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: bytes_limit });
    // Raw samples: no palette expansion, no tRNS → alpha, no 16 → 8 bit; Pillow's rules below.
    decoder.set_transformations(png::Transformations::IDENTITY);
    // The header alone first: the declared size is checked before anything is allocated.
    let header = decoder.read_header_info().map_err(png_error)?;
    check_decoded_size(path, header.width, header.height, 8)?;
    let mut reader = decoder.read_info().map_err(png_error)?;
    let info = reader.info();
    let (color_type, bit_depth) = (info.color_type, info.bit_depth as u8);
    let palette = info.palette.as_deref().unwrap_or(&[]).to_vec();
    let trns = info.trns.as_deref().map(<[u8]>::to_vec);

    let buffer_size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::image(path, "the PNG's decoded size overflows"))?;
    let mut buffer = vec![0u8; buffer_size];
    let frame = reader.next_frame(&mut buffer).map_err(png_error)?;
    let (width, height) = (frame.width as usize, frame.height as usize);

    // The tRNS colour key as Pillow uses it: Pillow keeps the 16-bit values (`chunk_tRNS`, mode
    // "1" maps non-zero to 255) and compares them truncated to 8 bits (`& 0xff`, `Convert.c`
    // `rgbT2a`) with the pixel already converted to 8 bits. The png crate keeps one byte per value
    // below 16 bits (the low one) and two at 16 bits; a short tRNS is an error in both.
    let key = |index: usize| -> Result<u8> {
        let trns = trns.as_deref().unwrap_or(&[]);
        let low_byte = if bit_depth == 16 {
            trns.get(2 * index + 1)
        } else {
            trns.get(index)
        };
        let low_byte = *low_byte.ok_or_else(|| Error::image(path, "truncated tRNS chunk"))?;
        Ok(if bit_depth == 1 && low_byte != 0 {
            255
        } else {
            low_byte
        })
    };
    let grey_key = match (color_type, &trns) {
        (png::ColorType::Grayscale, Some(_)) => Some(key(0)?),
        _ => None,
    };
    let rgb_key = match (color_type, &trns) {
        (png::ColorType::Rgb, Some(_)) => Some([key(0)?, key(1)?, key(2)?]),
        _ => None,
    };

    let mut rgb = Vec::with_capacity(width * height * 3);
    for row in buffer.chunks_exact(frame.line_size).take(height) {
        for x in 0..width {
            let pixel = match color_type {
                png::ColorType::Grayscale => {
                    let level = grey_level(packed_sample(row, x, bit_depth), bit_depth);
                    let alpha = if grey_key == Some(level) { 0 } else { 255 };
                    [level, level, level, alpha]
                }
                png::ColorType::GrayscaleAlpha => {
                    let level = high_byte(row, 2 * x, bit_depth);
                    [level, level, level, high_byte(row, 2 * x + 1, bit_depth)]
                }
                png::ColorType::Rgb => {
                    let colour = [0, 1, 2].map(|c| high_byte(row, 3 * x + c, bit_depth));
                    let alpha = if rgb_key == Some(colour) { 0 } else { 255 };
                    [colour[0], colour[1], colour[2], alpha]
                }
                png::ColorType::Rgba => [0, 1, 2, 3].map(|c| high_byte(row, 4 * x + c, bit_depth)),
                png::ColorType::Indexed => {
                    let index = usize::from(packed_sample(row, x, bit_depth));
                    let entry = palette.get(3 * index..3 * index + 3).unwrap_or(&[0, 0, 0]);
                    let alpha = trns.as_deref().and_then(|t| t.get(index)).copied();
                    [entry[0], entry[1], entry[2], alpha.unwrap_or(255)]
                }
            };
            push_composited(&mut rgb, pixel);
        }
    }
    if rgb.len() != width * height * 3 {
        return Err(Error::image(path, "the PNG's image data is truncated"));
    }
    RgbImage::new(width, height, rgb)
}

/// Sample `index` of a row of 1/2/4/8/16-bit samples (MSB first, 16-bit big-endian).
fn packed_sample(row: &[u8], index: usize, bit_depth: u8) -> u16 {
    match bit_depth {
        16 => u16::from_be_bytes([row[2 * index], row[2 * index + 1]]),
        8 => u16::from(row[index]),
        bits => {
            let bits = usize::from(bits);
            let bit_offset = index * bits;
            let shift = 8 - bits - bit_offset % 8;
            u16::from((row[bit_offset / 8] >> shift) & ((1u8 << bits) - 1))
        }
    }
}

/// A greyscale sample as Pillow's 8-bit level: 1-bit → 0/255 (mode "1"), 2/4-bit scaled to
/// 0..255 (`L;2`, `L;4`), 8-bit as is, 16-bit **clipped** to 255 (mode `I;16` → RGB).
fn grey_level(sample: u16, bit_depth: u8) -> u8 {
    match bit_depth {
        1 => {
            if sample != 0 {
                255
            } else {
                0
            }
        }
        2 => (sample * 85) as u8,
        4 => (sample * 17) as u8,
        8 => sample as u8,
        _ => sample.min(255) as u8,
    }
}

/// Sample `index` of an 8- or 16-bit row as 8 bits: 16-bit keeps the high byte (Pillow's
/// `RGB;16B`, `RGBA;16B`, `LA;16B` raw modes).
fn high_byte(row: &[u8], index: usize, bit_depth: u8) -> u8 {
    if bit_depth == 16 {
        row[2 * index]
    } else {
        row[index]
    }
}

/// JPEG, WebP or GIF (first frame) through the `image` crate, then Pillow's RGB conversion.
fn decode_with_image_crate(
    bytes: &[u8],
    format: image::ImageFormat,
    path: &Path,
) -> Result<RgbImage> {
    use image::ImageDecoder;
    check_not_truncated(bytes, format, path)?;
    let limit = decoder_memory_limit();
    let image_error = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => Error::image(
            path,
            format!(
                "decoding this {format:?} needs more than the {limit} bytes of memory available"
            ),
        ),
        e => Error::image(path, format!("invalid {format:?}: {e}")),
    };
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(limit);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(image_error)?;
    let (width, height) = decoder.dimensions();
    let bytes_per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    check_decoded_size(path, width, height, bytes_per_pixel)?;
    let decoded = image::DynamicImage::from_decoder(decoder).map_err(image_error)?;

    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let mut rgb = Vec::with_capacity(width * height * 3);
    match decoded {
        image::DynamicImage::ImageLuma8(grey) => {
            for &level in grey.as_raw() {
                rgb.extend_from_slice(&[level, level, level]);
            }
        }
        image::DynamicImage::ImageLumaA8(grey_alpha) => {
            for pixel in grey_alpha.as_raw().chunks_exact(2) {
                push_composited(&mut rgb, [pixel[0], pixel[0], pixel[0], pixel[1]]);
            }
        }
        image::DynamicImage::ImageRgb8(colour) => rgb.extend_from_slice(colour.as_raw()),
        image::DynamicImage::ImageRgba8(colour_alpha) => {
            for pixel in colour_alpha.as_raw().chunks_exact(4) {
                push_composited(&mut rgb, [pixel[0], pixel[1], pixel[2], pixel[3]]);
            }
        }
        other => {
            return Err(Error::image(
                path,
                format!(
                    "unsupported {format:?} pixel type {:?} (expected 8-bit grey or colour)",
                    other.color()
                ),
            ))
        }
    }
    RgbImage::new(width, height, rgb).map_err(|e| Error::image(path, e.to_string()))
}

/// Pillow refuses a truncated JPEG or WebP ("image file is truncated", "could not create decoder
/// object") where zune-jpeg and image-webp decode what is there, so truncation is checked here:
/// a JPEG needs an end-of-image marker (`FF D9`) after its last start-of-scan (`FF DA`; entropy-
/// coded data cannot contain either), a WebP needs the bytes its RIFF header declares. The gif
/// crate already refuses a cut GIF (and, like Pillow, accepts one missing only its trailer).
fn check_not_truncated(bytes: &[u8], format: image::ImageFormat, path: &Path) -> Result<()> {
    let truncated = match format {
        image::ImageFormat::Jpeg => {
            let last_scan = bytes.windows(2).rposition(|m| m == [0xff, 0xda]);
            let end = bytes.windows(2).rposition(|m| m == [0xff, 0xd9]);
            match (last_scan, end) {
                (_, None) => true,
                (Some(scan), Some(end)) => end < scan,
                (None, Some(_)) => false, // no scan at all: the decoder says what is wrong
            }
        }
        image::ImageFormat::WebP => bytes.get(4..8).is_none_or(|size| {
            let declared = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
            u64::from(declared) + 8 > bytes.len() as u64
        }),
        _ => false,
    };
    if truncated {
        return Err(Error::image(
            path,
            format!("the {format:?} file is truncated (its end is missing)"),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Target size (HF `get_aspect_ratio_preserving_size`)
// ------------------------------------------------------------------------------------------------

/// The resized `(H', W')` of an `height × width` image at budget `B` (shared spec: multimodal
/// §1.1 step 2), computed in f64 exactly as HF's Python does (bit-identical for
/// `height·width ≤ 2^53`):
///
/// ```text
/// target_px = 9·B·16²,  f = sqrt(target_px / (H·W))
/// H' = floor(f·H / 48)·48,  W' = floor(f·W / 48)·48
/// if H' = 0:  H' = 48, W' = min(floor(W / H)·48, 48·B)     (and symmetrically if W' = 0)
/// ```
///
/// Images are scaled up as well as down (224² becomes 768² at B = 280). Errors: an unsupported
/// budget (the message lists the supported ones), a zero side (HF divides by zero), and HF's two
/// `ValueError`s — both sides rounding to 0, and `H'·W' > target_px` — which cannot happen for
/// the supported budgets (`f·H · f·W = target_px ≥ 48²`) but are kept to mirror HF.
pub fn resized_size(height: usize, width: usize, budget: usize) -> Result<(usize, usize)> {
    if !SUPPORTED_BUDGETS.contains(&budget) {
        return Err(Error::input(format!(
            "image budget (max_soft_tokens) must be one of {SUPPORTED_BUDGETS:?}, got {budget}"
        )));
    }
    if height == 0 || width == 0 {
        return Err(Error::input(format!(
            "cannot resize an empty image ({width}x{height} pixels)"
        )));
    }
    let max_patches = budget * POOLING_KERNEL * POOLING_KERNEL;
    let target_px = max_patches * PATCH_SIZE * PATCH_SIZE;
    let total_px = height as f64 * width as f64;
    let factor = (target_px as f64 / total_px).sqrt();
    let side = SIDE_MULTIPLE as f64;
    let mut target_height = ((factor * height as f64) / side).floor() as usize * SIDE_MULTIPLE;
    let mut target_width = ((factor * width as f64) / side).floor() as usize * SIDE_MULTIPLE;

    if target_height == 0 && target_width == 0 {
        return Err(Error::input(format!(
            "resizing {height}x{width} gives a 0 x 0 image; resized sides must be multiples of \
             {SIDE_MULTIPLE}"
        )));
    }
    // Degenerate aspect ratios: the short side becomes one pooling window.
    let max_side_length = (max_patches / (POOLING_KERNEL * POOLING_KERNEL)) * SIDE_MULTIPLE;
    if target_height == 0 {
        target_height = SIDE_MULTIPLE;
        let ratio = (width as f64 / height as f64).floor() as usize;
        target_width = (ratio * SIDE_MULTIPLE).min(max_side_length);
    } else if target_width == 0 {
        target_width = SIDE_MULTIPLE;
        let ratio = (height as f64 / width as f64).floor() as usize;
        target_height = (ratio * SIDE_MULTIPLE).min(max_side_length);
    }
    if target_height * target_width > target_px {
        return Err(Error::input(format!(
            "resizing {height}x{width} to {target_height}x{target_width} exceeds {max_patches} \
             patches of {PATCH_SIZE}x{PATCH_SIZE}"
        )));
    }
    Ok((target_height, target_width))
}

// ------------------------------------------------------------------------------------------------
// Bicubic resize (Pillow `Image.resize(..., BICUBIC)` on an RGB image, `libImaging/Resample.c`)
// ------------------------------------------------------------------------------------------------

/// Fractional bits of Pillow's fixed-point filter weights for 8-bit images: `32 − 8 − 2 = 22`
/// (8 bits of result, 2 bits of head-room for the filter's negative lobes).
const PRECISION_BITS: u32 = 22;

/// Half-width of the bicubic kernel in source pixels; stretched by the shrink factor when
/// shrinking (antialias).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's bicubic kernel, the Keys cubic convolution with `a = −0.5`:
/// `(a+2)|x|³ − (a+3)|x|² + 1` for `|x| < 1`, `a(|x|³ − 5|x|² + 8|x| − 4)` for `|x| < 2`,
/// else 0, evaluated in Pillow's operation order.
fn bicubic_kernel(x: f64) -> f64 {
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

/// The input samples one output sample reads, and their fixed-point weights.
struct FilterTaps {
    /// First input index read.
    first: usize,
    /// One weight per input index from `first`, scaled by `2^22` and rounded half away from 0.
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` samples to
/// `out_size`. Output `i` is centred on input coordinate `(i + 0.5)·scale`; when shrinking, the
/// kernel is stretched by the scale (antialias): support `2·max(scale, 1)` input pixels each
/// side. Weights are computed in f64, divided by their sum, then turned into fixed point.
fn filter_taps(in_size: usize, out_size: usize) -> Vec<FilterTaps> {
    // Pillow passes the source box as floats: the scale is `(float)(in1 − in0) / out_size`.
    let box_end = in_size as f32;
    let scale = f64::from(box_end - 0.0f32) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filter_scale;
    let inverse_filter_scale = 1.0 / filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // Both bounds are rounded by truncation toward zero, as C's `(int)` does.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(in_size as i64);
            let mut weights: Vec<f64> = (first..end)
                .map(|x| bicubic_kernel((x as f64 - center + 0.5) * inverse_filter_scale))
                .collect();
            let sum = weights.iter().fold(0.0, |acc, w| acc + w);
            if sum != 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            let unit = f64::from(1u32 << PRECISION_BITS);
            let fixed = weights
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * unit) as i32
                    } else {
                        (0.5 + w * unit) as i32
                    }
                })
                .collect();
            FilterTaps {
                first: first.max(0) as usize,
                weights: fixed,
            }
        })
        .collect()
}

/// One output value: rounding offset `2^21`, weighted sum, shift by 22 bits, clamp to 0..255
/// (Pillow's `clip8`).
fn weighted_level(taps: &FilterTaps, sample: impl Fn(usize) -> u8) -> u8 {
    let mut sum: i64 = 1 << (PRECISION_BITS - 1);
    for (k, &weight) in taps.weights.iter().enumerate() {
        sum += i64::from(sample(taps.first + k)) * i64::from(weight);
    }
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass: every row resampled to `width` columns, stored as uint8.
fn resample_horizontal(image: &RgbImage, width: usize) -> RgbImage {
    let taps = filter_taps(image.width, width);
    let mut pixels = Vec::with_capacity(width * image.height * 3);
    for row in image
        .pixels
        .chunks_exact(image.width * 3)
        .take(image.height)
    {
        for column in &taps {
            for channel in 0..3 {
                pixels.push(weighted_level(column, |x| row[x * 3 + channel]));
            }
        }
    }
    RgbImage {
        width,
        height: image.height,
        pixels,
    }
}

/// Vertical pass: every column resampled to `height` rows, stored as uint8.
fn resample_vertical(image: &RgbImage, height: usize) -> RgbImage {
    let taps = filter_taps(image.height, height);
    let stride = image.width * 3;
    let mut pixels = Vec::with_capacity(image.width * height * 3);
    for row in &taps {
        for x in 0..image.width {
            for channel in 0..3 {
                pixels.push(weighted_level(row, |y| {
                    image.pixels[y * stride + x * 3 + channel]
                }));
            }
        }
    }
    RgbImage {
        width: image.width,
        height,
        pixels,
    }
}

/// Pillow 13's choice of pass order: the vertical pass goes first when the height shrinks, by
/// more than twice as many pixels as the width shrinks. Pillow ≤ 12 always ran the horizontal
/// pass first; Pillow PR #9549 ("if height is scaled down significantly more than width, resize
/// vertically first") changed it in C, and its exact condition was not in the stored sources,
/// so this one was measured on Pillow 13.0.0: about 3,100 size pairs of noise images whose two
/// orders give different bytes, plus dense maps of target sizes for 200×200, 100×300 and
/// 300×100 sources, without an exception.
fn vertical_pass_first(from: (usize, usize), to: (usize, usize)) -> bool {
    let ((from_width, from_height), (to_width, to_height)) = (from, to);
    let height_reduction = from_height as i64 - to_height as i64;
    let width_reduction = from_width as i64 - to_width as i64;
    to_height < from_height && height_reduction > 2 * width_reduction
}

/// Pillow's `Image.resize((width, height), Resampling.BICUBIC)` of an RGB image, bit for bit
/// (shared spec: multimodal §1.1 step 2):
///
/// - separable: a horizontal and a vertical pass, each skipped when its size is unchanged (the
///   whole resize is a copy when both are);
/// - each pass is a fixed-point convolution (22 fractional bits) whose result is rounded and
///   clamped to **uint8**, so the second pass reads a uint8 intermediate image;
/// - the filter is stretched by the shrink factor (antialias), see `filter_taps`;
/// - order: horizontal first, except when the height shrinks by more than twice as many pixels
///   as the width (Pillow 13, see `vertical_pass_first`).
///
/// `[height, width, 3]` in, `[height', width', 3]` out. Panics if `image.pixels.len()` is not
/// `3·width·height` (an image from [`RgbImage::new`] or [`decode_image`] always is).
pub fn resize_bicubic(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if let Err(e) = image.check() {
        panic!("resize_bicubic: {e}");
    }
    let horizontal = width != image.width;
    let vertical = height != image.height;
    let size = (image.width, image.height);
    match (horizontal, vertical) {
        (false, false) => image.clone(),
        (true, false) => resample_horizontal(image, width),
        (false, true) => resample_vertical(image, height),
        (true, true) if vertical_pass_first(size, (width, height)) => {
            resample_horizontal(&resample_vertical(image, height), width)
        }
        (true, true) => resample_vertical(&resample_horizontal(image, width), height),
    }
}

// ------------------------------------------------------------------------------------------------
// Patches
// ------------------------------------------------------------------------------------------------

/// The preprocessed image: what the patch embedding (shared spec: multimodal §1.2) reads.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePatches {
    /// `[n, 768]`, values in `[0, 1]` (`float32(level · (1/255))`, no mean/std). Patch `i` is
    /// row-major over the grid; inside a patch the flat index is `(r·16 + c)·3 + ch`.
    pub pixel_values: Array2<f32>,
    /// `[n]` of `[x, y]` = (column, row) of each patch in the grid: `(0,0), (1,0), (2,0), …`.
    pub positions: Vec<[usize; 2]>,
    /// Height of the image the patches were cut from (a multiple of 48 after [`preprocess`]).
    pub resized_height: usize,
    /// Width of the image the patches were cut from.
    pub resized_width: usize,
    /// Soft tokens after 3×3 pooling: `(H'/16)·(W'/16)/9` (HF `num_soft_tokens_per_image`).
    pub soft_tokens: usize,
}

/// Rescales a uint8 level to `[0, 1]` as HF does: `float32(float64(level) · (1/255))`.
fn rescale(level: u8) -> f32 {
    (f64::from(level) * (1.0 / 255.0)) as f32
}

/// Cuts an image whose sides are multiples of 16 into patches (shared spec: multimodal §1.1
/// steps 3–5): `[H', W', 3]` → `pixel_values [n, 768]` with `n = (H'/16)·(W'/16)` and positions
/// `[n]` of `(x, y)`. Only valid patches: HF's padding to `9·B` slots is not added. Errors if a
/// side is not a multiple of 16 or the pixel buffer has the wrong length.
pub fn patchify(image: &RgbImage) -> Result<ImagePatches> {
    image.check()?;
    if !image.width.is_multiple_of(PATCH_SIZE) || !image.height.is_multiple_of(PATCH_SIZE) {
        return Err(Error::input(format!(
            "cannot cut a {}x{} image into {PATCH_SIZE}x{PATCH_SIZE} patches: both sides must be \
             multiples of {PATCH_SIZE}",
            image.width, image.height
        )));
    }
    let grid_width = image.width / PATCH_SIZE;
    let grid_height = image.height / PATCH_SIZE;
    let num_patches = grid_width * grid_height;
    let mut pixel_values = Array2::<f32>::zeros((num_patches, PATCH_VALUES));
    let mut positions = Vec::with_capacity(num_patches);
    for grid_y in 0..grid_height {
        for grid_x in 0..grid_width {
            let patch = grid_y * grid_width + grid_x;
            for r in 0..PATCH_SIZE {
                for c in 0..PATCH_SIZE {
                    let (y, x) = (grid_y * PATCH_SIZE + r, grid_x * PATCH_SIZE + c);
                    for channel in 0..3 {
                        let level = image.pixels[(y * image.width + x) * 3 + channel];
                        pixel_values[[patch, (r * PATCH_SIZE + c) * 3 + channel]] = rescale(level);
                    }
                }
            }
            positions.push([grid_x, grid_y]);
        }
    }
    Ok(ImagePatches {
        pixel_values,
        positions,
        resized_height: image.height,
        resized_width: image.width,
        soft_tokens: num_patches / (POOLING_KERNEL * POOLING_KERNEL),
    })
}

/// The whole of HF's `Gemma4ImageProcessorPil` for one RGB image at budget `B` (shared spec:
/// multimodal §1.1): [`resized_size`], [`resize_bicubic`] (skipped when the size is unchanged,
/// as HF skips it), rescale by 1/255 and [`patchify`]. Returns the valid patches only:
/// `pixel_values [n, 768]` with `n = (H'/16)·(W'/16) ≤ 9·B`.
pub fn preprocess(image: &RgbImage, budget: usize) -> Result<ImagePatches> {
    image.check()?;
    let (height, width) = resized_size(image.height, image.width, budget)?;
    if (height, width) == (image.height, image.width) {
        patchify(image)
    } else {
        patchify(&resize_bicubic(image, width, height))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- target size ------------------------------------------------------------------------

    #[test]
    fn preprocessing_resized_size_spec_table() {
        // shared spec: multimodal §1.1, worked examples (input H×W → H'×W', soft tokens).
        let table = [
            ((480, 640), 70, (336, 432), 63),
            ((480, 640), 280, (672, 912), 266),
            ((480, 640), 1120, (1344, 1824), 1064),
            ((1024, 1024), 70, (384, 384), 64),
            ((1024, 1024), 280, (768, 768), 256),
            ((1024, 1024), 1120, (1584, 1584), 1089),
            ((2000, 300), 70, (1008, 144), 63),
            ((2000, 300), 280, (2064, 288), 258),
            ((2000, 300), 1120, (4128, 576), 1032),
        ];
        for ((h, w), budget, expected, tokens) in table {
            let got = resized_size(h, w, budget).unwrap();
            assert_eq!(got, expected, "{h}x{w} at B={budget}: got {got:?}");
            let soft_tokens = (got.0 / 16) * (got.1 / 16) / 9;
            assert_eq!(soft_tokens, tokens, "{h}x{w} at B={budget}: soft tokens");
            assert!(soft_tokens <= budget);
        }
    }

    #[test]
    fn preprocessing_resized_size_upscales_and_fits() {
        assert_eq!(resized_size(224, 224, 280).unwrap(), (768, 768));
        assert_eq!(resized_size(768, 768, 280).unwrap(), (768, 768));
        assert_eq!(resized_size(1, 1, 70).unwrap(), (384, 384));
    }

    #[test]
    fn preprocessing_resized_size_degenerate_aspect() {
        // 10 rows × 1000 columns at B = 70: f·H ≈ 40 < 48, so H' = 48 and
        // W' = min(floor(1000/10)·48, 70·48) = 3360.
        assert_eq!(resized_size(10, 1000, 70).unwrap(), (48, 3360));
        assert_eq!(resized_size(1000, 10, 70).unwrap(), (3360, 48));
        // One pixel high: the width is capped at 48·B.
        assert_eq!(resized_size(1, 100_000, 280).unwrap(), (48, 280 * 48));
        for budget in SUPPORTED_BUDGETS {
            for (h, w) in [(1, 5000), (3, 7), (17, 400_000), (640, 1)] {
                let (rh, rw) = resized_size(h, w, budget).unwrap();
                assert!(
                    rh.is_multiple_of(48) && rw.is_multiple_of(48) && rh > 0 && rw > 0,
                    "{h}x{w} B={budget}"
                );
                assert!(
                    rh * rw <= 9 * budget * 256,
                    "{h}x{w} B={budget}: {rh}x{rw} too big"
                );
            }
        }
    }

    #[test]
    fn preprocessing_resized_size_errors() {
        let message = resized_size(480, 640, 100).unwrap_err().to_string();
        assert!(
            message.contains("[70, 140, 280, 560, 1120]") && message.contains("100"),
            "unsupported budget message: {message}"
        );
        assert!(resized_size(0, 640, 280).is_err());
        assert!(resized_size(480, 0, 280).is_err());
        assert!(preprocess(&RgbImage::new(0, 0, vec![]).unwrap(), 70).is_err());
    }

    // ---- patches ----------------------------------------------------------------------------

    /// A 32-wide, 32-high image whose pixel (x, y), channel ch holds `x + 32·(y % 4) + 128·(ch % 2)`
    /// mod 256, different enough to spot any transposition.
    fn labelled_image() -> RgbImage {
        let (width, height) = (32, 32);
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                for ch in 0..3 {
                    pixels.push(((x + 7 * y + 101 * ch) % 256) as u8);
                }
            }
        }
        RgbImage::new(width, height, pixels).unwrap()
    }

    #[test]
    fn preprocessing_patchify_order_and_positions() {
        let image = labelled_image();
        let patches = patchify(&image).unwrap();
        assert_eq!(patches.pixel_values.dim(), (4, 768));
        assert_eq!(patches.positions, vec![[0, 0], [1, 0], [0, 1], [1, 1]]);
        assert_eq!(patches.soft_tokens, 0);
        for (patch, [gx, gy]) in patches.positions.iter().enumerate() {
            for r in 0..16 {
                for c in 0..16 {
                    for ch in 0..3 {
                        let (x, y) = (gx * 16 + c, gy * 16 + r);
                        let level = ((x + 7 * y + 101 * ch) % 256) as u8;
                        let got = patches.pixel_values[[patch, (r * 16 + c) * 3 + ch]];
                        let expected = (f64::from(level) / 255.0) as f32;
                        assert_eq!(
                            got, expected,
                            "patch {patch} (grid x {gx}, y {gy}), row {r}, col {c}, channel {ch}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn preprocessing_patchify_rejects_partial_patches() {
        let image = RgbImage::new(20, 16, vec![0; 20 * 16 * 3]).unwrap();
        assert!(patchify(&image).is_err());
        let broken = RgbImage {
            width: 16,
            height: 16,
            pixels: vec![0; 5],
        };
        assert!(patchify(&broken).is_err());
        assert!(preprocess(&broken, 70).is_err());
    }

    #[test]
    fn preprocessing_rescale_matches_hf_float64_then_float32() {
        for level in 0..=255u8 {
            let hf = (f64::from(level) * (1.0 / 255.0)) as f32;
            assert_eq!(rescale(level), hf, "level {level}");
            assert!((0.0..=1.0).contains(&rescale(level)));
        }
        assert_eq!(rescale(255), 1.0);
    }

    #[test]
    fn preprocessing_preprocess_skips_resize_when_size_fits() {
        // 768×768 is the B = 280 size already: the pixels pass through unchanged.
        let mut pixels = Vec::with_capacity(768 * 768 * 3);
        for i in 0..768 * 768 * 3 {
            pixels.push((i * 31 % 251) as u8);
        }
        let image = RgbImage::new(768, 768, pixels).unwrap();
        let patches = preprocess(&image, 280).unwrap();
        assert_eq!((patches.resized_height, patches.resized_width), (768, 768));
        assert_eq!(patches.soft_tokens, 256);
        assert_eq!(patches, patchify(&image).unwrap());
        let small = preprocess(&image, 70).unwrap();
        assert_eq!(small.pixel_values.dim(), (576, 768));
        assert_eq!(small.soft_tokens, 64);
    }

    // ---- resize -----------------------------------------------------------------------------

    #[test]
    fn preprocessing_resize_constant_image_stays_constant() {
        for (from, to) in [
            ((37, 23), (96, 48)),
            ((300, 200), (48, 96)),
            ((20, 300), (48, 144)),
            ((5, 5), (5, 17)),
            ((64, 64), (7, 64)),
            ((2, 3), (1, 1)),
        ] {
            for colour in [[0u8, 0, 0], [255, 255, 255], [12, 200, 77]] {
                let pixels = colour.repeat(from.0 * from.1);
                let image = RgbImage::new(from.0, from.1, pixels).unwrap();
                let resized = resize_bicubic(&image, to.0, to.1);
                assert_eq!((resized.width, resized.height), to);
                if let Some(i) = resized
                    .pixels
                    .iter()
                    .enumerate()
                    .position(|(i, &v)| v != colour[i % 3])
                {
                    panic!(
                        "{from:?} -> {to:?}, colour {colour:?}: value {} at byte {i} (pixel {})",
                        resized.pixels[i],
                        i / 3
                    );
                }
            }
        }
    }

    #[test]
    fn preprocessing_resize_same_size_is_a_copy() {
        let image = labelled_image();
        assert_eq!(resize_bicubic(&image, 32, 32), image);
    }

    #[test]
    fn preprocessing_resize_taps_match_pillow() {
        // 8 → 3 samples (scale 8/3, support 16/3): first input and fixed-point weights, as a
        // NumPy transcription of Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` gives
        // them (that transcription reproduces Pillow 13.0.0's resize on 3.1k noise cases).
        let taps = filter_taps(8, 3);
        assert_eq!(
            taps.iter().map(|t| t.first).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
        let weights: Vec<&[i32]> = taps.iter().map(|t| t.weights.as_slice()).collect();
        assert_eq!(
            weights[0],
            [1357984, 1678094, 1096189, 261175, -104842, -91194, -3102]
        );
        assert_eq!(
            weights[1],
            [-113649, 59548, 732425, 1418827, 1418827, 732425, 59548, -113649]
        );
        for t in &taps {
            let sum: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
            assert!(
                (sum - (1 << 22)).abs() <= t.weights.len() as i64,
                "weights sum {sum}"
            );
        }
        // Upscaling by 2: the kernel is not stretched.
        let up = filter_taps(4, 8);
        assert_eq!(
            (up[3].first, up[3].weights.as_slice()),
            (0, &[-294912, 3637248, 950272, -98304][..])
        );
    }

    #[test]
    fn preprocessing_resize_pass_order_pillow13() {
        // Measured with Pillow 13.0.0 (golden/vision_preprocessing.py, `pass_order`).
        assert!(vertical_pass_first((300, 2000), (144, 1008)));
        assert!(vertical_pass_first((2000, 300), (2064, 288)));
        assert!(!vertical_pass_first((2000, 300), (1008, 144)));
        assert!(!vertical_pass_first((8, 13), (3, 3))); // 10 = 2·5: not more than twice
        assert!(vertical_pass_first((8, 31), (3, 16)));
        assert!(!vertical_pass_first((37, 23), (96, 48))); // height grows
    }

    // ---- decoding ---------------------------------------------------------------------------

    #[test]
    fn preprocessing_composite_matches_rounded_formula() {
        for a in 0..=255u8 {
            for c in 0..=255u8 {
                let exact = 255.0 - f64::from(a) * (255.0 - f64::from(c)) / 255.0;
                let expected = exact.round() as u8;
                assert_eq!(
                    composite_over_white(c, a),
                    expected,
                    "colour {c}, alpha {a}"
                );
            }
        }
        assert_eq!(composite_over_white(17, 255), 17);
        assert_eq!(composite_over_white(17, 0), 255);
    }

    /// A PNG from raw rows (filter byte 0 added), with optional PLTE and tRNS chunks.
    fn png_file(
        width: u32,
        height: u32,
        bit_depth: png::BitDepth,
        colour: png::ColorType,
        data: &[u8],
        palette: Option<&[u8]>,
        trns: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_depth(bit_depth);
            encoder.set_color(colour);
            if let Some(p) = palette {
                encoder.set_palette(p.to_vec());
            }
            if let Some(t) = trns {
                encoder.set_trns(t.to_vec());
            }
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(data).unwrap();
        }
        out
    }

    fn decoded_levels(bytes: &[u8]) -> Vec<[u8; 3]> {
        let image = decode_image(bytes, Path::new("test.png")).unwrap();
        image.pixels.chunks(3).map(|p| [p[0], p[1], p[2]]).collect()
    }

    fn greys(levels: &[u8]) -> Vec<[u8; 3]> {
        levels.iter().map(|&l| [l, l, l]).collect()
    }

    #[test]
    fn preprocessing_decode_png_grey16_clips_like_pillow() {
        // Pillow 13.0.0 opens 16-bit grey as mode I;16 and converts to RGB by clipping.
        let samples: Vec<u8> = [0u16, 100, 255, 256, 0x1234, 0xffff]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let file = png_file(
            6,
            1,
            png::BitDepth::Sixteen,
            png::ColorType::Grayscale,
            &samples,
            None,
            None,
        );
        assert_eq!(decoded_levels(&file), greys(&[0, 100, 255, 255, 255, 255]));
        // tRNS 100 makes the pixel 100 transparent (white); 0x1234 matches nothing (its low
        // byte 0x34 is compared with the clipped level).
        let file = png_file(
            6,
            1,
            png::BitDepth::Sixteen,
            png::ColorType::Grayscale,
            &samples,
            None,
            Some(&[0, 100]),
        );
        assert_eq!(decoded_levels(&file), greys(&[0, 255, 255, 255, 255, 255]));
        let file = png_file(
            6,
            1,
            png::BitDepth::Sixteen,
            png::ColorType::Grayscale,
            &samples,
            None,
            Some(&[0x12, 0x34]),
        );
        assert_eq!(decoded_levels(&file), greys(&[0, 100, 255, 255, 255, 255]));
    }

    #[test]
    fn preprocessing_decode_png_low_bit_grey_like_pillow() {
        let file = png_file(
            4,
            1,
            png::BitDepth::Two,
            png::ColorType::Grayscale,
            &[0b0001_1011],
            None,
            None,
        );
        assert_eq!(decoded_levels(&file), greys(&[0, 85, 170, 255]));
        // Pillow compares the raw tRNS value 2 with the scaled levels: nothing matches.
        let file = png_file(
            4,
            1,
            png::BitDepth::Two,
            png::ColorType::Grayscale,
            &[0b0001_1011],
            None,
            Some(&[0, 2]),
        );
        assert_eq!(decoded_levels(&file), greys(&[0, 85, 170, 255]));
        let file = png_file(
            2,
            1,
            png::BitDepth::Four,
            png::ColorType::Grayscale,
            &[0x33],
            None,
            Some(&[0, 51]),
        );
        assert_eq!(decoded_levels(&file), greys(&[255, 255]));
        let file = png_file(
            8,
            1,
            png::BitDepth::One,
            png::ColorType::Grayscale,
            &[0b1011_0001],
            None,
            Some(&[0, 0]),
        );
        assert_eq!(decoded_levels(&file), greys(&[255; 8]));
    }

    #[test]
    fn preprocessing_decode_png_colour_modes_like_pillow() {
        // 16-bit RGB keeps the high byte; the tRNS key (1, 2, 3) is compared with the 8-bit
        // pixel (0, 0, 0) and matches nothing.
        let rgb16: Vec<u8> = [0x12ffu16, 0x3480, 0x5601, 1, 2, 3]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let file = png_file(
            2,
            1,
            png::BitDepth::Sixteen,
            png::ColorType::Rgb,
            &rgb16,
            None,
            Some(&[0, 1, 0, 2, 0, 3]),
        );
        assert_eq!(decoded_levels(&file), vec![[18, 52, 86], [0, 0, 0]]);
        // 8-bit RGB with a tRNS key whose red is 260: truncated to 4, it matches (4, 5, 6).
        let file = png_file(
            2,
            1,
            png::BitDepth::Eight,
            png::ColorType::Rgb,
            &[1, 2, 3, 4, 5, 6],
            None,
            Some(&[1, 4, 0, 5, 0, 6]),
        );
        assert_eq!(decoded_levels(&file), vec![[1, 2, 3], [255, 255, 255]]);
        // 16-bit grey + alpha: high bytes, then composited.
        let la16: Vec<u8> = [0x1234u16, 0xffff, 0xff80, 0x8000, 0x00ff, 0x00ff]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let file = png_file(
            3,
            1,
            png::BitDepth::Sixteen,
            png::ColorType::GrayscaleAlpha,
            &la16,
            None,
            None,
        );
        assert_eq!(decoded_levels(&file), greys(&[18, 255, 255]));
        // Palette with per-entry alpha; index 3 has no alpha entry (opaque).
        let palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120];
        let file = png_file(
            4,
            1,
            png::BitDepth::Two,
            png::ColorType::Indexed,
            &[0b0001_1011],
            Some(&palette),
            Some(&[0, 128]),
        );
        assert_eq!(
            decoded_levels(&file),
            vec![
                [255, 255, 255],
                [147, 152, 157],
                [70, 80, 90],
                [100, 110, 120]
            ]
        );
    }

    /// A chunk with its CRC-32 (PNG's polynomial 0xEDB88320), to build malformed files.
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut crc = 0xffff_ffffu32;
        for &byte in kind.iter().chain(data) {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&(!crc).to_be_bytes());
        out
    }

    fn png_with_header(width: u32, height: u32) -> Vec<u8> {
        let mut header = width.to_be_bytes().to_vec();
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
        file.extend(chunk(b"IHDR", &header));
        file.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        file.extend(chunk(b"IEND", &[]));
        file
    }

    #[test]
    fn preprocessing_decode_refuses_huge_and_empty_images() {
        let path = Path::new("huge.png");
        let message = decode_image(&png_with_header(0x7fff_ffff, 0x7fff_ffff), path)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("huge.png: a 2147483647x2147483647 image needs"),
            "{message}"
        );
        let message = decode_image(&png_with_header(0, 5), path)
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("huge.png: "), "{message}");
        // Declared 64x64 but the data stops: truncated.
        assert!(decode_image(&png_with_header(64, 64), path).is_err());
    }

    #[test]
    fn preprocessing_decode_refuses_truncated_jpeg_and_webp() {
        let pixels: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode(&pixels, 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(&pixels, 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        for (name, file) in [("a.jpg", &jpeg), ("a.webp", &webp)] {
            let path = Path::new(name);
            let whole = decode_image(file, path).unwrap();
            assert_eq!((whole.width, whole.height), (16, 16));
            // Pillow refuses both cuts ("image file is truncated", "could not create decoder").
            for cut in [2, file.len() / 2] {
                let message = decode_image(&file[..file.len() - cut], path)
                    .unwrap_err()
                    .to_string();
                assert!(message.starts_with(&format!("{name}: ")), "{message}");
            }
        }
        // Lossless WebP is decoded exactly.
        assert_eq!(
            decode_image(&webp, Path::new("a.webp")).unwrap().pixels,
            pixels
        );
    }

    #[test]
    fn preprocessing_decode_never_panics_on_garbage() {
        let path = Path::new("garbage.bin");
        let good = png_file(
            3,
            2,
            png::BitDepth::Eight,
            png::ColorType::Rgb,
            &[7; 18],
            None,
            None,
        );
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 100],
            b"\x89PNG\r\n\x1a\n".to_vec(),
            b"\xff\xd8\xff\xe0garbage".to_vec(),
            b"GIF89a\x01\x00".to_vec(),
            b"RIFF\x10\x00\x00\x00WEBPVP8 ".to_vec(),
            b"BM not a bitmap".to_vec(),
        ];
        for cut in 0..good.len() {
            inputs.push(good[..cut].to_vec());
        }
        // Deterministic pseudo-random bytes, alone and behind each signature.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect()
        };
        for signature in [
            &b""[..],
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff",
            b"GIF89a",
            b"RIFF\0\0\0\0WEBP",
        ] {
            for n in [1, 16, 64, 300] {
                let mut bytes = signature.to_vec();
                bytes.extend(random(n));
                inputs.push(bytes);
            }
        }
        for bytes in &inputs {
            if let Err(e) = decode_image(bytes, path) {
                assert!(e.to_string().starts_with("garbage.bin: "), "{e}");
            }
        }
        assert_eq!(decode_image(&good, path).unwrap().pixels, vec![7; 18]);
        let missing = load_image(Path::new("/nonexistent/image.png")).unwrap_err();
        assert!(
            missing.to_string().starts_with("/nonexistent/image.png: "),
            "{missing}"
        );
    }
}
