//! Where the desired node state comes from.
pub mod file;
