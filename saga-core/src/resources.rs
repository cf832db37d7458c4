//! Typed shared resources (CRM clients, HTTP clients, pools) that steps reach through their
//! context instead of globals.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::sync::Arc;

use crate::{Classify, ErrorClass};

/// A set of shared values keyed by type. Registered on the engine; read by steps.
#[derive(Clone, Default)]
pub struct Resources {
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("count", &self.by_type.len())
            .finish()
    }
}

impl Resources {
    /// Adds (or replaces) the value of type `T`.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.by_type.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`.
    ///
    /// # Errors
    /// [`MissingResource`] when none was registered.
    pub fn get<T: Send + Sync + 'static>(&self) -> Result<&T, MissingResource> {
        self.by_type
            .get(&TypeId::of::<T>())
            .and_then(|value| value.downcast_ref::<T>())
            .ok_or(MissingResource {
                type_name: type_name::<T>(),
            })
    }
}

/// A step asked for a resource that was not registered on the engine. Permanent: retrying
/// cannot make it appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no resource of type `{type_name}` is registered; add it with EngineBuilder::resource")]
pub struct MissingResource {
    /// The requested type.
    pub type_name: &'static str,
}

impl Classify for MissingResource {
    fn classify(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}
