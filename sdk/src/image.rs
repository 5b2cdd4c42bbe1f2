//! Images for vision models: decode the caller's JPEG or PNG, resize, crop, and turn the pixels
//! into a normalised `f32` tensor (NCHW or NHWC, RGB or BGR).
//!
//! The usual pipelines are one line each:
//!
//! * ImageNet classifiers: [`decode`], [`resize_short_side`], [`center_crop`], [`to_tensor`];
//! * detectors that take a fixed square input: [`decode`], [`resize`] (stretch), [`to_tensor`].
//!
//! Resizing is bilinear and antialiased when shrinking (the triangle filter's support grows with
//! the scale factor), which is what Pillow's `Image.resize(..., BILINEAR)` and torchvision's
//! `Resize` on PIL images do. Results still differ from Pillow's by a grey level or two on some
//! pixels: Pillow rounds to 8 bits between its horizontal and vertical passes, the `image` crate
//! keeps `f32` in between.
//!
//! Compiled with the `image` feature of `kiln-sdk`.
//!
//! # Examples
//!
//! An ImageNet classifier's `classify` (the graph runs in the host, so this only runs inside a
//! plugin):
//!
//! ```no_run
//! use kiln_sdk::image::{center_crop, decode, resize_short_side, to_tensor};
//! use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
//! use kiln_sdk::{scores, tensor_f32, to_f32_vec, ClassScore, Error, Graph, Image};
//!
//! const IMAGENET: TensorSpec = TensorSpec {
//!     layout: Layout::Nchw,
//!     order: ChannelOrder::Rgb,
//!     mean: [123.675, 116.28, 103.53],
//!     std: [58.395, 57.12, 57.375],
//! };
//!
//! fn classify(image: Image, labels: &[String], top_k: u32) -> Result<Vec<ClassScore>, Error> {
//!     let rgb = decode(&image.bytes, 4096 * 4096)?;
//!     let rgb = center_crop(&resize_short_side(&rgb, 256)?, 224, 224)?;
//!     let input = tensor_f32(&IMAGENET.dims(224, 224), &to_tensor(&rgb, &IMAGENET));
//!     let mut outputs = Graph::load("model")?.compute(vec![("input", input)])?;
//!     let logits = to_f32_vec(&outputs.take("logits")?)?;
//!     scores::ranked_top_k(labels, &scores::softmax(&logits), top_k as usize)
//! }
//! # let _ = classify;
//! ```

use std::io::Cursor;

use ::image::imageops::{self, FilterType};
use ::image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use serde::Deserialize;

use crate::Error;

/// An 8-bit RGB image, row-major, 3 bytes per pixel (the `image` crate's type).
pub use ::image::RgbImage;

/// How much longer than wide (or wider than long) an image may be for [`resize_short_side`].
///
/// Resizing the short side of a 1 x 10,000 image to 256 would make a 256 x 2,560,000 image
/// (2 GB of pixels) from a tiny input; a centre crop of something that elongated sees a sliver of
/// it anyway.
pub const MAX_ASPECT_RATIO: u32 = 16;

