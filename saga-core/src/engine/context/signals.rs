//! Waiting for a signal: the deadline and what the wait got are journal entries, the signal
//! itself comes from the saga's inbox in the store.
//!
//! A wait takes two journal positions: the deadline (a journaled time named
//! `signal_deadline:<name>`, so a replay or a restart keeps it) and the outcome (the signal taken, by its inbox sequence number, with its
//! payload; or the timeout). Which signal a wait takes is decided from the journal alone: the
//! oldest signal of that name in the inbox that no earlier wait took and that was sent by the
//! deadline. A signal and the timer race only until one of them is recorded: whichever the
//! run sees first when it looks (a signal sent by the deadline wins even when the saga looks
//! after the deadline; one sent later is left for the next wait of that name).

use std::collections::HashSet;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Halt, Interruption, Mode, SagaContext, Slot};
use crate::engine::{SIGNAL_DEADLINE, SIGNAL_PREFIX, SagaError};
use crate::store::{Schedule, StoredSignal};
use crate::{EventKind, Timestamp};

/// How often a short in-process wait looks at the inbox again.
const SIGNAL_CHECK_GAP: Duration = Duration::from_millis(100);

/// What a wait found when it looked at the inbox.
enum Looked<T> {
    /// A signal was taken (and recorded).
    Taken(T),
    /// Nothing yet; the highest sequence number read.
    Nothing { seen: u64 },
}

