//! Audio for speech models (feature `audio`): WAV decoding, band-limited resampling, `.npy`
//! matrices, and Whisper's log-mel front end.
//!
//! A typical ASR plugin does
//!
//! ```no_run
//! use kiln_sdk::audio::{self, LogMel, WHISPER_SAMPLE_RATE};
//! # fn run(wav: &[u8], npy: &[u8]) -> Result<(), kiln_sdk::Error> {
//! let log_mel = LogMel::new(&audio::read_npy_f32(npy)?)?; // once, in `init`
//! let wave = audio::decode_wav(wav)?; // mono, f32 in [-1, 1]
//! let samples = audio::resample(&wave.samples, wave.sample_rate, WHISPER_SAMPLE_RATE);
//! for window in samples.chunks(audio::WHISPER_WINDOW_SAMPLES) {
//!     let features = log_mel.compute(window); // [n_mels, 3000], row-major
//!     # let _ = features;
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::Error;

/// The sample rate of Whisper's front end, Hz.
pub const WHISPER_SAMPLE_RATE: u32 = 16_000;
/// Samples in one 30 s Whisper window (at [`WHISPER_SAMPLE_RATE`]).
pub const WHISPER_WINDOW_SAMPLES: usize = 480_000;
/// STFT frame length (25 ms).
pub const N_FFT: usize = 400;
/// STFT hop (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Frequency bins of the power spectrum: `N_FFT / 2 + 1`.
pub const N_FREQS: usize = N_FFT / 2 + 1;
/// Frames of one window's log-mel: `WHISPER_WINDOW_SAMPLES / HOP_LENGTH`.
pub const N_FRAMES: usize = WHISPER_WINDOW_SAMPLES / HOP_LENGTH;

/// Decoded audio: one channel of samples in [-1, 1] and its rate.
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::{resample, Waveform, WHISPER_SAMPLE_RATE};
///
/// let wave = Waveform { samples: vec![0.0; 8_000], sample_rate: 8_000 }; // 1 s at 8 kHz
/// let samples = resample(&wave.samples, wave.sample_rate, WHISPER_SAMPLE_RATE);
/// assert_eq!(samples.len(), 16_000);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Waveform {
    /// Mono samples (the channels' average).
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
}

const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 3;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;
/// The tail shared by the KSDATAFORMAT_SUBTYPE_* GUIDs after their first two bytes (the format
/// tag).
const SUBFORMAT_GUID_TAIL: [u8; 14] = [
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71,
];

/// Decodes a RIFF/WAVE file to mono `f32`: PCM 16-bit or IEEE float 32-bit, plain or
/// `WAVE_FORMAT_EXTENSIBLE`, any number of channels (averaged). Unknown chunks are skipped; a
/// `data` chunk that claims more bytes than the file holds (a streamed WAV) is read to the end
/// of the file, and a trailing partial frame is ignored.
///
/// Every failure is [`Error::InvalidInput`]: the bytes are the caller's.
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::decode_wav;
/// use kiln_sdk::Error;
///
/// # /// A mono 16-bit PCM WAV file.
/// # fn wav_pcm16(sample_rate: u32, samples: &[i16]) -> Vec<u8> {
/// #     let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
/// #     let mut wav = b"RIFF".to_vec();
/// #     wav.extend((36 + data.len() as u32).to_le_bytes());
/// #     wav.extend(b"WAVEfmt \x10\0\0\0\x01\0\x01\0");
/// #     wav.extend(sample_rate.to_le_bytes());
/// #     wav.extend((sample_rate * 2).to_le_bytes());
/// #     wav.extend(b"\x02\0\x10\0data");
/// #     wav.extend((data.len() as u32).to_le_bytes());
/// #     wav.extend(data);
/// #     wav
/// # }
/// // In a plugin: the request's `audio.bytes`.
/// let bytes = wav_pcm16(16_000, &[0, 16384, -32768]);
/// let wave = decode_wav(&bytes)?;
/// assert_eq!(wave.sample_rate, 16_000);
/// assert_eq!(wave.samples, [0.0, 0.5, -1.0]);
///
/// assert!(matches!(decode_wav(b"ID3 an mp3"), Err(Error::InvalidInput(_))));
/// # Ok::<(), Error>(())
/// ```
pub fn decode_wav(bytes: &[u8]) -> Result<Waveform, Error> {
    let bad = |message: &str| Error::invalid_input(format!("audio: {message}"));
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("not a RIFF/WAVE file"));
    }
    let mut format: Option<Format> = None;
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32_le(&bytes[pos + 4..pos + 8]) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            let end = body.checked_add(size).filter(|&e| e <= bytes.len());
            let end = end.ok_or_else(|| bad("the fmt chunk is truncated"))?;
            format = Some(Format::parse(&bytes[body..end]).map_err(|m| bad(&m))?);
        } else if id == b"data" {
            let format = format.ok_or_else(|| bad("the data chunk comes before the fmt chunk"))?;
            let end = body.saturating_add(size).min(bytes.len());
            return Ok(format.decode(&bytes[body..end]));
        }
        // Chunks are padded to an even size.
        pos = body.saturating_add(size).saturating_add(size & 1);
    }
    Err(bad("no data chunk"))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SampleFormat {
    Pcm16,
    Float32,
}

