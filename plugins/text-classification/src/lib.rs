//! First-party Kiln plugin for text-classification (being written).
