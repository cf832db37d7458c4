//! What a saga's journal says about the workflow primitives it used: its child sagas, the
//! wait it is in, its parallel blocks. Read by the HTTP API, the operator CLI and the
//! examples, so that they all show the same thing.

use serde::{Deserialize, Serialize};

use crate::engine::{
    CHILD_OUTCOME, PARALLEL, SIGNAL_DEADLINE, SIGNAL_PREFIX, SLEEP_UNTIL, START_CHILD,
};
use crate::{SagaId, SagaState, SagaStatus, StepStatus, Timestamp};

/// A child saga a saga started (see [`SagaContext::child`](crate::SagaContext::child)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildLink {
    /// The journal position of the step that started it.
    pub position: u32,
    /// The child's id.
    pub id: SagaId,
    /// Its saga type.
    pub saga_type: String,
    /// How it ended, once the parent recorded its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<SagaStatus>,
}

/// What a running saga is waiting for, when it is suspended in a workflow primitive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum Waiting {
    /// A durable sleep.
    Sleep {
        /// The journal position of its wake-up time.
        position: u32,
        /// When it wakes.
        until: Timestamp,
    },
    /// A signal, until a deadline.
    Signal {
        /// The journal position of the wait's deadline.
        position: u32,
        /// The signal's name.
        name: String,
        /// When the wait times out.
        until: Timestamp,
    },
    /// A child saga's outcome.
    Child {
        /// The journal position of the step that started it.
        position: u32,
        /// The child.
        id: SagaId,
    },
}

/// A parallel block in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelBlock {
    /// The position of the block's size value; branch `i` is at `position + 1 + i`.
    pub position: u32,
    /// How many branches it has.
    pub branches: u32,
    /// How many of them have completed.
    pub completed: u32,
}

impl SagaState {
    /// The child sagas this saga started, in journal order, with the outcome it recorded.
    #[must_use]
    pub fn children(&self) -> Vec<ChildLink> {
        let mut children: Vec<ChildLink> = self
            .journal
            .iter()
            .filter(|r| !r.is_value && r.name == START_CHILD)
            .filter_map(|r| {
                let output = r.output.as_ref()?;
                Some(ChildLink {
                    position: r.position,
                    id: output.get("id")?.as_str()?.parse().ok()?,
                    saga_type: output.get("saga_type")?.as_str()?.to_owned(),
                    outcome: None,
                })
            })
            .collect();
        for record in self
            .journal
            .iter()
            .filter(|r| r.is_value && r.name == CHILD_OUTCOME)
        {
            let Some(output) = &record.output else {
                continue;
            };
            let id = output.get("id").and_then(|v| v.as_str());
            let status = output
                .get("status")
                .and_then(|v| serde_json::from_value::<SagaStatus>(v.clone()).ok());
            if let Some(child) = children
                .iter_mut()
                .find(|c| Some(c.id.to_string().as_str()) == id)
            {
                child.outcome = status;
            }
        }
        children
    }

    /// What the saga waits for, when it is running and its journal ends in a durable sleep
    /// or a signal wait, or it has a child whose outcome it has not recorded yet.
    #[must_use]
    pub fn waiting(&self) -> Option<Waiting> {
        if self.status != SagaStatus::Running {
            return None;
        }
        let last = self.journal.last()?;
        let until = last
            .output
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .map(Timestamp);
        if last.is_value && last.name == SLEEP_UNTIL {
            return Some(Waiting::Sleep {
                position: last.position,
                until: until?,
            });
        }
        if last.is_value
            && let Some(name) = last
                .name
                .strip_prefix(SIGNAL_DEADLINE)
                .and_then(|rest| rest.strip_prefix(':'))
        {
            return Some(Waiting::Signal {
                position: last.position,
                name: name.to_owned(),
                until: until?,
            });
        }
        let pending = self.children().into_iter().find(|c| c.outcome.is_none())?;
        let started_last = !last.is_value && last.name == START_CHILD;
        let waits_after = last.is_value && last.name == CHILD_OUTCOME;
        (started_last && last.status == StepStatus::Succeeded || waits_after).then_some(
            Waiting::Child {
                position: pending.position,
                id: pending.id,
            },
        )
    }

