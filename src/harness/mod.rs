//! Harness (being written).
