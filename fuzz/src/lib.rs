//! The fuzz targets' bodies. `fuzz_targets/*.rs` are one-line wrappers;
//! `tests/fuzz_regressions.rs` in the main crate includes `targets.rs` too
//! and replays the committed seeds and crashers on the stable toolchain.
pub mod targets;