    /// The parallel blocks in the journal, with how many branches completed.
    #[must_use]
    pub fn parallel_blocks(&self) -> Vec<ParallelBlock> {
        self.journal
            .iter()
            .filter(|r| r.is_value && r.name == PARALLEL)
            .map(|r| {
                let branches = r
                    .output
                    .as_ref()
                    .and_then(|o| o.get("branches"))
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0);
                let completed = (1..=branches)
                    .filter(|i| {
                        r.position
                            .checked_add(*i)
                            .and_then(|position| self.record(position))
                            .is_some_and(|b| b.status == StepStatus::Succeeded)
                    })
                    .count();
                ParallelBlock {
                    position: r.position,
                    branches,
                    completed: u32::try_from(completed).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }

    /// The signals the workflow took, as (name, inbox sequence number), in journal order.
    #[must_use]
    pub fn signals_taken(&self) -> Vec<(String, u64)> {
        self.journal
            .iter()
            .filter(|r| r.is_value)
            .filter_map(|r| {
                let name = r.name.strip_prefix(SIGNAL_PREFIX)?;
                let sequence = r.output.as_ref()?.get("sequence")?.as_u64()?;
                Some((name.to_owned(), sequence))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use crate::{EventKind, SagaEvent, SagaId, SagaState, SagaStatus, Timestamp, Waiting};

    fn event(at: u64, kind: EventKind) -> SagaEvent {
        SagaEvent {
            seq: 0,
            at: Timestamp(at),
            kind,
        }
    }

    fn value(position: u32, name: &str, value: serde_json::Value) -> EventKind {
        EventKind::ValueRecorded {
            position,
            name: name.to_owned(),
            value,
        }
    }

    fn started(position: u32, step: &str) -> EventKind {
        EventKind::StepStarted {
            position,
            step: step.to_owned(),
            attempt: 1,
            idempotency_key: format!("k{position}"),
            input: Some(json!(null)),
        }
    }

    fn succeeded(position: u32, step: &str, output: serde_json::Value) -> EventKind {
        EventKind::StepSucceeded {
            position,
            step: step.to_owned(),
            attempt: 1,
            output,
            reconciled: false,
            pivot: false,
        }
    }

    fn fold(kinds: Vec<EventKind>) -> SagaState {
        let id = SagaId::random();
        let mut events = vec![event(
            0,
            EventKind::SagaStarted {
                saga_type: "sourcing".into(),
                version: 1,
                input: json!(null),
                idempotency_key: None,
                parent: None,
                journal_format: crate::JOURNAL_FORMAT,
            },
        )];
        events.extend(
            kinds
                .into_iter()
                .enumerate()
                .map(|(i, k)| event(i as u64 + 1, k)),
        );
        SagaState::fold(id, &events).unwrap()
    }

    #[test]
    fn a_block_its_children_and_the_current_wait_are_read_from_the_journal() {
        let child = SagaId::random();
        let state = fold(vec![
            value(0, "parallel", json!({ "branches": 2 })),
            started(1, "pull"),
            started(2, "pull"),
            succeeded(2, "pull", json!("b")),
            succeeded(1, "pull", json!("a")),
            started(3, "start_child"),
            succeeded(
                3,
                "start_child",
                json!({ "id": child, "saga_type": "deal", "version": 1 }),
            ),
        ]);
        let blocks = state.parallel_blocks();
        assert_eq!(blocks.len(), 1);
        assert_eq!(
            (blocks[0].position, blocks[0].branches, blocks[0].completed),
            (0, 2, 2)
        );
        // Completion order, not position order.
        assert_eq!(state.record(2).unwrap().completed, Some(1));
        assert_eq!(state.record(1).unwrap().completed, Some(2));
        let children = state.children();
        assert_eq!(children.len(), 1);
        assert_eq!((children[0].id, children[0].outcome), (child, None));
        assert_eq!(
            state.waiting(),
            Some(Waiting::Child {
                position: 3,
                id: child
            })
        );

        let ended = fold(vec![
            started(0, "start_child"),
            succeeded(
                0,
                "start_child",
                json!({ "id": child, "saga_type": "deal", "version": 1 }),
            ),
            value(
                1,
                "child_outcome",
                json!({ "id": child, "status": "completed" }),
            ),
            value(2, "signal_deadline:committee_approval", json!(5_000)),
        ]);
        assert_eq!(ended.children()[0].outcome, Some(SagaStatus::Completed));
        assert_eq!(
            ended.waiting(),
            Some(Waiting::Signal {
                position: 2,
                name: "committee_approval".into(),
                until: Timestamp(5_000),
            })
        );
        let slept = fold(vec![value(0, "sleep_until", json!(9_000))]);
        assert_eq!(
            slept.waiting(),
            Some(Waiting::Sleep {
                position: 0,
                until: Timestamp(9_000),
            })
        );
    }
}
