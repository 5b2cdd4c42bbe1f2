//! Untrusted media, checked by the host without decoding it.
//!
//! The host reads only what it needs to refuse oversized input before a plugin sees a byte: an
//! image's format and pixel count from its header, a WAV file's format and duration from its
//! chunks. Decoding happens in the plugin's sandbox, so a decoder bug (or a decompression bomb
//! that slipped past the header) stays there. Every refusal says what was wrong.

use base64::Engine as _;

/// What was wrong with a media input. `Encoding` is a 400 (the JSON value is not base64),
/// `Unsupported` a 422, `TooLarge` a 413.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("{0}")]
    Encoding(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    TooLarge(String),
}

/// Decodes `data:<mime>;base64,<data>` or bare base64 (standard alphabet, padding optional,
/// whitespace ignored).
pub fn decode_base64(field: &str, value: &str) -> Result<Vec<u8>, MediaError> {
    let data = match value.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest.split_once(',').ok_or_else(|| {
                MediaError::Encoding(format!("`{field}` is a data URL without a ','"))
            })?;
            if !meta.ends_with(";base64") {
                return Err(MediaError::Encoding(format!(
                    "`{field}` must be a base64 data URL (data:<type>;base64,...)"
                )));
            }
            data
        }
        None => value,
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(cleaned.trim_end_matches('='))
        .map_err(|e| MediaError::Encoding(format!("`{field}` is not valid base64: {e}")))
}

/// An image's header, as read by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Reads the format and size of a JPEG or PNG from its header; refuses more than `max_pixels`.
pub fn inspect_image(bytes: &[u8], max_pixels: u64) -> Result<ImageHeader, MediaError> {
    let format = match imagesize::image_type(bytes) {
        Ok(imagesize::ImageType::Jpeg) => "jpeg",
        Ok(imagesize::ImageType::Png) => "png",
        Ok(other) => {
            return Err(MediaError::Unsupported(format!(
                "image format {other:?} is not supported: send JPEG or PNG"
            )))
        }
        Err(_) => {
            return Err(MediaError::Unsupported(
                "the data is not an image (JPEG or PNG expected)".into(),
            ))
        }
    };
    let size = imagesize::blob_size(bytes)
        .map_err(|e| MediaError::Unsupported(format!("could not read the {format} header: {e}")))?;
    let (width, height) = (size.width as u64, size.height as u64);
    if width == 0 || height == 0 {
        return Err(MediaError::Unsupported(format!(
            "the {format} header says {width}x{height} pixels"
        )));
    }
    let pixels = width.saturating_mul(height);
    if pixels > max_pixels {
        return Err(MediaError::TooLarge(format!(
            "the image is {width}x{height} = {pixels} pixels; this model accepts at most {max_pixels}"
        )));
    }
    Ok(ImageHeader {
        format,
        width: width as u32,
        height: height as u32,
    })
}

/// Sample encodings of WAV data that plugins decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WavEncoding {
    Pcm16,
    Float32,
}

/// A WAV file's format, as read by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavHeader {
    pub encoding: WavEncoding,
    pub sample_rate: u32,
    pub channels: u16,
    pub duration_ms: u32,
}

