//! First-party Kiln plugin for image-classification (being written).