#[derive(Debug, Clone, Copy)]
struct Format {
    sample: SampleFormat,
    channels: usize,
    sample_rate: u32,
    block_align: usize,
}

impl Format {
    fn parse(fmt: &[u8]) -> Result<Format, String> {
        if fmt.len() < 16 {
            return Err(format!(
                "the fmt chunk is {} bytes, expected 16 or more",
                fmt.len()
            ));
        }
        let mut tag = u16_le(&fmt[0..2]);
        let channels = usize::from(u16_le(&fmt[2..4]));
        let sample_rate = u32_le(&fmt[4..8]);
        let block_align = usize::from(u16_le(&fmt[12..14]));
        let bits = u16_le(&fmt[14..16]);
        if tag == WAVE_FORMAT_EXTENSIBLE {
            // cbSize, wValidBitsPerSample, dwChannelMask, then the sub-format GUID.
            if fmt.len() < 40 {
                return Err("WAVE_FORMAT_EXTENSIBLE without its sub-format".to_owned());
            }
            let guid = &fmt[24..40];
            if guid[2..] != SUBFORMAT_GUID_TAIL {
                return Err("WAVE_FORMAT_EXTENSIBLE with an unknown sub-format GUID".to_owned());
            }
            tag = u16_le(&guid[0..2]);
        }
        let sample = match (tag, bits) {
            (WAVE_FORMAT_PCM, 16) => SampleFormat::Pcm16,
            (WAVE_FORMAT_IEEE_FLOAT, 32) => SampleFormat::Float32,
            _ => {
                return Err(format!(
                    "unsupported encoding (format tag {tag}, {bits} bits per sample): \
                     use 16-bit PCM or 32-bit float"
                ))
            }
        };
        if channels == 0 {
            return Err("0 channels".to_owned());
        }
        if sample_rate == 0 {
            return Err("a sample rate of 0 Hz".to_owned());
        }
        let bytes_per_sample = usize::from(bits / 8);
        if block_align != channels * bytes_per_sample {
            return Err(format!(
                "block align {block_align} does not match {channels} channels of {bits} bits"
            ));
        }
        Ok(Format {
            sample,
            channels,
            sample_rate,
            block_align,
        })
    }

    fn decode(&self, data: &[u8]) -> Waveform {
        let scale = 1.0 / self.channels as f32;
        let samples = data
            .chunks_exact(self.block_align)
            .map(|frame| {
                let sum: f32 = match self.sample {
                    SampleFormat::Pcm16 => frame
                        .chunks_exact(2)
                        .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])) / 32768.0)
                        .sum(),
                    SampleFormat::Float32 => frame
                        .chunks_exact(4)
                        .map(|s| f32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                        .sum(),
                };
                sum * scale
            })
            .collect();
        Waveform {
            samples,
            sample_rate: self.sample_rate,
        }
    }
}

fn u16_le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Zero crossings of the resampling kernel on each side of its centre.
const RESAMPLE_ZEROS: usize = 24;
/// Kernel table entries per zero crossing (linear interpolation between them).
const RESAMPLE_TABLE_RESOLUTION: usize = 512;
/// Cutoff as a fraction of the lower of the two Nyquist frequencies.
const RESAMPLE_CUTOFF: f64 = 0.9;
/// Kaiser window shape: about 80 dB of stopband attenuation.
const RESAMPLE_KAISER_BETA: f64 = 8.0;