const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 3;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads a RIFF/WAVE header: PCM 16-bit or IEEE float 32-bit, 1-8 channels, 8-384 kHz; refuses
/// audio longer than `max_seconds`.
pub fn inspect_wav(bytes: &[u8], max_seconds: u32) -> Result<WavHeader, MediaError> {
    let not_wav =
        |why: &str| MediaError::Unsupported(format!("the data is not a usable WAV file: {why}"));
    if bytes.get(0..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err(not_wav("no RIFF/WAVE header"));
    }
    let mut at = 12;
    let mut fmt: Option<(WavEncoding, u16, u32, u16)> = None;
    while let (Some(id), Some(size)) = (bytes.get(at..at + 4), u32_at(bytes, at + 4)) {
        let body = at + 8;
        let size = size as usize;
        match id {
            b"fmt " => {
                let tag = u16_at(bytes, body).ok_or_else(|| not_wav("short fmt chunk"))?;
                let channels = u16_at(bytes, body + 2).ok_or_else(|| not_wav("short fmt chunk"))?;
                let rate = u32_at(bytes, body + 4).ok_or_else(|| not_wav("short fmt chunk"))?;
                let block_align =
                    u16_at(bytes, body + 12).ok_or_else(|| not_wav("short fmt chunk"))?;
                let bits = u16_at(bytes, body + 14).ok_or_else(|| not_wav("short fmt chunk"))?;
                // WAVE_FORMAT_EXTENSIBLE keeps the real format in its sub-format GUID.
                let tag = if tag == WAVE_FORMAT_EXTENSIBLE {
                    u16_at(bytes, body + 24).ok_or_else(|| not_wav("short extensible fmt chunk"))?
                } else {
                    tag
                };
                let encoding = match (tag, bits) {
                    (WAVE_FORMAT_PCM, 16) => WavEncoding::Pcm16,
                    (WAVE_FORMAT_IEEE_FLOAT, 32) => WavEncoding::Float32,
                    _ => {
                        return Err(MediaError::Unsupported(format!(
                            "WAV format {tag} with {bits}-bit samples is not supported: send 16-bit PCM or 32-bit float"
                        )))
                    }
                };
                if !(1..=8).contains(&channels) {
                    return Err(not_wav(&format!("{channels} channels")));
                }
                if !(8_000..=384_000).contains(&rate) {
                    return Err(not_wav(&format!("sample rate {rate} Hz")));
                }
                if block_align != channels * (bits / 8) {
                    return Err(not_wav(&format!("block align {block_align}")));
                }
                fmt = Some((encoding, channels, rate, block_align));
            }
            b"data" => {
                let Some((encoding, channels, sample_rate, block_align)) = fmt else {
                    return Err(not_wav("data chunk before the fmt chunk"));
                };
                // A truncated file (or a streaming writer's placeholder size) has fewer bytes.
                let available = bytes.len().saturating_sub(body).min(size);
                let frames = (available / usize::from(block_align)) as u64;
                let duration_ms = frames * 1000 / u64::from(sample_rate);
                if duration_ms > u64::from(max_seconds) * 1000 {
                    return Err(MediaError::TooLarge(format!(
                        "the audio is {:.1} s long; this model accepts at most {max_seconds} s",
                        duration_ms as f64 / 1000.0
                    )));
                }
                return Ok(WavHeader {
                    encoding,
                    sample_rate,
                    channels,
                    duration_ms: duration_ms as u32,
                });
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body.saturating_add(size).saturating_add(size & 1);
    }
    Err(not_wav("no data chunk"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn wav(tag: u16, bits: u16, channels: u16, rate: u32, frames: u32) -> Vec<u8> {
        let block = channels * bits / 8;
        let data_len = frames * u32::from(block);
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data_len).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&data_len.to_le_bytes());
        v.resize(v.len() + data_len as usize, 0);
        v
    }

    #[test]
    fn base64_forms() {
        assert_eq!(decode_base64("image", "aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("image", "aGk").unwrap(), b"hi");
        assert_eq!(
            decode_base64("image", "data:image/png;base64,aG\nk=").unwrap(),
            b"hi"
        );
        assert!(matches!(
            decode_base64("image", "data:image/png,aGk="),
            Err(MediaError::Encoding(_))
        ));
        let err = decode_base64("image", "not base64!")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`image` is not valid base64"), "{err}");
    }

    #[test]
    fn png_header_and_pixel_limit() {
        // A PNG signature and IHDR claiming 100000 x 100000 pixels (a decompression bomb's
        // header): refused from 33 bytes, without decoding.
        let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let err = inspect_image(&png, 50_000_000).unwrap_err();
        assert!(
            matches!(err, MediaError::TooLarge(ref m) if m.contains("100000x100000")),
            "{err}"
        );
        let header = inspect_image(&png, u64::MAX).unwrap();
        assert_eq!(
            (header.format, header.width, header.height),
            ("png", 100_000, 100_000)
        );
        assert!(matches!(
            inspect_image(b"hello world, not an image", 1),
            Err(MediaError::Unsupported(_))
        ));
        let mut gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00".to_vec();
        gif.resize(64, 0);
        let err = inspect_image(&gif, 100).unwrap_err();
        assert!(
            matches!(err, MediaError::Unsupported(ref m) if m.contains("Gif") && m.contains("JPEG or PNG")),
            "{err}"
        );
    }

    #[test]
    fn wav_headers() {
        let h = inspect_wav(&wav(1, 16, 1, 16_000, 32_000), 60).unwrap();
        assert_eq!(
            h,
            WavHeader {
                encoding: WavEncoding::Pcm16,
                sample_rate: 16_000,
                channels: 1,
                duration_ms: 2000
            }
        );
        let h = inspect_wav(&wav(3, 32, 2, 44_100, 44_100), 60).unwrap();
        assert_eq!(
            (h.encoding, h.channels, h.duration_ms),
            (WavEncoding::Float32, 2, 1000)
        );
        let err = inspect_wav(&wav(1, 16, 1, 8_000, 8_000 * 61), 60).unwrap_err();
        assert!(
            matches!(err, MediaError::TooLarge(ref m) if m.contains("61.0 s")),
            "{err}"
        );
        let err = inspect_wav(&wav(1, 8, 1, 16_000, 10), 60)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8-bit"), "{err}");
        assert!(inspect_wav(b"RIFF\x00\x00\x00\x00WAVE", 60).is_err());
        assert!(inspect_wav(b"not a wav", 60).is_err());
        // Truncated data: the duration counts only the bytes present.
        let mut short = wav(1, 16, 1, 16_000, 16_000);
        short.truncate(44 + 3200);
        assert_eq!(inspect_wav(&short, 60).unwrap().duration_ms, 100);
        // Every prefix of a valid file is an error or a header, never a panic.
        let full = wav(3, 32, 2, 48_000, 100);
        for n in 0..full.len() {
            let _ = inspect_wav(&full[..n], 60);
        }
    }
}
