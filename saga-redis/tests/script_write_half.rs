//! Every key a writing script touches in its write half, damaged one at a time (replaced by a
//! string where a hash, list or zset belongs): the store operation fails with a clear
//! `Corrupt` error naming that key, and not one key under the store's prefix changes (each is
//! compared by `DUMP` before and after). Redis does not roll a failed script back, so this is
//! what shows that every script validates the keys it writes before its first write; the
//! argument per script is in saga-redis/SCRIPT_SAFETY.md.
//!
//! Each operation also runs once undamaged on the same fixture, and must succeed and change
//! the data: a refusal that came from a broken fixture would prove nothing.
//!
//! Bad data inside a saga hash (a field that is not a number, an unknown status) is covered by
//! corrupt_data.rs, signal_data.rs and saga_versions.rs; a damaged saga found by `claim_due`
//! or `purge` is quarantined by design (a write), which corrupt_data.rs and
//! engine_bad_data.rs check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use saga_core::store::{ClaimOutcome, GuardClaim, Lease, Schedule, SignalDelivery, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError, Timestamp};
use saga_redis::RedisStore;
use saga_redis_testkit::shared_server;
use support::{LONG, builder, event, ids_in_partition, new_saga, owner, raw, snapshot, state};

/// A store with one partition holding saga `id`, claimed (`lease`), with one signal in its
/// inbox (so the inbox and its keys hash exist), and an id `fresh` not created yet.
struct Fixture {
    store: RedisStore,
    url: String,
    conn: redis::aio::MultiplexedConnection,
    id: SagaId,
    fresh: SagaId,
    lease: Lease,
}

async fn fixture(url: &str) -> Fixture {
    let store = builder(url, "writehalf")
        .partitions(1)
        .connect()
        .await
        .unwrap();
    let conn = raw(url).await;
    let [id, fresh] = ids_in_partition(&store, 0, 2)[..] else {
        unreachable!()
    };
    store.create(new_saga(id)).await.unwrap();
    let ClaimOutcome::Claimed(lease) = store.claim(id, &owner("holder", LONG)).await.unwrap()
    else {
        panic!("a new saga can be claimed")
    };
    store.deliver_signal(id, signal("first")).await.unwrap();
    Fixture {
        store,
        url: url.to_owned(),
        conn,
        id,
        fresh,
        lease,
    }
}

fn signal(key: &str) -> SignalDelivery {
    SignalDelivery {
        name: "approval".to_owned(),
        key: key.to_owned(),
        payload: "{}".to_owned(),
        at: Timestamp(42),
        event: event(&format!("signal {key}")),
    }
}

fn finish() -> Transition {
    Transition {
        commit_id: "finish".to_owned(),
        events: vec![event("finished")],
        state: state(9),
        status: SagaStatus::Completed,
        schedule: Schedule::Finished,
    }
}

const GUARD: &str = "payment-42";

/// The writing operations, each with the keys its script writes (or may write).
#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Claim,
    ClaimDue,
    Renew,
    Release,
    Commit,
    RequestCancel,
    DeliverSignal,
    Quarantine,
    OperatorTransition,
    Purge,
    GuardClaim,
    GuardComplete,
    GuardRelease,
    Meta,
}

const OPS: [Op; 15] = [
    Op::Create,
    Op::Claim,
    Op::ClaimDue,
    Op::Renew,
    Op::Release,
    Op::Commit,
    Op::RequestCancel,
    Op::DeliverSignal,
    Op::Quarantine,
    Op::OperatorTransition,
    Op::Purge,
    Op::GuardClaim,
    Op::GuardComplete,
    Op::GuardRelease,
    Op::Meta,
];

/// The five status index keys of partition 0.
fn statuses(store: &RedisStore) -> Vec<String> {
    [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ]
    .into_iter()
    .map(|s| store.keys().status(0, s))
    .collect()
}

