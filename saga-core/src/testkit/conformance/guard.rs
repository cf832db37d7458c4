//! Idempotency records (the step guard).

use std::sync::Arc;

use super::{LONG, SHORT, WAIT_BOUND, unique, wait_for};
use crate::store::{GuardClaim, SagaStore, StoreError};

/// An encoded effect result, opaque to the store.
const RESULT: &str = r#"{"deal_id":"d-42","note":"réservé \"ok\"\n☃"}"#;

/// A key with characters that must not leak raw into key names.
fn guard_key() -> String {
    unique("charge:{company-123} ü/2025")
}

/// Claims `key`, which must be free; returns the token.
async fn claim_token(
    store: &dyn SagaStore,
    key: &str,
    fingerprint: &str,
    ttl: std::time::Duration,
) -> String {
    match store.guard_claim(key, fingerprint, ttl).await {
        Ok(GuardClaim::Claimed { token }) => {
            assert!(!token.is_empty(), "a claim token must not be empty");
            token
        }
        other => panic!("guard_claim of free key {key:?} must be Claimed, got {other:?}"),
    }
}

/// Claims `key` again and returns what the store found.
async fn claim_again(store: &dyn SagaStore, key: &str, fingerprint: &str) -> GuardClaim {
    store.guard_claim(key, fingerprint, LONG).await.unwrap()
}

/// A free key is `Claimed` with a token; while it is in progress, a claim with the same
/// fingerprint is `InProgress` and one with another fingerprint is `Conflict`. Keys are
/// independent.
pub async fn guard_claim_in_progress_and_conflict(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    claim_token(&*store, &key, "fp-1", LONG).await;
    let same = claim_again(&*store, &key, "fp-1").await;
    assert_eq!(
        same,
        GuardClaim::InProgress,
        "a claim of an in-progress key with the same fingerprint must be InProgress"
    );
    let other = claim_again(&*store, &key, "fp-2").await;
    assert_eq!(
        other,
        GuardClaim::Conflict,
        "a claim of an in-progress key with another fingerprint must be Conflict"
    );
    claim_token(&*store, &guard_key(), "fp-1", LONG).await;
}

/// `guard_complete` with the claim's token records the result: later claims with the same
/// fingerprint return it byte for byte (`Completed`), with another fingerprint `Conflict`.
pub async fn guard_complete_records_the_result(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    let token = claim_token(&*store, &key, "fp-1", LONG).await;
    store
        .guard_complete(&key, &token, RESULT, LONG)
        .await
        .unwrap();
    for _ in 0..2 {
        let again = claim_again(&*store, &key, "fp-1").await;
        assert_eq!(
            again,
            GuardClaim::Completed {
                result: RESULT.to_owned()
            },
            "a claim of a completed key must return the recorded result byte for byte"
        );
    }
    let other = claim_again(&*store, &key, "fp-2").await;
    assert_eq!(
        other,
        GuardClaim::Conflict,
        "a claim of a completed key with another fingerprint must be Conflict"
    );
}

/// `guard_complete` with a token that does not own the key (made up, or another key's) is
/// [`StoreError::Invalid`] and records nothing; the owner can still complete.
pub async fn guard_complete_with_wrong_token_fails(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    let token = claim_token(&*store, &key, "fp-1", LONG).await;
    let other_key = guard_key();
    let other_token = claim_token(&*store, &other_key, "fp-1", LONG).await;
    for wrong in ["not-the-token".to_owned(), other_token] {
        let result = store.guard_complete(&key, &wrong, "forged", LONG).await;
        assert!(
            matches!(result, Err(StoreError::Invalid(_))),
            "guard_complete with a token that does not own the key must be Invalid, got {result:?}"
        );
        let state = claim_again(&*store, &key, "fp-1").await;
        assert_eq!(
            state,
            GuardClaim::InProgress,
            "a rejected complete must leave the claim in progress"
        );
    }
    let unknown = store
        .guard_complete(&guard_key(), &token, "forged", LONG)
        .await;
    assert!(
        matches!(unknown, Err(StoreError::Invalid(_))),
        "guard_complete of an unclaimed key must be Invalid, got {unknown:?}"
    );
    store
        .guard_complete(&key, &token, RESULT, LONG)
        .await
        .unwrap();
    let done = claim_again(&*store, &key, "fp-1").await;
    assert_eq!(
        done,
        GuardClaim::Completed {
            result: RESULT.to_owned()
        },
        "the owner's complete records the result"
    );
}