/// Decodes a JPEG or PNG into 8-bit RGB, refusing images of more than `max_pixels` pixels.
///
/// The host has already read the header and checked its size; this check is defence in depth
/// (the limit is enforced again from the decoder's own header, before any pixel is decoded, and
/// the decoder's allocations are capped accordingly). Grey images are expanded to RGB, alpha is
/// dropped (not composited), 16-bit channels are reduced to 8 bits, and EXIF orientation is not
/// applied (as Pillow's `Image.open(...).convert("RGB")`).
///
/// Any failure is the caller's: [`Error::InvalidInput`] with what was wrong.
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::decode;
/// use kiln_sdk::Error;
///
/// // A 2 x 1 PNG, a red pixel then a blue one (in a plugin: the request's `image.bytes`).
/// # let png: &[u8] = b"\
/// #     \x89PNG\x0d\x0a\x1a\x0a\x00\x00\x00\x0dIHDR\x00\x00\x00\x02\x00\x00\
/// #     \x00\x01\x08\x02\x00\x00\x00{@\xe8\xdd\x00\x00\x00\x0dIDATx\xdac\xf8\
/// #     \xcf\x00\x04\xff\x01\x07\x00\x01\xff=}\x8cI\x00\x00\x00\x00IEND\xaeB`\
/// #     \x82";
/// let image = decode(png, 4096 * 4096)?;
/// assert_eq!(image.dimensions(), (2, 1));
/// assert_eq!(image.get_pixel(0, 0).0, [255, 0, 0]);
/// assert_eq!(image.get_pixel(1, 0).0, [0, 0, 255]);
///
/// // More pixels than allowed, or not a JPEG or PNG: the caller's error.
/// assert!(matches!(decode(png, 1), Err(Error::InvalidInput(_))));
/// assert!(matches!(decode(b"GIF89a", 100), Err(Error::InvalidInput(_))));
/// # Ok::<(), Error>(())
/// ```
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, Error> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::invalid_input(format!("reading the image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png) => {}
        Some(other) => {
            return Err(Error::invalid_input(format!(
                "image format {other:?} is not supported: send JPEG or PNG"
            )))
        }
        None => {
            return Err(Error::invalid_input(
                "the data is not an image (JPEG or PNG expected)",
            ))
        }
    }
    let mut limits = Limits::default();
    // The widest decoded pixel is 16-bit RGBA (8 bytes); anything allocating more than that per
    // allowed pixel is a decompression bomb, not an image.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| Error::invalid_input(format!("decoding the image: {e}")))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(Error::invalid_input(format!(
            "the image is {width}x{height} pixels"
        )));
    }
    if pixels > max_pixels {
        return Err(Error::invalid_input(format!(
            "the image is {width}x{height} = {pixels} pixels; at most {max_pixels} are accepted"
        )));
    }
    let image = DynamicImage::from_decoder(decoder)
        .map_err(|e| Error::invalid_input(format!("decoding the image: {e}")))?;
    Ok(image.into_rgb8())
}

/// Resizes to exactly `width` x `height` (stretching if the aspect ratio changes), bilinear,
/// antialiased when shrinking (see the module docs). A zero size gives an empty image.
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::{resize, RgbImage};
///
/// // A detector's fixed 416 x 416 input from a 640 x 480 photo.
/// let photo = RgbImage::from_pixel(640, 480, [200, 100, 50].into());
/// let input = resize(&photo, 416, 416);
/// assert_eq!(input.dimensions(), (416, 416));
/// assert!(input.pixels().all(|p| p.0 == [200, 100, 50]));
/// ```
pub fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    imageops::resize(image, width, height, FilterType::Triangle)
}

/// The size of `image` after scaling its short side to `short`, keeping the aspect ratio; the
/// long side is truncated as torchvision's `Resize(short)` does (`int(short * long / short_side)`).
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::short_side_size;
///
/// // torchvision: int(256 * 640 / 480) = 341.
/// assert_eq!(short_side_size(640, 480, 256), (341, 256));
/// assert_eq!(short_side_size(480, 640, 256), (256, 341));
/// ```
pub fn short_side_size(width: u32, height: u32, short: u32) -> (u32, u32) {
    let scale = |long: u32, short_side: u32| {
        let scaled = u64::from(short) * u64::from(long) / u64::from(short_side.max(1));
        u32::try_from(scaled).unwrap_or(u32::MAX)
    };
    if width <= height {
        (short, scale(height, width))
    } else {
        (scale(width, height), short)
    }
}

