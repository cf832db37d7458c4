//! [`SagaStore::wakeups`](saga_core::SagaStore::wakeups) over Redis pub/sub.
//!
//! The scripts that make a saga due without a timer or finish it (`create`, `release`,
//! `request_cancel`, `commit` with `Finished` or a zero `WakeAfter`, `operator_transition`)
//! `PUBLISH` a message on the prefix's wake channel ([`KeyLayout::wake_channel`],
//! `<prefix>:wake`). The first call to `wakeups()` spawns one background task per store, on the
//! current tokio runtime, that holds a dedicated pub/sub connection (standalone: to the
//! server; cluster: to one of the seed nodes, since a cluster delivers `PUBLISH` to
//! subscribers on every node), subscribes to the channel and bumps a
//! [`tokio::sync::watch`] value on every message but `finished` ones, whose saga ids go to
//! [`SagaStore::saga_changes`](saga_core::SagaStore::saga_changes) receivers instead
//! (`operator` ones go to both). Later calls subscribe to the same value.
//!
//! A lost connection is re-established with exponential backoff (cluster: trying the next
//! seed node), and the value is bumped once after every (re)subscription, because messages
//! may have been missed meanwhile. The connection is pinged now and then, so a half-open
//! connection is noticed too. A failure is logged as a warning and retried; the task never
//! panics. It ends once the store (every clone) and every receiver are dropped.
//!
//! [`KeyLayout::wake_channel`]: crate::KeyLayout::wake_channel

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::Client;
use redis::aio::{PubSubSink, PubSubStream};
use saga_core::SagaId;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::hints::DueHints;
use crate::keys::KeyLayout;

/// First pause before reconnecting; doubled after every failed attempt.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// Longest pause between two reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How often an idle subscription is pinged (to notice a half-open connection).
const PING_EVERY: Duration = Duration::from_secs(15);

/// The wake-up source of one store.
pub(crate) struct Wakeups {
    /// Where to subscribe: the standalone server, or each seed node of a cluster (tried in
    /// turn).
    clients: Vec<Client>,
    channel: String,
    /// To find the partition of the saga a message names.
    keys: KeyLayout,
    /// Told which partitions the messages name, and whether the subscription is live.
    hints: Arc<DueHints>,
    /// Bound on connecting, subscribing and each ping.
    timeout: Duration,
    running: Mutex<Option<Running>>,
    /// Ids of sagas that finished or were changed by an operator, parsed from the messages.
    changes: broadcast::Sender<SagaId>,
}

/// The background task, once started.
struct Running {
    tx: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
    /// Dropped with the store: tells the task that no new receivers can come.
    _alive: oneshot::Sender<()>,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups")
            .field("channel", &self.channel)
            .field("nodes", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl Wakeups {
    pub(crate) fn new(
        clients: Vec<Client>,
        keys: KeyLayout,
        hints: Arc<DueHints>,
        timeout: Duration,
    ) -> Self {
        Self {
            clients,
            channel: keys.wake_channel(),
            keys,
            hints,
            timeout,
            running: Mutex::new(None),
            changes: broadcast::Sender::new(1024),
        }
    }

    /// A receiver of the ids of sagas that finished or were changed by an operator, starting
    /// the background task if needed. `None` where `subscribe` gives `None`.
    pub(crate) fn subscribe_changes(&self) -> Option<broadcast::Receiver<SagaId>> {
        // The task runs while the store lives, whether or not this watch receiver is kept.
        self.subscribe().map(|_| self.changes.subscribe())
    }

    /// A receiver of the wake-up value, starting the background task on first use (or when
    /// it ended because its runtime shut down). `None` outside a tokio runtime, or when there
    /// is nothing to subscribe to.
    pub(crate) fn subscribe(&self) -> Option<watch::Receiver<u64>> {
        if self.clients.is_empty() {
            return None;
        }
        // The guarded data is a handle; a panic elsewhere cannot leave it half-written.
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(current) = running.as_ref()
            && !current.task.is_finished()
        {
            return Some(current.tx.subscribe());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                channel = %self.channel,
                "RedisStore::wakeups called outside a tokio runtime; no wake-up signal (callers poll)"
            );
            return None;
        };
        // Keep the value (and any receivers handed out before) when restarting a task whose
        // runtime went away.
        let tx = running
            .take()
            .map_or_else(|| Arc::new(watch::Sender::new(0)), |old| old.tx);
        let (alive, store_gone) = oneshot::channel();
        let listener = Listener {
            clients: self.clients.clone(),
            channel: self.channel.clone(),
            keys: self.keys.clone(),
            hints: Arc::clone(&self.hints),
            timeout: self.timeout,
            tx: Arc::clone(&tx),
            changes: self.changes.clone(),
            stop: StopSignal {
                tx: Arc::clone(&tx),
                store_gone,
                store_dropped: false,
            },
        };
        // Subscribed before the task starts, so that this receiver sees the task's first
        // change (made once it listens).
        let rx = tx.subscribe();
        let task = runtime.spawn(listener.run());
        *running = Some(Running {
            tx,
            task,
            _alive: alive,
        });
        Some(rx)
    }
}

/// Why listening on one connection stopped.
enum Ended {
    /// The store and every receiver are gone.
    Stop,
    /// The connection failed.
    Lost(String),
}

/// The background task's state.
struct Listener {
    clients: Vec<Client>,
    channel: String,
    keys: KeyLayout,
    hints: Arc<DueHints>,
    timeout: Duration,
    tx: Arc<watch::Sender<u64>>,
    changes: broadcast::Sender<SagaId>,
    stop: StopSignal,
}

/// Tells the task when to end: once the store is dropped and no receiver is left.
struct StopSignal {
    tx: Arc<watch::Sender<u64>>,
    store_gone: oneshot::Receiver<()>,
    store_dropped: bool,
}

impl StopSignal {
    /// Completes once the store is dropped and no receiver is left. Cancel-safe.
    async fn finished(&mut self) {
        if !self.store_dropped {
            // Err (the sender dropped) is the only outcome: nobody sends on it.
            let _ = (&mut self.store_gone).await;
            self.store_dropped = true;
        }
        self.tx.closed().await;
    }
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|value| *value = value.wrapping_add(1));
}