/// Resamples `samples` from `from_rate` to `to_rate` Hz with a band-limited (windowed-sinc)
/// interpolator, for any pair of rates.
///
/// Each output sample is the input convolved with a Kaiser-windowed sinc (beta 8, 24 zero
/// crossings each side) whose cutoff is 0.9 x the lower Nyquist frequency, so the transition
/// band ends at that Nyquist frequency: going down to 16 kHz, content is flat (within 0.01 dB)
/// to about 6.4 kHz, rolls off to 8 kHz, and whatever lies above 8 kHz is attenuated by about
/// 80 dB instead of aliasing. The kernel is tabulated at 512 points per zero crossing and
/// interpolated linearly (table error below -90 dB), and each output sample is divided by its
/// taps' sum so that DC passes exactly. Samples beyond either end count as silence.
///
/// The output has `ceil(len x to_rate / from_rate)` samples; its sample `n` is at input time
/// `n x from_rate / to_rate`. Cost: about `2 x 24 / (0.9 x min(1, to/from))` multiply-adds per
/// output sample (150 from 44.1 kHz to 16 kHz). Equal rates return the input unchanged, and a
/// rate of 0 returns nothing.
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::{resample, WHISPER_SAMPLE_RATE};
/// use std::f64::consts::PI;
///
/// let tone = |rate: u32, i: usize| (2.0 * PI * 440.0 * i as f64 / f64::from(rate)).sin() as f32;
/// // 1 s of a 440 Hz tone at 44.1 kHz.
/// let cd: Vec<f32> = (0..44_100).map(|i| tone(44_100, i)).collect();
///
/// let samples = resample(&cd, 44_100, WHISPER_SAMPLE_RATE);
/// assert_eq!(samples.len(), 16_000);
/// // The same tone at 16 kHz (away from the edges, where the input is cut off).
/// for i in 1_000..15_000 {
///     assert!((samples[i] - tone(16_000, i)).abs() < 1e-3);
/// }
/// ```
pub fn resample(samples: &[f32], from_rate: u32, to_rate: u32) -> Vec<f32> {
    if from_rate == to_rate {
        return samples.to_vec();
    }
    if from_rate == 0 || to_rate == 0 || samples.is_empty() {
        return Vec::new();
    }
    let (from, to) = (u64::from(from_rate), u64::from(to_rate));
    // Cutoff in cycles per input sample, relative to the input's Nyquist frequency (1.0).
    let cutoff = RESAMPLE_CUTOFF * (to as f64 / from as f64).min(1.0);
    let table = kaiser_sinc_table();
    let half_width = RESAMPLE_ZEROS as f64 / cutoff;
    let steps_per_input = cutoff * RESAMPLE_TABLE_RESOLUTION as f64;
    let last_step = (RESAMPLE_ZEROS * RESAMPLE_TABLE_RESOLUTION) as f64;

    let len = samples.len() as u64;
    let n_out = (len * to).div_ceil(from);
    let mut out = Vec::with_capacity(n_out as usize);
    for n in 0..n_out {
        // Exact rational position: `whole + frac / to` input samples.
        let whole = (n * from / to) as i64;
        let frac = ((n * from) % to) as f64 / to as f64;
        let centre = whole as f64 + frac;
        let first = (centre - half_width).ceil() as i64;
        let last = (centre + half_width).floor() as i64;
        let mut acc = 0.0f64;
        let mut weight = 0.0f64;
        for k in first..=last {
            let step = (centre - k as f64).abs() * steps_per_input;
            if step >= last_step {
                continue;
            }
            let i = step as usize;
            let f = step - i as f64;
            let h = table[i] + (table[i + 1] - table[i]) * f;
            weight += h;
            if let Some(&x) = usize::try_from(k).ok().and_then(|k| samples.get(k)) {
                acc += h * f64::from(x);
            }
        }
        out.push(if weight > 0.0 {
            (acc / weight) as f32
        } else {
            0.0
        });
    }
    out
}

/// `sinc(u) x kaiser(u / ZEROS)` at `u = j / RESOLUTION`, `j` in `0..=ZEROS x RESOLUTION`, plus
/// a trailing zero for interpolation.
fn kaiser_sinc_table() -> Vec<f64> {
    let n = RESAMPLE_ZEROS * RESAMPLE_TABLE_RESOLUTION;
    let norm = bessel_i0(RESAMPLE_KAISER_BETA);
    let mut table: Vec<f64> = (0..=n)
        .map(|j| {
            let u = j as f64 / RESAMPLE_TABLE_RESOLUTION as f64;
            let sinc = if j == 0 {
                1.0
            } else {
                (std::f64::consts::PI * u).sin() / (std::f64::consts::PI * u)
            };
            let r = j as f64 / n as f64;
            let window = bessel_i0(RESAMPLE_KAISER_BETA * (1.0 - r * r).max(0.0).sqrt()) / norm;
            sinc * window
        })
        .collect();
    table.push(0.0);
    table
}