impl Op {
    /// The keys the script writes in its write half (saga_redis/src/scripts/<op>.lua).
    fn write_keys(self, fx: &Fixture) -> Vec<String> {
        let k = fx.store.keys();
        let (id, p) = (fx.id, 0);
        let mut keys = match self {
            Op::Create => vec![
                k.saga(fx.fresh),
                k.events(fx.fresh),
                k.due(p),
                k.ids(p),
                k.status(p, SagaStatus::Running),
                k.type_index(p, "redis test"),
            ],
            Op::Claim | Op::Renew | Op::Release => vec![k.saga(id), k.due(p), k.quarantine(p)],
            Op::ClaimDue => vec![k.due(p), k.quarantine(p)],
            Op::Commit => {
                let mut keys = vec![
                    k.saga(id),
                    k.events(id),
                    k.due(p),
                    k.quarantine(p),
                    k.terminal(p),
                    k.signals(id),
                ];
                keys.extend(statuses(&fx.store));
                keys
            }
            Op::RequestCancel => vec![k.saga(id), k.events(id), k.due(p), k.quarantine(p)],
            Op::DeliverSignal => vec![
                k.saga(id),
                k.events(id),
                k.due(p),
                k.quarantine(p),
                k.signals(id),
                k.signal_keys(id),
            ],
            Op::Quarantine => vec![k.due(p), k.quarantine(p), k.terminal(p)],
            Op::OperatorTransition => {
                let mut keys = vec![
                    k.saga(id),
                    k.events(id),
                    k.due(p),
                    k.quarantine(p),
                    k.terminal(p),
                ];
                keys.extend(statuses(&fx.store));
                keys
            }
            Op::Purge => {
                let mut keys = vec![k.terminal(p), k.ids(p), k.due(p), k.quarantine(p)];
                keys.extend(statuses(&fx.store));
                keys
            }
            Op::GuardClaim | Op::GuardComplete | Op::GuardRelease => vec![k.guard(GUARD)],
            Op::Meta => vec![k.meta()],
        };
        keys.dedup();
        keys
    }

    /// What the operation needs beyond the fixture; returns the guard token for the guard
    /// operations that need one.
    async fn prepare(self, fx: &Fixture) -> String {
        match self {
            Op::Purge => {
                fx.store.commit(&fx.lease, finish()).await.unwrap();
                String::new()
            }
            Op::GuardComplete | Op::GuardRelease => {
                match fx.store.guard_claim(GUARD, "fp", LONG).await.unwrap() {
                    GuardClaim::Claimed { token } => token,
                    other => panic!("a fresh guard key is claimed, got {other:?}"),
                }
            }
            Op::ClaimDue => {
                fx.store.release(&fx.lease).await.unwrap();
                String::new()
            }
            _ => String::new(),
        }
    }

    async fn run(self, fx: &Fixture, token: &str) -> Result<(), StoreError> {
        let store = &fx.store;
        match self {
            Op::Create => store.create(new_saga(fx.fresh)).await.map(drop),
            Op::Claim => store.claim(fx.id, &owner("holder", LONG)).await.map(drop),
            Op::ClaimDue => {
                let leases = store.claim_due(&owner("worker", LONG), 10).await?;
                assert_eq!(leases.len(), 1, "the released saga is due");
                Ok(())
            }
            Op::Renew => store.renew(&fx.lease, LONG).await.map(drop),
            Op::Release => store.release(&fx.lease).await,
            Op::Commit => store.commit(&fx.lease, finish()).await.map(drop),
            Op::RequestCancel => store
                .request_cancel(fx.id, event("cancel requested"))
                .await
                .map(drop),
            Op::DeliverSignal => store
                .deliver_signal(fx.id, signal("second"))
                .await
                .map(drop),
            Op::Quarantine => store.quarantine(fx.id, "set aside by the test").await,
            Op::OperatorTransition => store
                .operator_transition(
                    fx.id,
                    &[SagaStatus::Running],
                    Transition {
                        commit_id: "operator".to_owned(),
                        events: vec![event("operator")],
                        state: state(5),
                        status: SagaStatus::Running,
                        schedule: Schedule::WakeAfter(Duration::ZERO),
                    },
                )
                .await
                .map(drop),
            Op::Purge => {
                let deleted = store.purge(Duration::ZERO, 10).await?;
                assert_eq!(deleted, 1, "the finished saga is purged");
                Ok(())
            }
            Op::GuardClaim => store.guard_claim(GUARD, "fp", LONG).await.map(drop),
            Op::GuardComplete => store.guard_complete(GUARD, token, "done", LONG).await,
            Op::GuardRelease => store.guard_release(GUARD, token).await,
            // The meta script runs when a store connects to the prefix: see connect_again.
            Op::Meta => unreachable!("the meta script is run by connect_again"),
        }
    }
}

