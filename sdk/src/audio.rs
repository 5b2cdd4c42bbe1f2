//! Audio: WAV decoding, resampling, Whisper-style log-mel features (being written).