/// The modified Bessel function of the first kind, order 0 (power series; converges quickly for
/// the small arguments of a Kaiser window).
fn bessel_i0(x: f64) -> f64 {
    let mut sum = 1.0;
    let mut term = 1.0;
    let half = x / 2.0;
    for k in 1..64 {
        term *= (half / k as f64) * (half / k as f64);
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// A 2-D `f32` array, row-major.
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::Matrix;
///
/// let m = Matrix { rows: 2, cols: 3, data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] };
/// assert_eq!(m.row(1), [4.0, 5.0, 6.0]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows (the first dimension).
    pub rows: usize,
    /// Columns (the second dimension).
    pub cols: usize,
    /// `rows x cols` values, row by row.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `r`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::audio::Matrix;
    ///
    /// let m = Matrix { rows: 2, cols: 2, data: vec![0.5, 0.0, 0.0, 0.25] };
    /// assert_eq!(m.row(0), [0.5, 0.0]);
    /// ```
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Reads a NumPy `.npy` file (format 1.0 to 3.0) holding a 2-D little-endian `f32` array
/// (`<f4`), in C or Fortran order; the result is row-major either way.
///
/// The file is a model's, not the caller's: failures are [`Error::Internal`].
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::read_npy_f32;
///
/// # /// A C-order `<f4` .npy file of shape `(rows, cols)`, as `numpy.save` writes it.
/// # fn npy(rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
/// #     let mut header = format!(
/// #         "{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}"
/// #     );
/// #     while (10 + header.len() + 1) % 64 != 0 {
/// #         header.push(' ');
/// #     }
/// #     header.push('\n');
/// #     let mut npy = b"\x93NUMPY\x01\x00".to_vec();
/// #     npy.extend((header.len() as u16).to_le_bytes());
/// #     npy.extend(header.as_bytes());
/// #     npy.extend(values.iter().flat_map(|v| v.to_le_bytes()));
/// #     npy
/// # }
/// // In a plugin: `std::fs::read(kiln_sdk::model_file("mel_filters_80x201.npy"))`.
/// let bytes = npy(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let m = read_npy_f32(&bytes)?;
/// assert_eq!((m.rows, m.cols), (2, 3));
/// assert_eq!(m.row(1), [4.0, 5.0, 6.0]);
///
/// assert!(read_npy_f32(b"PK\x03\x04 a .npz archive").is_err());
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn read_npy_f32(bytes: &[u8]) -> Result<Matrix, Error> {
    let bad = |message: String| Error::internal(format!(".npy: {message}"));
    if bytes.len() < 10 || &bytes[0..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file".to_owned()));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (usize::from(u16_le(&bytes[8..10])), 10),
        2 | 3 if bytes.len() >= 12 => (u32_le(&bytes[8..12]) as usize, 12),
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated or non-text header".to_owned()))?;
    let descr = npy_header_value(header, "descr").ok_or_else(|| bad("no descr".to_owned()))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if descr != "<f4" {
        return Err(bad(format!("dtype {descr:?}, expected '<f4' (f32)")));
    }
    let fortran = match npy_header_value(header, "fortran_order") {
        Some("True") => true,
        Some("False") => false,
        other => return Err(bad(format!("fortran_order {other:?}"))),
    };
    let shape = npy_header_value(header, "shape").ok_or_else(|| bad("no shape".to_owned()))?;
    let dims: Vec<usize> = shape
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("shape {shape}: {e}")))?;
    let [rows, cols] = dims[..] else {
        return Err(bad(format!("shape {shape}, expected a 2-D array")));
    };
    let count = rows
        .checked_mul(cols)
        .ok_or_else(|| bad(format!("shape {shape} is too large")))?;
    let body = &bytes[data_start..];
    if body.len() != count * 4 {
        return Err(bad(format!(
            "{} data bytes for shape {shape} of f32",
            body.len()
        )));
    }
    let values = crate::f32_from_le_bytes(body);
    let data = if fortran {
        (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| values[c * rows + r])
            .collect()
    } else {
        values
    };
    Ok(Matrix { rows, cols, data })
}

/// The text of `key`'s value in a `.npy` header (a Python dict literal): a quoted string, a
/// bare word, or a parenthesised tuple.
fn npy_header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[start + key.len() + 2..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(quote @ ('\'' | '"')) = rest.chars().next() {
        rest[1..].find(quote)? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// One mel filter: its non-zero weights, from frequency bin `start`.
#[derive(Debug, Clone)]
struct MelFilter {
    start: usize,
    weights: Vec<f64>,
}

/// Whisper's log-mel front end, as openai-whisper's `log_mel_spectrogram` computes it for one
/// 30 s window:
///
/// 1. pad with zeros or trim to [`WHISPER_WINDOW_SAMPLES`] (16 kHz mono);
/// 2. STFT: [`N_FFT`]-point frames every [`HOP_LENGTH`] samples, periodic Hann window, centred
///    (reflect padding of `N_FFT / 2` each side), power `|X|^2` of the [`N_FREQS`] bins; the last
///    of the 3001 frames is dropped, leaving [`N_FRAMES`];
/// 3. mel = filters `[n_mels, 201]` x power;
/// 4. `log10(max(mel, 1e-10))`, raised to at least (its maximum - 8), then `(x + 4) / 4`.
///
/// Computed in `f64` (the FFT included) and returned as `f32`: it matches a float64 numpy
/// reference to about 1e-6.
///
/// # Examples
///
/// ```
/// use kiln_sdk::audio::{LogMel, Matrix, N_FRAMES, N_FREQS};
///
/// // Two bands instead of Whisper's 80 mel filters: below and above 4 kHz (40 Hz per bin).
/// let mut filters = Matrix { rows: 2, cols: N_FREQS, data: vec![0.0; 2 * N_FREQS] };
/// filters.data[..100].fill(1.0);
/// filters.data[N_FREQS + 100..].fill(1.0);
/// let log_mel = LogMel::new(&filters)?;
///
/// // 1 s of a 1 kHz tone at 16 kHz, then silence up to 30 s.
/// let tone: Vec<f32> = (0..16_000)
///     .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
///     .collect();
/// let features = log_mel.compute(&tone);
/// assert_eq!(features.len(), 2 * N_FRAMES);
///
/// let (low, high) = (&features[..N_FRAMES], &features[N_FRAMES..]);
/// // Frame 50 is at 0.5 s: the tone is in the low band.
/// assert!(low[50] > high[50] + 1.0);
/// // Silence is floored at 8 (log10 units) below the loudest value: 2.0 after `(x + 4) / 4`.
/// let max = features.iter().copied().fold(f32::MIN, f32::max);
/// assert!((low[2_000] - (max - 2.0)).abs() < 1e-6);
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub struct LogMel {
    filters: Vec<MelFilter>,
    fft: Arc<dyn Fft<f64>>,
    window: Vec<f64>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("n_mels", &self.filters.len())
            .finish_non_exhaustive()
    }
}

impl LogMel {
    /// A front end with these mel filters (`[n_mels, 201]`, such as whisper's
    /// `mel_filters_80x201.npy`); an [`Error::Internal`] for another number of columns.
    ///
    /// # Examples
    ///
    /// In a plugin's `init` (reading the model's file needs the plugin's `/model` mount):
    ///
    /// ```no_run
    /// use kiln_sdk::audio::{read_npy_f32, LogMel};
    /// use kiln_sdk::{model_file, Error};
    ///
    /// let bytes = std::fs::read(model_file("mel_filters_80x201.npy"))
    ///     .map_err(|e| Error::internal(format!("mel filters: {e}")))?;
    /// let log_mel = LogMel::new(&read_npy_f32(&bytes)?)?;
    /// assert_eq!(log_mel.n_mels(), 80);
    /// # Ok::<(), Error>(())
    /// ```
    ///
    /// Filters for another STFT size are refused:
    ///
    /// ```
    /// use kiln_sdk::audio::{LogMel, Matrix};
    ///
    /// let n_fft_512 = Matrix { rows: 80, cols: 257, data: vec![0.0; 80 * 257] };
    /// assert!(LogMel::new(&n_fft_512).is_err());
    /// ```
    pub fn new(filters: &Matrix) -> Result<Self, Error> {
        if filters.cols != N_FREQS || filters.rows == 0 {
            return Err(Error::internal(format!(
                "mel filters are [{}, {}], expected [n_mels, {N_FREQS}]",
                filters.rows, filters.cols
            )));
        }
        // The filters are triangles: keeping only their non-zero span makes step 3 about 50
        // times cheaper than the dense product.
        let filters = (0..filters.rows)
            .map(|r| {
                let row = filters.row(r);
                let start = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let end = row.iter().rposition(|&w| w != 0.0).map_or(start, |e| e + 1);
                MelFilter {
                    start,
                    weights: row[start..end].iter().map(|&w| f64::from(w)).collect(),
                }
            })
            .collect();
        let window = (0..N_FFT)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos())
            .collect();
        Ok(LogMel {
            filters,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
            window,
        })
    }

    /// Mel bands of the output.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::audio::{LogMel, Matrix, N_FREQS};
    ///
    /// let filters = Matrix { rows: 80, cols: N_FREQS, data: vec![0.01; 80 * N_FREQS] };
    /// assert_eq!(LogMel::new(&filters)?.n_mels(), 80);
    /// # Ok::<(), kiln_sdk::Error>(())
    /// ```
    pub fn n_mels(&self) -> usize {
        self.filters.len()
    }

    /// The features of one window of 16 kHz mono `samples` (padded or trimmed to 30 s):
    /// `[n_mels, N_FRAMES]`, row-major (one row per mel band).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::audio::{LogMel, Matrix, N_FRAMES, N_FREQS};
    ///
    /// let filters = Matrix { rows: 80, cols: N_FREQS, data: vec![0.01; 80 * N_FREQS] };
    /// let log_mel = LogMel::new(&filters)?;
    /// // The features of a 30 s window: [80, 3000], what Whisper's encoder takes as [1, 80, 3000].
    /// let features = log_mel.compute(&[0.0; 16_000]);
    /// assert_eq!(features.len(), 80 * N_FRAMES);
    /// // Silence: log10(1e-10) = -10 everywhere, (-10 + 4) / 4 = -1.5.
    /// assert!(features.iter().all(|&v| v == -1.5));
    /// # Ok::<(), kiln_sdk::Error>(())
    /// ```
    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        let n = samples.len().min(WHISPER_WINDOW_SAMPLES);
        let pad = N_FFT / 2;
        // Reflect padding (numpy `mode="reflect"`: the edge sample is not repeated) of the
        // zero-padded window.
        let padded_len = WHISPER_WINDOW_SAMPLES + 2 * pad;
        let at = |i: usize| -> f64 { samples.get(i).filter(|_| i < n).map_or(0.0, |&x| x.into()) };
        let padded: Vec<f64> = (0..padded_len)
            .map(|p| {
                let i = if p < pad {
                    pad - p
                } else if p >= pad + WHISPER_WINDOW_SAMPLES {
                    2 * (WHISPER_WINDOW_SAMPLES - 1) + pad - p
                } else {
                    p - pad
                };
                at(i)
            })
            .collect();

        let n_mels = self.filters.len();
        let mut mel = vec![0.0f64; n_mels * N_FRAMES];
        let mut buffer = vec![Complex::new(0.0, 0.0); N_FFT];
        let mut scratch = vec![Complex::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = [0.0f64; N_FREQS];
        for frame in 0..N_FRAMES {
            let start = frame * HOP_LENGTH;
            for ((b, &x), &w) in buffer
                .iter_mut()
                .zip(&padded[start..start + N_FFT])
                .zip(&self.window)
            {
                *b = Complex::new(x * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buffer, &mut scratch);
            for (p, b) in power.iter_mut().zip(&buffer) {
                *p = b.norm_sqr();
            }
            for (m, filter) in self.filters.iter().enumerate() {
                let bins = &power[filter.start..filter.start + filter.weights.len()];
                mel[m * N_FRAMES + frame] =
                    filter.weights.iter().zip(bins).map(|(w, p)| w * p).sum();
            }
        }

        for v in &mut mel {
            *v = v.max(1e-10).log10();
        }
        let floor = mel.iter().copied().fold(f64::NEG_INFINITY, f64::max) - 8.0;
        mel.iter()
            .map(|&v| ((v.max(floor) + 4.0) / 4.0) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a WAV file: `fmt` chunk body + interleaved sample bytes, with an extra chunk
    /// before `fmt` to check that unknown chunks are skipped.
    fn wav(fmt: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = b"RIFF\0\0\0\0WAVE".to_vec();
        out.extend_from_slice(b"LIST\x03\0\0\0abc\0"); // odd size: padded
        out.extend_from_slice(b"fmt ");
        out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        out.extend_from_slice(fmt);
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        let riff = (out.len() - 8) as u32;
        out[4..8].copy_from_slice(&riff.to_le_bytes());
        out
    }

    fn fmt(tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let align = channels * bits / 8;
        let mut f = Vec::new();
        f.extend_from_slice(&tag.to_le_bytes());
        f.extend_from_slice(&channels.to_le_bytes());
        f.extend_from_slice(&rate.to_le_bytes());
        f.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        f.extend_from_slice(&align.to_le_bytes());
        f.extend_from_slice(&bits.to_le_bytes());
        f
    }

    fn extensible(sub_tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let mut f = fmt(WAVE_FORMAT_EXTENSIBLE, channels, rate, bits);
        f.extend_from_slice(&22u16.to_le_bytes()); // cbSize
        f.extend_from_slice(&bits.to_le_bytes()); // valid bits
        f.extend_from_slice(&3u32.to_le_bytes()); // channel mask
        f.extend_from_slice(&sub_tag.to_le_bytes());
        f.extend_from_slice(&SUBFORMAT_GUID_TAIL);
        f
    }

    #[test]
    fn decodes_pcm16_mono() {
        let data: Vec<u8> = [0i16, 16384, -32768, 32767]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let w = decode_wav(&wav(&fmt(1, 1, 16000, 16), &data)).unwrap();
        assert_eq!(w.sample_rate, 16000);
        assert_eq!(w.samples, vec![0.0, 0.5, -1.0, 32767.0 / 32768.0]);
    }

    #[test]
    fn averages_pcm16_stereo_and_ignores_a_partial_frame() {
        let mut data: Vec<u8> = [16384i16, 0, -16384, -16384]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        data.extend_from_slice(&[1, 2]); // half a frame
        let w = decode_wav(&wav(&fmt(1, 2, 8000, 16), &data)).unwrap();
        assert_eq!(w.sample_rate, 8000);
        assert_eq!(w.samples, vec![0.25, -0.5]);
    }

    #[test]
    fn decodes_float32_plain_and_extensible() {
        let data: Vec<u8> = [0.5f32, -0.25, 1.0, 0.0, -1.0, 0.5]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let plain = decode_wav(&wav(&fmt(3, 3, 44100, 32), &data)).unwrap();
        assert_eq!(plain.sample_rate, 44100);
        let expected = [1.25f32 / 3.0, -0.5 / 3.0];
        assert_eq!(plain.samples.len(), 2);
        for (got, want) in plain.samples.iter().zip(expected) {
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        }
        let ext = decode_wav(&wav(&extensible(3, 3, 44100, 32), &data)).unwrap();
        assert_eq!(ext, plain);
        let pcm: Vec<u8> = [1000i16, 3000]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let ext16 = decode_wav(&wav(&extensible(1, 2, 48000, 16), &pcm)).unwrap();
        assert_eq!(ext16.samples, vec![2000.0 / 32768.0]);
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        let data = [0u8; 8];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"RIFX\0\0\0\0WAVE".to_vec(), "not a RIFF/WAVE"),
            (wav(&fmt(1, 1, 16000, 8), &data), "8 bits"),
            (wav(&fmt(1, 1, 16000, 24), &data), "24 bits"),
            (wav(&fmt(3, 1, 16000, 64), &data), "64 bits"),
            (wav(&fmt(2, 1, 16000, 16), &data), "format tag 2"),
            (wav(&fmt(1, 0, 16000, 16), &data), "0 channels"),
            (wav(&fmt(1, 1, 0, 16), &data), "0 Hz"),
            (
                wav(&fmt(1, 1, 16000, 16)[..10], &data),
                "fmt chunk is 10 bytes",
            ),
            (
                wav(&fmt(0xFFFE, 1, 16000, 16), &data),
                "without its sub-format",
            ),
            (b"RIFF\x04\0\0\0WAVE".to_vec(), "no data chunk"),
        ];
        for (bytes, expected) in cases {
            match decode_wav(&bytes) {
                Err(Error::InvalidInput(m)) => {
                    assert!(m.contains(expected), "{m:?} vs {expected:?}")
                }
                other => panic!("{expected}: got {other:?}"),
            }
        }
        let mut odd_guid = extensible(1, 1, 16000, 16);
        odd_guid[30] ^= 1;
        assert!(matches!(
            decode_wav(&wav(&odd_guid, &data)),
            Err(Error::InvalidInput(m)) if m.contains("unknown sub-format")
        ));
    }

    #[test]
    fn reads_a_data_chunk_longer_than_the_file() {
        let data: Vec<u8> = [100i16, 200].iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut bytes = wav(&fmt(1, 1, 16000, 16), &data);
        let size_at = bytes.len() - data.len() - 4;
        bytes[size_at..size_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let w = decode_wav(&bytes).unwrap();
        assert_eq!(w.samples.len(), 2);
    }

    fn sine(freq: f64, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin() as f32)
            .collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// Away from the edges (the kernel's half width), a tone in the passband comes out as the same
    /// tone at the new rate: max error 1e-4 (-80 dB) against the analytic sine.
    #[test]
    fn resampling_keeps_passband_tones() {
        for (from, to, freq) in [
            (44100, 16000, 1000.0),
            (48000, 16000, 3000.0),
            (8000, 16000, 440.0),
            (22050, 16000, 5000.0),
            (16000, 44100, 2500.0),
            (11025, 16000, 1234.5),
        ] {
            let input = sine(freq, from, from as usize); // 1 s
            let out = resample(&input, from, to);
            assert_eq!(out.len(), to as usize, "{from} -> {to}");
            let expected = sine(freq, to, to as usize);
            let margin = to as usize / 50; // 20 ms
            let worst = out[margin..out.len() - margin]
                .iter()
                .zip(&expected[margin..])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{from} -> {to} Hz, {freq} Hz tone: max error {worst}"
            );
        }
    }

    /// A tone above the new Nyquist frequency is filtered out instead of aliasing: at most -70 dB
    /// (rms 3.2e-4 for a full-scale input).
    #[test]
    fn resampling_filters_out_tones_above_the_new_nyquist() {
        for (from, freq) in [
            (44100, 9000.0),
            (44100, 15000.0),
            (48000, 8500.0),
            (96000, 30000.0),
        ] {
            let input = sine(freq, from, from as usize);
            let out = resample(&input, from, 16000);
            let margin = 320;
            let level = rms(&out[margin..out.len() - margin]);
            assert!(level < 3.2e-4, "{from} Hz, {freq} Hz tone: rms {level}");
        }
    }

    #[test]
    fn resampling_edge_cases() {
        assert_eq!(resample(&[1.0, 2.0], 16000, 16000), vec![1.0, 2.0]);
        assert!(resample(&[], 44100, 16000).is_empty());
        assert!(resample(&[1.0], 0, 16000).is_empty());
        // Length is ceil(len x to / from); DC passes at gain 1 away from the ends.
        let dc = resample(&[0.5; 44101], 44100, 16000);
        assert_eq!(dc.len(), 16001);
        assert!(dc[100..15900].iter().all(|&v| (v - 0.5).abs() < 1e-6));
        assert_eq!(resample(&[0.25; 3], 48000, 16000).len(), 1);
    }

    fn npy(header: &str, data: &[f32]) -> Vec<u8> {
        let mut header = header.to_owned();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn reads_npy_in_c_and_fortran_order() {
        let c = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        );
        let m = read_npy_f32(&c).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.row(1), &[4.0, 5.0, 6.0]);
        let f = npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0],
        );
        assert_eq!(read_npy_f32(&f).unwrap(), m);
    }

    #[test]
    fn rejects_other_npy_arrays() {
        let cases = [
            npy(
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }",
                &[0.0, 0.0],
            ),
            npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                &[0.0, 0.0],
            ),
            npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                &[0.0],
            ),
            b"PK\x03\x04 not npy".to_vec(),
        ];
        for bytes in cases {
            assert!(matches!(read_npy_f32(&bytes), Err(Error::Internal(_))));
        }
    }

    fn log_mel() -> Option<LogMel> {
        let path = crate::testing::model_source_file("whisper-tiny-en/mel_filters_80x201.npy")?;
        let bytes = std::fs::read(path).unwrap();
        let filters = read_npy_f32(&bytes).unwrap();
        assert_eq!((filters.rows, filters.cols), (80, 201));
        Some(LogMel::new(&filters).unwrap())
    }

    /// Mirrors `synthetic_signal` of tests/reference/asr_reference.py: 2 s of a 440 Hz tone, a
    /// 1000 -> 5000 Hz chirp and LCG noise, computed in f64 and rounded to f32 as numpy does.
    fn synthetic_signal() -> Vec<f32> {
        let mut state: u32 = 12345;
        (0..2 * 16000)
            .map(|i| {
                let t = f64::from(i) / 16000.0;
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                let noise = (f64::from(state) / 4294967296.0 - 0.5) * 0.02;
                let chirp = 2.0 * std::f64::consts::PI * (1000.0 * t + 0.5 * 2000.0 * t * t);
                let tone = 2.0 * std::f64::consts::PI * 440.0 * t;
                (0.5 * tone.sin() + 0.25 * chirp.sin() + noise) as f32
            })
            .collect()
    }

    /// Tolerance of the log-mel against the float64 numpy reference. Both compute in f64; the
    /// remaining difference is the FFT algorithm's rounding and the f32 output (ulp ~1e-7).
    const LOG_MEL_TOLERANCE: f64 = 1e-5;

    /// Against numpy (`python tests/reference/asr_reference.py` prints these; `log_mel` there is
    /// the reference implementation): values at (mel, frame), then min, max, mean.
    #[test]
    fn log_mel_matches_numpy_on_a_synthetic_signal() {
        let Some(log_mel) = log_mel() else {
            return;
        };
        let features = log_mel.compute(&synthetic_signal());
        assert_eq!(features.len(), 80 * N_FRAMES);
        let expected: [((usize, usize), f64); 9] = [
            ((0, 0), 1.0275210),
            ((9, 10), 1.1595348),
            ((13, 60), -0.1278704),
            ((35, 40), 0.0482645),
            ((55, 120), 0.0218906),
            ((70, 190), 0.0197567),
            ((79, 199), 0.0663626),
            ((30, 250), -0.5612808),
            ((5, 2999), -0.5612808),
        ];
        for ((mel, frame), value) in expected {
            let got = f64::from(features[mel * N_FRAMES + frame]);
            // The literals are printed to 7 decimals: allow their rounding too.
            assert!(
                (got - value).abs() <= LOG_MEL_TOLERANCE + 1e-7,
                "[{mel}, {frame}]: {got} vs numpy {value}"
            );
        }
        let min = f64::from(features.iter().copied().fold(f32::INFINITY, f32::min));
        let max = f64::from(features.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mean = features.iter().map(|&v| f64::from(v)).sum::<f64>() / features.len() as f64;
        assert!(
            (min - -0.5612808).abs() <= LOG_MEL_TOLERANCE + 1e-7,
            "min {min}"
        );
        assert!(
            (max - 1.4387192).abs() <= LOG_MEL_TOLERANCE + 1e-7,
            "max {max}"
        );
        assert!((mean - -0.5160885).abs() <= 1e-6, "mean {mean}");
        // The floor is exactly max - 8 in log10 units, i.e. 2.0 below the max after (x + 4) / 4.
        assert!((max - min - 2.0).abs() < 1e-6);
    }

    /// Longer input is trimmed to 30 s; a window of silence is all one value.
    #[test]
    fn log_mel_trims_and_handles_silence() {
        let Some(log_mel) = log_mel() else {
            return;
        };
        let mut long = synthetic_signal();
        long.resize(WHISPER_WINDOW_SAMPLES, 0.0);
        let exact = log_mel.compute(&long);
        long.extend(std::iter::repeat_n(0.9, 16000));
        assert_eq!(log_mel.compute(&long), exact);
        let silence = log_mel.compute(&[]);
        // log10(1e-10) = -10 everywhere; the clamp changes nothing: (-10 + 4) / 4.
        assert!(silence.iter().all(|&v| v == -1.5));
    }

    /// beckett.wav against tests/reference/whisper_reference.json (numpy, float64).
    #[test]
    fn log_mel_matches_numpy_on_speech() {
        let Some(log_mel) = log_mel() else {
            return;
        };
        let Some(wav) = crate::testing::model_source_file("test-inputs/beckett.wav") else {
            return;
        };
        let bytes = std::fs::read(wav).unwrap();
        let reference = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/reference/whisper_reference.json"
        );
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
        let wave = decode_wav(&bytes).unwrap();
        assert_eq!(wave.sample_rate, 16000);
        assert_eq!(
            wave.samples.len() as u64,
            reference["samples"].as_u64().unwrap()
        );
        let features = log_mel.compute(&wave.samples);
        let expected = &reference["log_mel"];
        let positions = expected["positions"].as_array().unwrap();
        let values = expected["values"].as_array().unwrap();
        for (position, value) in positions.iter().zip(values) {
            let (mel, frame) = (
                position[0].as_u64().unwrap() as usize,
                position[1].as_u64().unwrap() as usize,
            );
            let value = value.as_f64().unwrap();
            let got = f64::from(features[mel * N_FRAMES + frame]);
            assert!(
                (got - value).abs() <= LOG_MEL_TOLERANCE,
                "[{mel}, {frame}]: {got} vs numpy {value}"
            );
        }
        let mean = features.iter().map(|&v| f64::from(v)).sum::<f64>() / features.len() as f64;
        assert!((mean - expected["mean"].as_f64().unwrap()).abs() <= 1e-6);
    }
}
