//! The registered saga types, keyed by (name, version): several versions of one workflow run
//! side by side, and every saga runs under the version it was started with.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::definition::ErasedSaga;

/// Saga types by name, then version.
#[derive(Default)]
pub(crate) struct Registry {
    types: BTreeMap<&'static str, BTreeMap<u32, Arc<dyn ErasedSaga>>>,
    /// (name, version) pairs registered more than once: a configuration error at build time.
    duplicates: Vec<(&'static str, u32)>,
}

impl Registry {
    /// Adds a saga type; a second registration of the same (name, version) is remembered as
    /// a configuration error.
    pub(crate) fn insert(&mut self, saga: Arc<dyn ErasedSaga>) {
        let (name, version) = (saga.name(), saga.version());
        let versions = self.types.entry(name).or_default();
        if versions.insert(version, saga).is_some() {
            self.duplicates.push((name, version));
        }
    }

    /// The configuration problem, if a (name, version) was registered twice or a version is 0.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some((name, version)) = self.duplicates.first() {
            return Err(format!(
                "saga type `{name}` version {version} is registered twice; give each version of a workflow its own `VERSION`"
            ));
        }
        for (name, versions) in &self.types {
            if versions.contains_key(&0) {
                return Err(format!(
                    "saga type `{name}` has version 0; versions start at 1"
                ));
            }
        }
        Ok(())
    }

    /// The saga type that runs sagas of `name` started under `version`.
    pub(crate) fn get(&self, name: &str, version: u32) -> Option<&Arc<dyn ErasedSaga>> {
        self.types.get(name)?.get(&version)
    }

    /// The newest registered version of `name`: what a start by name uses unless the caller
    /// picks a version.
    pub(crate) fn newest(&self, name: &str) -> Option<&Arc<dyn ErasedSaga>> {
        self.types.get(name)?.values().next_back()
    }

    /// Whether any version of `name` is registered.
    pub(crate) fn knows(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }

    /// The registered names, sorted.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.types.keys().copied().collect()
    }

    /// The registered versions of `name`, oldest first.
    pub(crate) fn versions(&self, name: &str) -> Vec<u32> {
        self.types
            .get(name)
            .map(|versions| versions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every registered (name, version), sorted.
    pub(crate) fn all(&self) -> Vec<(&'static str, u32)> {
        self.types
            .iter()
            .flat_map(|(name, versions)| versions.keys().map(|v| (*name, *v)))
            .collect()
    }

    /// What is registered, for messages: `deal_flow v1, v2; sourcing v1`.
    pub(crate) fn describe(&self) -> String {
        if self.types.is_empty() {
            return "no saga types".to_owned();
        }
        self.types
            .iter()
            .map(|(name, versions)| {
                let list: Vec<String> = versions.keys().map(|v| format!("v{v}")).collect();
                format!("{name} {}", list.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Why a saga of `name` started under `version` cannot run here, for its quarantine.
    pub(crate) fn missing_reason(&self, name: &str, version: u32) -> String {
        if !self.knows(name) {
            let known = self.names();
            return format!("unknown saga type `{name}` (this coordinator runs {known:?})");
        }
        format!(
            "saga type `{name}` version {version} is not registered on this coordinator (it registers {}); \
             the saga keeps its journal and runs only under the version it was started with: deploy code that \
             registers `{name}` version {version} next to the newer ones, then retry the saga (`saga retry <id>`) to resume it",
            self.describe()
        )
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}
