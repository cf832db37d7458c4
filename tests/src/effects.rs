//! A plain record of what test steps did, in order, shared with the steps as a resource.

use std::sync::{Arc, Mutex, PoisonError};

use saga_core::{HttpStatus, StepContext};

/// What the steps did, in order (one line per effect, as the test words it).
#[derive(Clone, Debug, Default)]
pub struct Effects(Arc<Mutex<Vec<String>>>);

impl Effects {
    /// Records one effect.
    pub fn push(&self, what: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    /// Every effect so far, oldest first.
    #[must_use]
    pub fn all(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The [`Effects`] resource of the engine running `ctx` (a 500 when the test forgot it).
///
/// # Errors
/// `HttpStatus(500)` when the engine has no `Effects` resource.
pub fn effects(ctx: &StepContext) -> Result<Effects, HttpStatus> {
    ctx.resource::<Effects>()
        .cloned()
        .map_err(|_| HttpStatus::new(500))
}
