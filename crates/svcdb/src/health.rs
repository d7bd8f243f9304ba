//! Health reports (being written).
