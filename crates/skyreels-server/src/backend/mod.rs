//! The job engine's storage backends: each implements [`crate::engine::Backend`] and
//! [`crate::engine::Consumer`] with primitives only, and imports from the engine alone.

pub mod memory;
pub mod redis;
