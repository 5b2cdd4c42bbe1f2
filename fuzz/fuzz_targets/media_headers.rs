//! Image (PNG, JPEG) and WAV header inspection, as the host runs it on every image and audio
//! input before a plugin sees a byte. The first byte picks image or WAV, the next four the
//! limit; the rest is the file.
//!
//! Properties: an accepted image is JPEG or PNG with both sides non-zero and at most the limit
//! in pixels; an accepted WAV has 1-8 channels, 8-384 kHz, and lasts at most the limit, no
//! longer than its bytes allow.
#![no_main]

use kiln_wire::media::{inspect_image, inspect_wav, WavEncoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (head, file) = data.split_at(5);
    let limit = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if head[0] & 1 == 0 {
        // Pixel limits as operators set them: up to a few hundred megapixels, and no limit.
        let max_pixels = if head[0] & 2 == 0 {
            u64::from(limit)
        } else {
            u64::MAX
        };
        if let Ok(h) = inspect_image(file, max_pixels) {
            assert!(h.format == "png" || h.format == "jpeg");
            assert!(h.width > 0 && h.height > 0);
            assert!(u64::from(h.width) * u64::from(h.height) <= max_pixels);
        }
    } else {
        let max_seconds = limit % 100_000;
        if let Ok(h) = inspect_wav(file, max_seconds) {
            assert!((1..=8).contains(&h.channels));
            assert!((8_000..=384_000).contains(&h.sample_rate));
            assert!(u64::from(h.duration_ms) <= u64::from(max_seconds) * 1000);
            let bytes_per_frame = u64::from(h.channels)
                * match h.encoding {
                    WavEncoding::Pcm16 => 2,
                    WavEncoding::Float32 => 4,
                };
            // The duration counts only frames present in the file.
            let frames = u64::from(h.duration_ms) * u64::from(h.sample_rate) / 1000;
            assert!(frames * bytes_per_frame <= file.len() as u64);
        }
    }
});