/// `guard_release` with the claim's token frees the key (a retry claims it anew, with a new
/// token, and the released token can no longer complete); a release with a wrong token, of an
/// unknown key, or after completion does nothing (and is no error).
pub async fn guard_release_makes_the_key_claimable(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    let first = claim_token(&*store, &key, "fp-1", LONG).await;
    store.guard_release(&key, "not-the-token").await.unwrap();
    assert_eq!(
        claim_again(&*store, &key, "fp-1").await,
        GuardClaim::InProgress,
        "a release with a wrong token does nothing"
    );
    store.guard_release(&guard_key(), &first).await.unwrap();

    store.guard_release(&key, &first).await.unwrap();
    let second = claim_token(&*store, &key, "fp-1", LONG).await;
    assert_ne!(second, first, "a new claim must get a new token");
    let stale = store.guard_complete(&key, &first, "stale", LONG).await;
    assert!(
        matches!(stale, Err(StoreError::Invalid(_))),
        "the released token must not complete, got {stale:?}"
    );

    store
        .guard_complete(&key, &second, RESULT, LONG)
        .await
        .unwrap();
    store.guard_release(&key, &second).await.unwrap();
    assert_eq!(
        claim_again(&*store, &key, "fp-1").await,
        GuardClaim::Completed {
            result: RESULT.to_owned()
        },
        "a release after completion must not erase the result"
    );
}

/// An in-progress claim lapses after its `in_progress_ttl`: the key is claimable again (with
/// any fingerprint), and the lapsed token can no longer complete. Polls a 200 ms claim.
pub async fn guard_in_progress_claim_expires(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    let first = claim_token(&*store, &key, "fp-1", SHORT).await;
    let second = wait_for("the in-progress claim to lapse", WAIT_BOUND, async || {
        match store.guard_claim(&key, "fp-2", LONG).await.unwrap() {
            GuardClaim::Claimed { token } => Some(token),
            GuardClaim::Conflict => None,
            other => panic!("a claim of a key in progress with another fingerprint must be Conflict until it lapses, got {other:?}"),
        }
    })
    .await;
    assert_ne!(second, first, "a new claim must get a new token");
    let stale = store.guard_complete(&key, &first, "stale", LONG).await;
    assert!(
        matches!(stale, Err(StoreError::Invalid(_))),
        "a lapsed, taken-over token must not complete, got {stale:?}"
    );
    store
        .guard_complete(&key, &second, RESULT, LONG)
        .await
        .unwrap();
    assert_eq!(
        claim_again(&*store, &key, "fp-2").await,
        GuardClaim::Completed {
            result: RESULT.to_owned()
        },
        "the new owner's result is recorded"
    );
}

/// A token whose claim lapsed can no longer complete even when nobody claimed the key since
/// (for Redis: the key expired), and the key stays claimable. Two keys are claimed for 200 ms
/// one after the other; once the second is claimable again, the first has lapsed too.
pub async fn guard_claim_expired_without_takeover_cannot_complete(store: Arc<dyn SagaStore>) {
    let first_key = guard_key();
    let token = claim_token(&*store, &first_key, "fp-1", SHORT).await;
    let probe_key = guard_key();
    claim_token(&*store, &probe_key, "fp-1", SHORT).await;
    wait_for("the probe claim to lapse", WAIT_BOUND, async || match store
        .guard_claim(&probe_key, "fp-1", LONG)
        .await
        .unwrap()
    {
        GuardClaim::Claimed { .. } => Some(()),
        GuardClaim::InProgress => None,
        other => panic!("the probe key must be InProgress until it lapses, got {other:?}"),
    })
    .await;
    let late = store.guard_complete(&first_key, &token, "late", LONG).await;
    assert!(
        matches!(late, Err(StoreError::Invalid(_))),
        "a lapsed token must not complete, got {late:?}"
    );
    claim_token(&*store, &first_key, "fp-1", LONG).await;
}

/// A completed record lapses after the `ttl` given to `guard_complete`: the key is claimable
/// again. Polls a 200 ms record.
pub async fn guard_completed_record_expires(store: Arc<dyn SagaStore>) {
    let key = guard_key();
    let token = claim_token(&*store, &key, "fp-1", LONG).await;
    store
        .guard_complete(&key, &token, RESULT, SHORT)
        .await
        .unwrap();
    let renewed = wait_for(
        "the completed record to lapse",
        WAIT_BOUND,
        async || match store.guard_claim(&key, "fp-1", LONG).await.unwrap() {
            GuardClaim::Claimed { token } => Some(token),
            GuardClaim::Completed { result } => {
                assert_eq!(
                    result, RESULT,
                    "until it lapses, the record returns its result"
                );
                None
            }
            other => panic!("a completed key must be Completed until it lapses, got {other:?}"),
        },
    )
    .await;
    assert_ne!(renewed, token, "a new claim must get a new token");
}
