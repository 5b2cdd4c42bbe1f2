//! First-party Kiln plugin for text-generation (being written).