/// Resizes so that the short side is `short` pixels, keeping the aspect ratio (see
/// [`short_side_size`]); bilinear, antialiased when shrinking.
///
/// Refuses ([`Error::InvalidInput`]) an image more elongated than 1:[`MAX_ASPECT_RATIO`].
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::{resize_short_side, RgbImage};
///
/// let photo = RgbImage::new(640, 480);
/// assert_eq!(resize_short_side(&photo, 256)?.dimensions(), (341, 256));
///
/// // 1:20 is too elongated.
/// assert!(resize_short_side(&RgbImage::new(20, 400), 256).is_err());
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn resize_short_side(image: &RgbImage, short: u32) -> Result<RgbImage, Error> {
    let (width, height) = image.dimensions();
    let (short_side, long_side) = (width.min(height), width.max(height));
    if short_side == 0 || u64::from(long_side) > u64::from(short_side) * u64::from(MAX_ASPECT_RATIO)
    {
        return Err(Error::invalid_input(format!(
            "the image is {width}x{height} pixels; its aspect ratio may be at most \
             1:{MAX_ASPECT_RATIO}"
        )));
    }
    let (new_width, new_height) = short_side_size(width, height, short);
    Ok(resize(image, new_width, new_height))
}

/// The central `width` x `height` region; the offset is `(size - crop) / 2`, rounded down.
///
/// Fails with [`Error::InvalidInput`] if the image is smaller than the crop.
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::{center_crop, RgbImage};
///
/// let image = RgbImage::from_fn(10, 8, |x, y| [x as u8, y as u8, 0].into());
/// let crop = center_crop(&image, 4, 4)?;
/// assert_eq!(crop.dimensions(), (4, 4));
/// // Offsets (10 - 4) / 2 = 3 and (8 - 4) / 2 = 2.
/// assert_eq!(crop.get_pixel(0, 0).0, [3, 2, 0]);
///
/// assert!(center_crop(&image, 11, 4).is_err());
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn center_crop(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage, Error> {
    let (image_width, image_height) = image.dimensions();
    if width > image_width || height > image_height {
        return Err(Error::invalid_input(format!(
            "cannot crop {width}x{height} pixels out of a {image_width}x{image_height} image"
        )));
    }
    let left = (image_width - width) / 2;
    let top = (image_height - height) / 2;
    Ok(imageops::crop_imm(image, left, top, width, height).to_image())
}

/// Where the channels go in a tensor.
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::Layout;
///
/// assert_eq!(Layout::default(), Layout::Nchw);
/// // As written in `[plugin.config]` (`layout = "nhwc"`), read with `kiln_sdk::config`.
/// let layout: Layout = serde_json::from_str(r#""nhwc""#).unwrap();
/// assert_eq!(layout, Layout::Nhwc);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[1, 3, height, width]`: one plane per channel (PyTorch, ONNX exports of it).
    #[default]
    Nchw,
    /// `[1, height, width, 3]`: channels interleaved per pixel (TensorFlow).
    Nhwc,
}

/// The order of the colour channels in a tensor.
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::ChannelOrder;
///
/// assert_eq!(ChannelOrder::default(), ChannelOrder::Rgb);
/// // As written in `[plugin.config]` (`channel_order = "bgr"`), read with `kiln_sdk::config`.
/// let order: ChannelOrder = serde_json::from_str(r#""bgr""#).unwrap();
/// assert_eq!(order, ChannelOrder::Bgr);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (OpenCV-trained models).
    Bgr,
}

/// How pixels become tensor values: `(pixel - mean[c]) / std[c]` with `pixel` in 0..=255 and `c`
/// the channel's index in the tensor (so for [`ChannelOrder::Bgr`], `mean[0]` is blue's).
///
/// # Examples
///
/// ImageNet's normalisation (torchvision's `mean=[0.485, 0.456, 0.406]`,
/// `std=[0.229, 0.224, 0.225]`, times 255):
///
/// ```
/// use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
///
/// let spec = TensorSpec {
///     layout: Layout::Nchw,
///     order: ChannelOrder::Rgb,
///     mean: [123.675, 116.28, 103.53],
///     std: [58.395, 57.12, 57.375],
/// };
/// assert_eq!(spec.dims(224, 224), [1, 3, 224, 224]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorSpec {
    /// Planes or interleaved channels.
    pub layout: Layout,
    /// RGB or BGR.
    pub order: ChannelOrder,
    /// Per-channel mean, in the tensor's channel order, on the 0..=255 scale.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in the tensor's channel order, on the 0..=255 scale.
    pub std: [f32; 3],
}

