//! First-party Kiln plugin for object-detection (being written).
