//! Cancelling the frame in flight from another thread (a flush or a state change in the
//! element), checked between denoising steps so a caller never waits more than one step.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The error a frame returns when it was cancelled between denoising steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("frame cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// A shared cancel flag: `cancel` from any thread, the frame loop takes it before each step.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Cancels the frame in flight, or the next frame to start if none is.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Forgets a cancel that no frame has seen yet.
    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// `Err(Cancelled)` (and the flag cleared) when a cancel is pending.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.0.swap(false, Ordering::SeqCst) { Err(Cancelled) } else { Ok(()) }
    }
}
