//! Schema utilities and the start-up gate (being written).
