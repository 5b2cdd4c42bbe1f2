//! First-party Kiln plugin for asr (being written).
