//! HTTP health endpoints (being written).
