//! Starting sagas: the durable create (retried while the store is briefly unavailable),
//! the hand-over to a free local worker, and `execute` (start, then run to the end here).

use super::{
    Engine, EngineError, Interruption, RunOutcome, Saga, SagaOutcome, StartOptions, Started,
    client_retry, local,
};
use crate::store::{ClaimOutcome, ClaimRequest, CreateOutcome, Lease, NewSaga, StoreError};
use crate::telemetry;
use crate::{EventKind, SagaEvent, SagaId, SagaState, fingerprint};

impl Engine {
    /// Durably records a new saga of type `S` (or finds the one its idempotency key already
    /// started). When this returns, the saga survives any crash; it runs when a coordinator
    /// claims it (see [`Engine::run_to_end`] and [`Engine::run_due`]).
    ///
    /// # Errors
    /// [`EngineError::IdempotencyConflict`] when the key was used with another input, or a
    /// store or encoding error.
    ///
    /// When a [`Coordinator`](crate::Coordinator) runs on this engine and has a free worker,
    /// the saga is created with its lease already taken and starts on that worker at once
    /// (no claim round trip); otherwise any coordinator claims it.
    ///
    /// A transient store error (see [`StoreError::is_transient`]) is retried with jittered
    /// backoff by [`EngineConfig::client_retry`](crate::EngineConfig::client_retry) (for up
    /// to 30 s by default), with the same
    /// saga id every time: the id of a start without a key is drawn once, before the first
    /// attempt, and the store creates by id only if absent, so a create whose reply was lost
    /// is found by the retry instead of starting a second saga. Such a start answers
    /// `created: true` without a key (nobody else can know the id) and `created: false` with
    /// one (the retry cannot tell its own lost create from another caller's); the saga is the
    /// same either way. A start that still fails may have stored its saga: repeat it with the
    /// same idempotency key to be sure of one saga. Other errors fail at once.
    ///
    /// This is the untyped form (the input by reference, the id back); [`Engine::start`] is
    /// the typed one, with a [`SagaHandle`](crate::SagaHandle) back.
    pub async fn start_with<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let input = serde_json::to_value(input).map_err(|source| EngineError::Encoding {
            what: format!("input of saga type `{}`", S::NAME),
            source,
        })?;
        self.start_value(S::NAME, S::VERSION, input, options).await
    }

    /// Creates a saga and, when the local coordinator has a free worker, hands it over with
    /// its lease (see [`Engine::start`]).
    pub(crate) async fn start_value(
        &self,
        name: &'static str,
        version: u32,
        input: serde_json::Value,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let slot = if self.is_shutting_down() {
            None
        } else {
            self.shared.local.free_worker()
        };
        let Some(slot) = slot else {
            return self
                .create_value(name, version, input, options, None)
                .await
                .map(|(started, _)| started);
        };
        // In a task of its own: once the saga is created with our lease, the hand-over must
        // happen even if the caller goes away (an HTTP client that disconnects), or the saga
        // would wait for its lease to lapse. The task answers as soon as the saga is stored
        // and marked as running here; a claim that the hand-over still needs (and retries
        // while the store is unavailable) does not hold the caller up.
        let engine = self.clone();
        let claim = Some(self.claim_request());
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            match engine
                .create_value(name, version, input, options, claim)
                .await
            {
                Ok((started, lease)) => engine.hand_over(slot, started, lease, answer).await,
                Err(err) => {
                    // A caller that went away is told nothing, and nothing was created.
                    let _ = answer.send(Err(err));
                }
            }
        });
        answered.await.map_err(|_| EngineError::Interrupted {
            saga: SagaId(uuid::Uuid::nil()),
            cause: Interruption::Panicked {
                what: "the start task (it ended without answering)".into(),
            },
        })?
    }

    /// Gives a saga created for a free local worker to that worker, and answers the start
    /// once the saga is marked as running here (so that a wait right after the start waits
    /// for the local run instead of reading the store).
    async fn hand_over(
        &self,
        slot: local::Slot,
        started: Started,
        created: Option<(Lease, SagaState)>,
        answer: tokio::sync::oneshot::Sender<Result<Started, EngineError>>,
    ) {
        let id = started.id;
        let mut answer = Some(answer);
        let mut reply = || {
            if let Some(answer) = answer.take() {
                // A caller that went away is no error: the saga is stored either way.
                let _ = answer.send(Ok(started.clone()));
            }
        };
        // Already running here (a repeated start of a saga this engine runs): nothing to do.
        let Some(run) = self.shared.try_local_run(id) else {
            reply();
            return;
        };
        let (lease, state) = match created {
            Some((lease, state)) => (lease, Some(state)),
            // Not created by this call: an idempotent repeat, or our own create whose reply
            // was lost (then we hold its lease without knowing it). A claim settles both:
            // same-owner claims succeed, and a saga due anyway may as well run here. Retried
            // while the store is unavailable: otherwise a lost create reply would leave the
            // saga waiting for our own lease to lapse.
            None => {
                reply();
                let request = self.claim_request();
                let retry = client_retry::ClientRetry::new(self.shared.config.client_retry.clone());
                let operation = format!("claim started saga {id}");
                let claimed = retry
                    .run(&operation, StoreError::is_transient, || {
                        self.shared.store.claim(id, &request)
                    })
                    .await;
                match claimed {
                    Ok(ClaimOutcome::Claimed(lease)) => (lease, None),
                    Ok(_) => return,
                    Err(err) => {
                        tracing::warn!(saga_id = %id, error = %err, "could not claim a started saga for a local worker; any coordinator will once its lease lapses");
                        return;
                    }
                }
            }
        };
        let handed = slot.hand_over(lease, state, run);
        reply();
        if let Err(lease) = handed {
            // The coordinator stopped meanwhile: let any coordinator have it at once.
            if let Err(err) = self.shared.store.release(&lease).await {
                tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release a saga started during shutdown; it runs once its lease lapses");
            }
        }
    }

    async fn create<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
        claim: Option<ClaimRequest>,
    ) -> Result<(Started, Option<(Lease, SagaState)>), EngineError> {
        let input = serde_json::to_value(input).map_err(|source| EngineError::Encoding {
            what: format!("input of saga type `{}`", S::NAME),
            source,
        })?;
        self.create_value(S::NAME, S::VERSION, input, options, claim)
            .await
    }

    /// Creates a saga from an already encoded input (typed starts and `start_json`).
    pub(crate) async fn create_value(
        &self,
        name: &'static str,
        version: u32,
        input: serde_json::Value,
        options: StartOptions,
        claim: Option<ClaimRequest>,
    ) -> Result<(Started, Option<(Lease, SagaState)>), EngineError> {
        let key = options.idempotency_key;
        let parent = options.parent;
        let id = match &key {
            Some(key) => SagaId::from_idempotency_key(name, key),
            None => SagaId::random(),
        };
        let print = fingerprint("start", &serde_json::json!([name, version, input]));
        let now = self.shared.clock.now();
        let mut state = SagaState::new(
            id,
            name.to_owned(),
            version,
            input.clone(),
            key.clone(),
            now,
        );
        state.parent.clone_from(&parent);
        let started = SagaEvent {
            seq: 0,
            at: now,
            kind: EventKind::SagaStarted {
                saga_type: name.to_owned(),
                version,
                input,
                idempotency_key: key.clone(),
                parent,
                journal_format: crate::JOURNAL_FORMAT,
            },
        };
        let encode = |what: &str, source| EngineError::Encoding {
            what: what.to_owned(),
            source,
        };
        let new = NewSaga {
            id,
            saga_type: name.to_owned(),
            version,
            idempotency_key: key.clone(),
            fingerprint: print,
            state: serde_json::to_string(&state).map_err(|e| encode("saga state", e))?,
            events: vec![serde_json::to_string(&started).map_err(|e| encode("event", e))?],
            claim,
        };
        // Retried while the store is briefly unavailable: the id is fixed, so a create whose
        // reply was lost is found as `Existing` instead of starting a second saga.
        let mut attempts = 0_u32;
        let retry = client_retry::ClientRetry::new(self.shared.config.client_retry.clone());
        let operation = format!("start saga {id}");
        let created = retry
            .run(&operation, StoreError::is_transient, || {
                attempts += 1;
                self.shared.store.create(new.clone())
            })
            .await;
        let retried = attempts > 1;
        match created {
            // Without a key the id is ours alone: finding it after a retry means our own
            // earlier attempt stored it.
            Ok(CreateOutcome::Existing { .. }) if key.is_none() && retried => {
                telemetry::saga_started(name);
                Ok((Started { id, created: true }, None))
            }
            Ok(CreateOutcome::Created { lease }) => {
                telemetry::saga_started(name);
                tracing::info!(saga_id = %id, saga_type = name, "saga started");
                Ok((
                    Started { id, created: true },
                    lease.map(|lease| (lease, state)),
                ))
            }
            Ok(CreateOutcome::Existing { .. }) => {
                telemetry::idempotency_hit();
                tracing::info!(saga_id = %id, saga_type = name, "idempotent start: saga exists");
                Ok((Started { id, created: false }, None))
            }
            Err(StoreError::IdempotencyConflict { saga }) => {
                Err(EngineError::IdempotencyConflict {
                    saga,
                    key: key.unwrap_or_default(),
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Starts a saga of type `S` and runs it to its end in this process. An idempotent repeat
    /// runs the existing saga to its end instead (waiting for a run of it in this process);
    /// if another coordinator holds it, the call fails with [`EngineError::Busy`].
    ///
    /// # Errors
    /// As [`Engine::start`] and [`Engine::run_to_end`].
    pub async fn execute<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
    ) -> Result<SagaOutcome, EngineError> {
        // A repeat of a keyed start that this engine is running now waits for that run (a
        // new saga without a key has a fresh id that nothing else here can be running).
        let mut local = match &options.idempotency_key {
            Some(key) => Some(
                self.shared
                    .local_run(SagaId::from_idempotency_key(S::NAME, key))
                    .await,
            ),
            None => None,
        };
        let claim = self.claim_request();
        let (started, lease) = self.create::<S>(input, options, Some(claim)).await?;
        let first = match lease {
            // The state was just written by this process: no need to read it back.
            Some((lease, state)) => {
                // A keyless start has a fresh id that nothing here runs yet.
                let mut run = match local.take() {
                    Some(run) => run,
                    None => self.shared.local_run(started.id).await,
                };
                let result = self.drive_state(lease, state).await;
                run.record(&result);
                Some(result?)
            }
            None => None,
        };
        drop(local);
        match first {
            Some(RunOutcome::Finished(outcome)) => Ok(outcome),
            Some(RunOutcome::Suspended(until)) => {
                self.sleep_until(started.id, until).await;
                self.run_to_end(started.id).await
            }
            None => self.run_to_end(started.id).await,
        }
    }
}
