//! Reading sagas: their state (with the journal of a compact one rebuilt and checked),
//! outcome and history.

use super::{Engine, EngineError, SagaOutcome};
use crate::store::{StoreError, StoredSaga};
use crate::{SagaEvent, SagaId, SagaState};

impl Engine {
    /// The saga's current state (status and journal).
    ///
    /// # Errors
    /// [`EngineError::NotFound`], or [`EngineError::Encoding`] when the stored state does not
    /// decode.
    ///
    /// A saga that completed or compensated is stored compact (see
    /// [`SagaState::is_compact`]): its journal is rebuilt from its history (one more read),
    /// and the rest of the fold is checked against what is stored.
    pub async fn state(&self, id: SagaId) -> Result<SagaState, EngineError> {
        let state = self.stored_state(id).await?;
        if !state.is_compact() {
            return Ok(state);
        }
        let history = self.history(id).await?;
        let full = SagaState::fold(id, &history).map_err(|err| StoreError::Corrupt {
            saga: id,
            problem: format!("the history of a finished saga does not fold: {err}"),
        })?;
        // What the running saga recorded itself must agree; `updated_at` and the cancel
        // flag may not (a cancel request appends its event, stamped by the canceller's clock,
        // without the running saga ever folding it).
        let mut check = full.compact();
        check.updated_at = state.updated_at;
        check.cancel_requested = state.cancel_requested;
        if check != state {
            return Err(StoreError::Corrupt {
                saga: id,
                problem: "the stored state of a finished saga differs from its history".into(),
            }
            .into());
        }
        Ok(SagaState {
            journal: full.journal,
            ..state
        })
    }

    /// The state as stored (compact for a saga that completed or compensated).
    async fn stored_state(&self, id: SagaId) -> Result<SagaState, EngineError> {
        self.stored_with_quarantine(id)
            .await
            .map(|(state, _)| state)
    }

    /// The saga as stored, or [`EngineError::NotFound`].
    pub(crate) async fn load_stored(&self, id: SagaId) -> Result<StoredSaga, EngineError> {
        self.shared
            .store
            .load(id)
            .await?
            .ok_or(EngineError::NotFound(id))
    }

    /// The state as stored, and the quarantine reason if the saga is set aside.
    pub(crate) async fn stored_with_quarantine(
        &self,
        id: SagaId,
    ) -> Result<(SagaState, Option<String>), EngineError> {
        let stored = self.load_stored(id).await?;
        let state = decode_state(&stored).map_err(|source| EngineError::Encoding {
            what: format!("stored state of saga {id}"),
            source,
        })?;
        Ok((state, stored.quarantined))
    }

    /// The saga's outcome so far (one read: the journal is not needed).
    ///
    /// # Errors
    /// As [`Engine::state`].
    pub async fn outcome(&self, id: SagaId) -> Result<SagaOutcome, EngineError> {
        Ok(SagaOutcome::from_state(&self.stored_state(id).await?))
    }

    /// The saga's full event history, oldest first.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], or [`EngineError::Encoding`] for an undecodable event.
    pub async fn history(&self, id: SagaId) -> Result<Vec<SagaEvent>, EngineError> {
        let raw = match self.shared.store.events(id).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound(id)) => return Err(EngineError::NotFound(id)),
            Err(err) => return Err(err.into()),
        };
        raw.iter()
            .enumerate()
            .map(|(seq, text)| {
                let mut event: SagaEvent =
                    serde_json::from_str(text).map_err(|source| EngineError::Encoding {
                        what: format!("event #{seq} of saga {id}"),
                        source,
                    })?;
                event.seq = seq as u64;
                Ok(event)
            })
            .collect()
    }
}

/// Decodes a stored saga's state, with the cancel flag that the store keeps beside it (a
/// cancel request sets the flag without rewriting the state).
pub(super) fn decode_state(stored: &StoredSaga) -> Result<SagaState, serde_json::Error> {
    let mut state: SagaState = serde_json::from_str(&stored.state)?;
    state.cancel_requested |= stored.cancel_requested;
    Ok(state)
}