/// Runs the meta script the way a deployment does, by connecting a store to the prefix; the
/// connect error's text on failure.
async fn connect_again(fx: &Fixture) -> Result<(), String> {
    RedisStore::builder()
        .url(&fx.url)
        .key_prefix(fx.store.keys().prefix())
        .partitions(fx.store.keys().partitions())
        .connect()
        .await
        .map(drop)
        .map_err(|err| err.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_undamaged_write_half_writes() {
    let url = shared_server().url();
    for op in OPS {
        let mut fx = fixture(&url).await;
        let token = op.prepare(&fx).await;
        let prefix = fx.store.keys().prefix().to_owned();
        let before = snapshot(&mut fx.conn, &prefix).await;
        if matches!(op, Op::Meta) {
            // The meta key exists already; connecting again writes nothing and succeeds.
            connect_again(&fx).await.unwrap();
            continue;
        }
        op.run(&fx, &token)
            .await
            .unwrap_or_else(|err| panic!("{op:?} on undamaged data: {err}"));
        let after = snapshot(&mut fx.conn, &prefix).await;
        assert_ne!(before, after, "{op:?} on undamaged data writes something");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_key_in_any_write_half_fails_clearly_and_writes_nothing() {
    let url = shared_server().url();
    let mut cases = 0;
    for op in OPS {
        let keys = {
            let fx = fixture(&url).await;
            op.write_keys(&fx)
        };
        for (i, _) in keys.iter().enumerate() {
            let mut fx = fixture(&url).await;
            let token = op.prepare(&fx).await;
            // The key names depend on the fixture's prefix: take this fixture's i-th.
            let damaged = op.write_keys(&fx)[i].clone();
            let _: () = fx.conn.del(&damaged).await.unwrap();
            let _: () = fx.conn.set(&damaged, "damaged").await.unwrap();
            let prefix = fx.store.keys().prefix().to_owned();
            let before = snapshot(&mut fx.conn, &prefix).await;

            let message = if matches!(op, Op::Meta) {
                match connect_again(&fx).await {
                    Err(message) => message,
                    Ok(()) => panic!("connecting over a damaged meta key must fail"),
                }
            } else {
                match op.run(&fx, &token).await {
                    Err(err @ StoreError::Corrupt { .. }) => err.to_string(),
                    other => panic!("{op:?} with {damaged} damaged must be Corrupt, got {other:?}"),
                }
            };
            assert!(
                message.contains(&damaged) && message.contains("has type string"),
                "{op:?}: the error names the damaged key {damaged} and its type: {message}"
            );
            let after = snapshot(&mut fx.conn, &prefix).await;
            assert_eq!(before, after, "{op:?} with {damaged} damaged changed a key");
            cases += 1;
        }
    }
    // 6 + 3×3 + 2 + 11 + 4 + 6 + 3 + 10 + 9 + 3×1 + 1
    assert_eq!(
        cases, 64,
        "every write key of every writing script was damaged once"
    );
}

/// The wake-up `PUBLISH` is the one command a script runs that the server can refuse after
/// the data checks: an ACL user without permission on the wake channel (Redis 7 gives new
/// users `resetchannels` by default; `connect` refuses such a user, so here the permission
/// is revoked after connecting) gets an error from the `PUBLISH`. The scripts publish
/// before their first write, so the refusal writes nothing (a script that published last
/// would fail with its writes applied, and the caller told it failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_wake_up_publish_writes_nothing() {
    if !saga_redis_testkit::can_spawn_servers("a_refused_wake_up_publish_writes_nothing") {
        return;
    }
    let server = saga_redis_testkit::RedisServer::start(
        saga_redis_testkit::ServerConfig::new().acl_user("app on >pw ~* &* +@all"),
    );
    let url = server.url_with_credentials(Some("app"), "pw");
    let mut cases = 0;
    for op in [
        Op::Create,
        Op::Release,
        Op::Commit,
        Op::RequestCancel,
        Op::DeliverSignal,
        Op::OperatorTransition,
    ] {
        // The fixture's own writes publish too (create without a claim does): set it up as
        // a user that may publish, then run the operation as `app`.
        let admin = server.url();
        let mut fx = fixture(&admin).await;
        let token = op.prepare(&fx).await;
        if matches!(op, Op::DeliverSignal) {
            // A signal to a held saga wakes nobody; one to a saga nobody holds does.
            fx.store.release(&fx.lease).await.unwrap();
        }
        // `connect` refuses a user that may not publish on the wake channel; the permission
        // is taken away once connected, as an operator's ACL change would.
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("app")
            .arg("allchannels")
            .query_async::<()>(&mut fx.conn)
            .await
            .unwrap();
        fx.store = RedisStore::builder()
            .url(&url)
            .key_prefix(fx.store.keys().prefix())
            .partitions(1)
            .connect()
            .await
            .unwrap();
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("app")
            .arg("resetchannels")
            .query_async::<()>(&mut fx.conn)
            .await
            .unwrap();
        let prefix = fx.store.keys().prefix().to_owned();
        let before = snapshot(&mut fx.conn, &prefix).await;
        let err = match op.run(&fx, &token).await {
            // Refused, not retried: only a change of the ACL helps.
            Err(err @ StoreError::Refused { .. }) => err.to_string(),
            Err(err) => panic!("{op:?}: an ACL refusal must be `Refused`, got {err:?}"),
            Ok(()) => panic!("{op:?} publishes a wake-up, which `app` may not"),
        };
        assert!(err.contains("publish"), "{op:?}: {err}");
        let after = snapshot(&mut fx.conn, &prefix).await;
        assert_eq!(before, after, "{op:?}: a refused PUBLISH wrote something");
        cases += 1;
    }
    assert_eq!(cases, 6);
}