impl SagaContext {
    /// Waits durably for the signal `name` (sent with
    /// [`Engine::signal`](crate::Engine::signal), `POST /sagas/{id}/signals/{name}` or
    /// `saga signal`) for at most `timeout`, counted from the first time the workflow gets
    /// here. Returns `Some(payload)` when one arrives, `None` when the wait times out: branch
    /// on it (for example, return an error to compensate).
    ///
    /// A signal sent before the saga waits is kept in its inbox and taken at once; each
    /// signal is taken by one wait (the oldest first); a signal whose payload does not decode
    /// as `T` is set aside and recorded (`SignalRejected`) while the wait goes on. A long
    /// wait holds no lease and no worker: the saga is suspended on a durable timer, and the
    /// signal (or the timeout) makes it due on any coordinator. A cancel request ends the
    /// wait and the saga compensates (past its pivot, the wait goes on).
    ///
    /// # Errors
    /// As [`SagaContext::run`]: propagate it with `?` (a suspended wait returns
    /// [`SagaError::Suspended`] to end the run; the saga continues when it is due).
    pub async fn wait_for_signal<T: DeserializeOwned>(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<T>, SagaError> {
        if let Err(problem) = crate::engine::signal::check_name(name) {
            return Err(self.stop(Halt::BadData(format!(
                "wait_for_signal(\"{name}\"): {problem}"
            ))));
        }
        let deadline_name = format!("{SIGNAL_DEADLINE}:{name}");
        let deadline = self.journaled_time(&deadline_name, |now| now.plus(timeout))?;
        if let Some(halt) = &self.halt {
            return Err(halt.to_error());
        }
        let position = self.position;
        self.position += 1;
        let entry = format!("{SIGNAL_PREFIX}{name}");
        match self.slot(position, &entry, true, &Value::Null) {
            Ok(Slot::Replay { output }) => self.replayed_signal(position, name, &output),
            Ok(Slot::Fresh) if self.mode == Mode::Collect => Err(self.stop(Halt::Collected)),
            Ok(Slot::Fresh) => self.await_signal(position, name, &entry, deadline).await,
            Ok(Slot::InFlight { .. } | Slot::Failed) => Err(self.stop(Halt::NonDeterministic {
                position,
                message: format!(
                    "the journal holds a step where the workflow waits for signal `{name}`"
                ),
            })),
            Err(halt) => Err(self.stop(halt)),
        }
    }

    fn replayed_signal<T: DeserializeOwned>(
        &mut self,
        position: u32,
        name: &str,
        output: &Value,
    ) -> Result<Option<T>, SagaError> {
        let Some(payload) = output.get("payload") else {
            return Ok(None);
        };
        serde_json::from_value(payload.clone()).map(Some).map_err(|err| {
            self.stop(Halt::NonDeterministic {
                position,
                message: format!(
                    "the recorded payload of signal `{name}` does not decode as the type the wait asks for: {err}"
                ),
            })
        })
    }

    async fn await_signal<T: DeserializeOwned>(
        &mut self,
        position: u32,
        name: &str,
        entry: &str,
        deadline: Timestamp,
    ) -> Result<Option<T>, SagaError> {
        loop {
            if self.state.cancel_pending() {
                return Err(self.stop(Halt::Cancelled));
            }
            let seen = match self.look_for_signal(position, name, entry, deadline).await {
                Ok(Looked::Taken(value)) => return Ok(Some(value)),
                Ok(Looked::Nothing { seen }) => seen,
                Err(halt) => return Err(self.stop(halt)),
            };
            let remaining = deadline.since(self.shared.clock.now());
            if remaining.is_zero() {
                let timed_out = serde_json::json!({ "timed_out": true });
                self.record_value(position, entry, timed_out)
                    .map_err(|halt| self.stop(halt))?;
                tracing::info!(signal = name, position, "signal wait timed out");
                crate::telemetry::signal_wait_timed_out();
                return Ok(None);
            }
            if remaining > self.shared.config.inline_wait_max {
                let wait = Schedule::AwaitSignal {
                    timeout: remaining,
                    seen,
                };
                if let Err(halt) = self.commit(Vec::new(), wait).await {
                    return Err(self.stop(halt));
                }
                return Err(self.stop(Halt::Suspended(deadline)));
            }
            let cancellable = self.state.past_pivot.is_none();
            let id = self.state.id;
            let pause = remaining.min(SIGNAL_CHECK_GAP);
            if self.shared.sleep_unless_cancelled(id, pause, false).await && cancellable {
                self.state.cancel_requested = true;
            }
        }
    }

    /// Reads the inbox and takes the oldest signal this wait may take, recording it (or
    /// recording the rejection of one that does not decode, and going on to the next).
    async fn look_for_signal<T: DeserializeOwned>(
        &mut self,
        position: u32,
        name: &str,
        entry: &str,
        deadline: Timestamp,
    ) -> Result<Looked<T>, Halt> {
        let inbox = self
            .shared
            .store
            .signals(self.state.id, 0)
            .await
            .map_err(|err| Halt::Interrupted(Interruption::from_store(err)))?;
        let seen = inbox.last().map_or(0, |s| s.sequence);
        let taken = self.taken_signals();
        let candidates = inbox.into_iter().filter(|s| {
            s.name == name
                && s.at <= deadline
                && !taken.contains(&s.sequence)
                && !self.state.rejected_signals.contains(&s.sequence)
        });
        for signal in candidates.collect::<Vec<StoredSignal>>() {
            let decoded = serde_json::from_str::<Value>(&signal.payload)
                .map_err(|err| err.to_string())
                .and_then(|payload| {
                    serde_json::from_value::<T>(payload.clone())
                        .map(|value| (payload, value))
                        .map_err(|err| err.to_string())
                });
            match decoded {
                Ok((payload, value)) => {
                    let taken = serde_json::json!({
                        "sequence": signal.sequence,
                        "key": signal.key,
                        "payload": payload,
                    });
                    self.record_value(position, entry, taken)?;
                    tracing::info!(
                        signal = name,
                        sequence = signal.sequence,
                        position,
                        "signal taken"
                    );
                    crate::telemetry::signal_taken();
                    return Ok(Looked::Taken(value));
                }
                Err(error) => {
                    tracing::warn!(signal = name, sequence = signal.sequence, key = %signal.key, %error, "signal rejected: its payload does not decode as the type the wait asks for");
                    crate::telemetry::signal_rejected();
                    self.record(EventKind::SignalRejected {
                        name: name.to_owned(),
                        sequence: signal.sequence,
                        key: signal.key,
                        error,
                    })?;
                }
            }
        }
        Ok(Looked::Nothing { seen })
    }

    /// The inbox sequence numbers that earlier waits of this saga took.
    fn taken_signals(&self) -> HashSet<u64> {
        self.state
            .journal
            .iter()
            .filter(|r| r.is_value && r.name.starts_with(SIGNAL_PREFIX))
            .filter_map(|r| r.output.as_ref()?.get("sequence")?.as_u64())
            .collect()
    }

    /// Records a journaled value at `position` (with the next commit).
    pub(super) fn record_value(
        &mut self,
        position: u32,
        name: &str,
        value: Value,
    ) -> Result<(), Halt> {
        self.record(EventKind::ValueRecorded {
            position,
            name: name.to_owned(),
            value,
        })
    }
}