impl TensorSpec {
    /// The shape of the tensor for an image of `width` x `height`, batch 1.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
    ///
    /// let spec = TensorSpec {
    ///     layout: Layout::Nhwc,
    ///     order: ChannelOrder::Bgr,
    ///     mean: [0.0; 3],
    ///     std: [1.0; 3],
    /// };
    /// // Width 320, height 240.
    /// assert_eq!(spec.dims(320, 240), [1, 240, 320, 3]);
    /// ```
    pub fn dims(&self, width: u32, height: u32) -> [u32; 4] {
        match self.layout {
            Layout::Nchw => [1, 3, height, width],
            Layout::Nhwc => [1, height, width, 3],
        }
    }
}

/// The image's pixels as a normalised `f32` tensor, batch 1, shape [`TensorSpec::dims`], ready
/// for [`tensor_f32`](crate::tensor_f32).
///
/// # Examples
///
/// ```
/// use kiln_sdk::image::{to_tensor, ChannelOrder, Layout, RgbImage, TensorSpec};
///
/// // 2 x 1 pixels: (10, 20, 30) and (40, 50, 60).
/// let image = RgbImage::from_raw(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap();
/// let mut spec = TensorSpec {
///     layout: Layout::Nchw,
///     order: ChannelOrder::Rgb,
///     mean: [0.0; 3],
///     std: [10.0; 3],
/// };
/// // One plane per channel: R R G G B B.
/// assert_eq!(to_tensor(&image, &spec), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
///
/// // Interleaved, blue first: B G R B G R.
/// spec.layout = Layout::Nhwc;
/// spec.order = ChannelOrder::Bgr;
/// assert_eq!(to_tensor(&image, &spec), [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
/// ```
pub fn to_tensor(image: &RgbImage, spec: &TensorSpec) -> Vec<f32> {
    let (width, height) = image.dimensions();
    let plane = width as usize * height as usize;
    // Source channel (in the RGB image) of each tensor channel.
    let source = match spec.order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let mut out = vec![0.0f32; plane * 3];
    for (i, pixel) in image.pixels().enumerate() {
        for (c, &channel) in source.iter().enumerate() {
            let value = (f32::from(pixel.0[channel]) - spec.mean[c]) / spec.std[c];
            let index = match spec.layout {
                Layout::Nchw => c * plane + i,
                Layout::Nhwc => i * 3 + c,
            };
            out[index] = value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::{ImageEncoder, Rgb, RgbaImage};

    fn png(image: &RgbImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                image.as_raw(),
                image.width(),
                image.height(),
                ::image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        bytes
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    #[test]
    fn decodes_png_and_jpeg() {
        let image = gradient(7, 5);
        assert_eq!(decode(&png(&image), 35).unwrap(), image);

        let mut jpeg = Vec::new();
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .write_image(image.as_raw(), 7, 5, ::image::ExtendedColorType::Rgb8)
            .unwrap();
        let decoded = decode(&jpeg, 35).unwrap();
        assert_eq!(decoded.dimensions(), (7, 5));
    }

    #[test]
    fn drops_alpha() {
        let rgba = RgbaImage::from_pixel(2, 2, ::image::Rgba([10, 20, 30, 0]));
        let mut bytes = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(rgba.as_raw(), 2, 2, ::image::ExtendedColorType::Rgba8)
            .unwrap();
        let decoded = decode(&bytes, 4).unwrap();
        assert_eq!(decoded.get_pixel(1, 1), &Rgb([10, 20, 30]));
    }

    #[test]
    fn refuses_more_pixels_than_the_cap() {
        let bytes = png(&gradient(7, 5));
        let Err(Error::InvalidInput(message)) = decode(&bytes, 34) else {
            panic!("35 pixels decoded under a 34-pixel cap");
        };
        assert!(message.contains("7x5 = 35 pixels"), "{message}");
    }

    #[test]
    fn refuses_garbage_and_other_formats() {
        assert!(matches!(
            decode(b"not an image at all", 100),
            Err(Error::InvalidInput(_))
        ));
        // A GIF signature: recognised, but not a format the plugin accepts.
        assert!(matches!(
            decode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", 100),
            Err(Error::InvalidInput(_))
        ));
        // A truncated PNG: valid signature, then nothing.
        let bytes = png(&gradient(7, 5));
        assert!(matches!(
            decode(&bytes[..40], 100),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn short_side_sizes_truncate_like_torchvision() {
        // torchvision: int(256 * 640 / 480) = 341
        assert_eq!(short_side_size(640, 480, 256), (341, 256));
        assert_eq!(short_side_size(480, 640, 256), (256, 341));
        assert_eq!(short_side_size(512, 512, 256), (256, 256));
    }

    #[test]
    fn resizes_a_uniform_image_to_the_same_colour() {
        let image = RgbImage::from_pixel(640, 480, Rgb([200, 100, 50]));
        let resized = resize_short_side(&image, 256).unwrap();
        assert_eq!(resized.dimensions(), (341, 256));
        assert!(resized.pixels().all(|p| *p == Rgb([200, 100, 50])));
    }

    #[test]
    fn shrinking_is_antialiased() {
        // A one-pixel checkerboard halved: a non-antialiased bilinear sample would pick pixels
        // and keep the pattern; an antialiased one averages to mid-grey.
        let image = RgbImage::from_fn(64, 64, |x, y| {
            if (x + y) % 2 == 0 {
                Rgb([255; 3])
            } else {
                Rgb([0; 3])
            }
        });
        let small = resize(&image, 32, 32);
        for p in small.pixels().skip(33).take(20) {
            assert!((i32::from(p.0[0]) - 128).abs() <= 2, "{p:?}");
        }
    }

    #[test]
    fn refuses_very_elongated_images() {
        let image = RgbImage::new(1, 100);
        assert!(matches!(
            resize_short_side(&image, 256),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn crops_the_centre() {
        let image = gradient(10, 8);
        let crop = center_crop(&image, 4, 4).unwrap();
        assert_eq!(crop.dimensions(), (4, 4));
        // offsets (10-4)/2 = 3 and (8-4)/2 = 2
        assert_eq!(crop.get_pixel(0, 0), image.get_pixel(3, 2));
        assert_eq!(crop.get_pixel(3, 3), image.get_pixel(6, 5));
        assert!(center_crop(&image, 11, 4).is_err());
    }

    #[test]
    fn tensors_in_every_layout_and_order() {
        // 2x1 image: pixel 0 = (10, 20, 30), pixel 1 = (40, 50, 60).
        let image = RgbImage::from_raw(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap();
        let mut spec = TensorSpec {
            layout: Layout::Nchw,
            order: ChannelOrder::Rgb,
            mean: [0.0, 0.0, 0.0],
            std: [1.0, 1.0, 1.0],
        };
        assert_eq!(spec.dims(2, 1), [1, 3, 1, 2]);
        assert_eq!(
            to_tensor(&image, &spec),
            [10.0, 40.0, 20.0, 50.0, 30.0, 60.0]
        );
        spec.order = ChannelOrder::Bgr;
        assert_eq!(
            to_tensor(&image, &spec),
            [30.0, 60.0, 20.0, 50.0, 10.0, 40.0]
        );
        spec.layout = Layout::Nhwc;
        assert_eq!(spec.dims(2, 1), [1, 1, 2, 3]);
        assert_eq!(
            to_tensor(&image, &spec),
            [30.0, 20.0, 10.0, 60.0, 50.0, 40.0]
        );
        // (pixel - mean) / std per tensor channel: here B, G, R.
        spec.mean = [30.0, 0.0, 10.0];
        spec.std = [2.0, 4.0, 5.0];
        assert_eq!(to_tensor(&image, &spec), [0.0, 5.0, 0.0, 15.0, 12.5, 6.0]);
    }
}