impl Listener {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut node = 0;
        let mut subscribed_before = false;
        loop {
            let client = self.clients[node % self.clients.len()].clone();
            let address = client.get_connection_info().addr().to_string();
            tracing::debug!(channel = %self.channel, node = %address, "subscribing to wake-ups");
            let connected = tokio::select! {
                connected = connect(&client, &self.channel, self.timeout) => connected,
                () = self.stop.finished() => return,
            };
            match connected {
                Ok((sink, stream)) => {
                    tracing::debug!(channel = %self.channel, node = %address, "subscribed to wake-ups");
                    if subscribed_before {
                        tracing::info!(channel = %self.channel, node = %address, "wake-up subscription re-established");
                    }
                    subscribed_before = true;
                    failures = 0;
                    // Messages may have been published while nobody listened: every
                    // partition may have work, and waiters should look again.
                    self.hints.set_live(true);
                    bump(&self.tx);
                    let ended = self.listen(sink, stream).await;
                    self.hints.set_live(false);
                    match ended {
                        Ended::Stop => {
                            tracing::debug!(channel = %self.channel, "wake-up task ends: the store and its receivers are gone");
                            return;
                        }
                        Ended::Lost(reason) => {
                            tracing::warn!(channel = %self.channel, node = %address, %reason, "wake-up subscription lost; reconnecting");
                        }
                    }
                }
                Err(reason) => {
                    tracing::warn!(channel = %self.channel, node = %address, %reason, attempt = failures + 1, "cannot subscribe to wake-ups; retrying (callers fall back to polling meanwhile)");
                    failures = failures.saturating_add(1);
                    node = node.wrapping_add(1);
                }
            }
            let pause = BACKOFF_START
                .saturating_mul(2u32.saturating_pow(failures.min(16)))
                .min(BACKOFF_MAX);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.finished() => return,
            }
        }
    }

    /// Passes on what a message says (messages are `<what> <id>`, see `publish_wake` in
    /// `src/scripts/prelude.lua`): the id of a saga that finished or was changed by an
    /// operator goes to the change feed; the partition of a saga that became due is marked
    /// for `claim_due`.
    /// Returns `true` for a `finished` message (which carries nothing else).
    fn forward_change(&self, message: &redis::Msg) -> bool {
        let Ok(payload) = message.get_payload::<String>() else {
            return false;
        };
        let Some((what, id)) = payload.split_once(' ') else {
            return false;
        };
        let Ok(id) = id.parse::<SagaId>() else {
            // Not ours to interpret; coordinators look anyway (the caller bumps).
            self.hints.mark_all_dirty();
            return false;
        };
        if what != "finished" {
            self.hints.mark_dirty(self.keys.partition_of(id));
        }
        if matches!(what, "finished" | "operator") {
            // No receiver is not an error: nobody waits for this saga.
            let _ = self.changes.send(id);
        }
        what == "finished"
    }

    /// Forwards the messages of one subscription until it fails or the task must stop.
    async fn listen(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> Ended {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        // A finished saga is news for its waiters (`saga_changes`), not work
                        // for coordinators: their own runs end locally.
                        if !self.forward_change(&message) {
                            bump(&self.tx);
                        }
                    }
                    None => return Ended::Lost("the connection closed".into()),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(self.timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return Ended::Lost(format!("PING failed: {err}")),
                        Err(_) => return Ended::Lost(format!("PING unanswered after {:?}", self.timeout)),
                    }
                }
                () = self.stop.finished() => return Ended::Stop,
            }
        }
    }
}

/// A pub/sub connection subscribed to `channel`, within `timeout`.
async fn connect(
    client: &Client,
    channel: &str,
    timeout: Duration,
) -> Result<(PubSubSink, PubSubStream), String> {
    let subscribe = async {
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(channel).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    match tokio::time::timeout(timeout, subscribe).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
