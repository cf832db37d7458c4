//! The Redis office against real redis-server processes: many concurrent effects (duplicate
//! deliveries racing on purpose) apply each key exactly once, real sagas on 64 workers pass
//! the ledger check, and the Redis and in-memory offices agree change by change.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use saga_core::{Phase, SagaStatus, SagaStore};
use saga_examples::deal::{Deal, DealRequest, PortfolioChange};
use saga_examples::ledger::{BookChange, MemoryOffice, OfficeState, OfficeStore};
use saga_examples::redis_office::RedisOffice;
use saga_examples::report;
use saga_examples::scenario::{self, Settings};
use saga_examples::services::ServiceError;
use saga_examples::sourcing::RecordWrite;
use saga_examples::world::Caller;
use saga_redis::RedisStore;
use saga_redis_testkit::{
    RedisCluster, RedisServer, ServerConfig, can_spawn_servers, unique_prefix,
};
use serde_json::Value;

fn caller(saga: &str, position: u32, step: &str, phase: Phase, key: &str) -> Caller {
    Caller {
        saga: saga.to_owned(),
        position,
        step: step.to_owned(),
        phase,
        key: key.to_owned(),
        attempt: 1,
    }
}

/// An outcome in a form that compares across offices (errors by their message).
fn outcome(result: Result<Value, ServiceError>) -> Result<Value, String> {
    result.map_err(|e| e.to_string())
}

fn create_deal(deal_id: &str, company_id: &str, amount_musd: f64) -> BookChange {
    let request = DealRequest {
        company_id: company_id.to_owned(),
        company_name: format!("Name of {company_id}"),
        amount_musd,
        score: 80,
        watchlisted: false,
        committee: None,
    };
    BookChange::CreateDeal {
        deal_id: deal_id.to_owned(),
        company_id: company_id.to_owned(),
        amount_musd,
        result: serde_json::to_value(Deal {
            deal_id: deal_id.to_owned(),
            request,
        })
        .unwrap(),
        summary: format!("CRM deal {deal_id}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Many concurrent effects.

/// What one delivery of one change is.
#[derive(Clone)]
struct Call {
    caller: Caller,
    change: BookChange,
}

/// What the test saw: every delivery's outcome by key, and the duplicates it caused.
#[derive(Default)]
struct Seen {
    outcomes: Mutex<HashMap<String, Vec<Result<Value, String>>>>,
    changes: Mutex<HashMap<String, Call>>,
    expected_duplicates: AtomicU64,
}

impl Seen {
    /// Delivers `call` `times` times at once, from as many tasks (racing on purpose), and
    /// records the outcomes.
    async fn deliver(
        &self,
        office: &RedisOffice,
        call: &Call,
        times: usize,
    ) -> Result<Value, String> {
        let mut deliveries = tokio::task::JoinSet::new();
        for _ in 0..times {
            let (office, call) = (office.clone(), call.clone());
            deliveries
                .spawn(async move { outcome(office.apply_once(&call.caller, &call.change).await) });
        }
        let outcomes: Vec<Result<Value, String>> = deliveries.join_all().await;
        let first = outcomes[0].clone();
        assert!(
            outcomes.iter().all(|o| *o == first),
            "deliveries of {} disagree: {outcomes:?}",
            call.caller.key
        );
        if first.is_ok() {
            self.expected_duplicates
                .fetch_add(times as u64 - 1, Ordering::Relaxed);
            self.changes
                .lock()
                .unwrap()
                .insert(call.caller.key.clone(), call.clone());
        }
        self.outcomes
            .lock()
            .unwrap()
            .entry(call.caller.key.clone())
            .or_default()
            .extend(outcomes);
        first
    }
}

const DEALS: usize = 480;
const WORKERS: usize = 64;
const COMPANIES: usize = 24;
const SHARED_RECORDS: usize = 16;

struct DealPlan {
    index: usize,
    saga: String,
    company: String,
    amount: f64,
    watchlisted: bool,
    compensate: bool,
}

impl DealPlan {
    fn new(index: usize) -> Self {
        let watchlisted = index.is_multiple_of(13);
        Self {
            index,
            saga: format!("saga-{index:04}"),
            company: format!("co-{:02}", index % COMPANIES),
            amount: f64::from(u32::try_from(index % 7).unwrap() + 1),
            watchlisted,
            compensate: watchlisted || index.is_multiple_of(5),
        }
    }

    /// Deals that complete share deal records (so upserts race on one record); deals that
    /// compensate keep their own, so that restoring one cannot undo another's version.
    fn record_key(&self) -> String {
        if self.compensate {
            format!("own-record-{:04}", self.index)
        } else {
            format!("shared-record-{:02}", self.index % SHARED_RECORDS)
        }
    }

    fn call(&self, position: u32, step: &str, phase: Phase, change: BookChange) -> Call {
        let key = format!("{}/{position}/{}", self.saga, phase.as_str());
        Call {
            caller: caller(&self.saga, position, step, phase, &key),
            change,
        }
    }

    /// How often the forward effect at `position` is delivered at once.
    fn times(&self, position: u32) -> usize {
        if (self.index + position as usize).is_multiple_of(4) {
            3
        } else {
            1
        }
    }
}

/// Runs one deal like a saga: forward effects in order, then (when it compensates) the
/// compensations of the effects that were applied, newest first.
async fn run_deal(office: &RedisOffice, seen: &Seen, deal: &DealPlan) {
    let deal_id = format!("deal-{:04}", deal.index);
    let mut undo: Vec<Call> = Vec::new();
    let forward = |position, step, change| deal.call(position, step, Phase::Forward, change);
    let compensate = |position, step, change| deal.call(position, step, Phase::Compensate, change);

    let call = forward(
        0,
        "upsert_deal_record",
        BookChange::UpsertDealRecord {
            record_key: deal.record_key(),
            company_id: deal.company.clone(),
            score: 60 + u32::try_from(deal.index % 40).unwrap(),
        },
    );
    let write: RecordWrite =
        serde_json::from_value(seen.deliver(office, &call, deal.times(0)).await.unwrap()).unwrap();
    undo.push(compensate(
        0,
        "restore_deal_record",
        BookChange::RestoreDealRecord {
            record_key: write.record_key,
            previous: write.previous,
            summary: format!("deal record {} restored", deal.company),
        },
    ));

    let call = forward(
        1,
        "create_deal",
        create_deal(&deal_id, &deal.company, deal.amount),
    );
    seen.deliver(office, &call, deal.times(1)).await.unwrap();
    undo.push(compensate(
        1,
        "delete_deal",
        BookChange::DeleteDeal {
            deal_id: deal_id.clone(),
            summary: format!("CRM deal {deal_id} deleted"),
        },
    ));

    let call = forward(
        2,
        "update_portfolio",
        BookChange::AddToPortfolio {
            company_id: deal.company.clone(),
            amount_musd: deal.amount,
            summary: format!("portfolio {} +{}M", deal.company, deal.amount),
        },
    );
    let change: PortfolioChange =
        serde_json::from_value(seen.deliver(office, &call, deal.times(2)).await.unwrap()).unwrap();
    assert_eq!(change.after_musd - change.before_musd, deal.amount);
    undo.push(compensate(
        2,
        "revert_portfolio",
        BookChange::TakeFromPortfolio {
            company_id: deal.company.clone(),
            amount_musd: change.after_musd - change.before_musd,
            summary: format!("portfolio {} reverted", deal.company),
        },
    ));

    let call = forward(
        3,
        "notify_committee",
        BookChange::NotifyCommittee {
            text: format!("IC: new deal {deal_id}"),
        },
    );
    let index: usize =
        serde_json::from_value(seen.deliver(office, &call, deal.times(3)).await.unwrap()).unwrap();
    undo.push(compensate(
        3,
        "send_retraction",
        BookChange::RetractCommitteeNotice {
            text: format!("IC: RETRACTED notice #{index} for deal {deal_id}"),
        },
    ));

    let call = forward(
        4,
        "write_audit_entry",
        BookChange::WriteAuditEntry {
            deal_id: deal_id.clone(),
            company_name: deal.company.clone(),
            watchlisted: deal.watchlisted,
        },
    );
    match seen.deliver(office, &call, deal.times(4)).await {
        Ok(audit_id) => {
            assert!(!deal.watchlisted, "a watchlisted deal was audited");
            let audit_id: String = serde_json::from_value(audit_id).unwrap();
            undo.push(compensate(
                4,
                "void_audit_entry",
                BookChange::VoidAuditEntry {
                    summary: format!("audit entry {audit_id} voided"),
                    audit_id,
                },
            ));
        }
        Err(err) => {
            assert!(deal.watchlisted, "audit refused a deal: {err}");
            assert!(err.contains("compliance hold"), "{err}");
        }
    }

    if deal.compensate {
        for call in undo.iter().rev() {
            // Compensations are redelivered too (every other one twice at once).
            let times = if deal.index.is_multiple_of(2) { 2 } else { 1 };
            seen.deliver(office, call, times).await.unwrap();
        }
    } else {
        let call = forward(
            5,
            "notify_partners",
            BookChange::MessagePartners {
                text: format!("{} is worth a look", deal.company),
            },
        );
        seen.deliver(office, &call, deal.times(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_effects_apply_each_key_exactly_once() {
    if !can_spawn_servers("concurrent_effects_apply_each_key_exactly_once") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let prefix = unique_prefix("office_concurrent");
    let office = Arc::new(RedisOffice::connect(&server.url(), &prefix).await.unwrap());
    let seen = Arc::new(Seen::default());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (office, seen, next) = (Arc::clone(&office), Arc::clone(&seen), Arc::clone(&next));
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= DEALS {
                    break;
                }
                run_deal(&office, &seen, &DealPlan::new(index)).await;
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.unwrap();
    }
    // A late redelivery of every applied key, one at a time, changes nothing either.
    let changes: Vec<Call> = seen.changes.lock().unwrap().values().cloned().collect();
    for call in &changes {
        seen.deliver(&office, call, 1).await.unwrap();
        seen.expected_duplicates.fetch_add(1, Ordering::Relaxed);
    }

    let state = office.snapshot().await.unwrap();
    let ledger = &state.ledger;
    let outcomes = seen.outcomes.lock().unwrap().clone();
    let deliveries: usize = outcomes.values().map(Vec::len).sum();
    println!(
        "{deliveries} deliveries of {} keys: {} entries, {} duplicates",
        outcomes.len(),
        ledger.entries.len(),
        ledger.duplicates
    );
    assert!(deliveries >= 3_000, "only {deliveries} deliveries");

    // Each applied key exactly once, in one gap-free order, and nothing else.
    let applied: BTreeSet<&str> = changes.iter().map(|c| c.caller.key.as_str()).collect();
    let mut entry_keys = BTreeSet::new();
    for (seq, entry) in ledger.entries.iter().enumerate() {
        assert_eq!(entry.seq, seq as u64, "ledger order has a gap");
        assert!(
            entry_keys.insert(entry.key.as_str()),
            "{} applied twice",
            entry.key
        );
    }
    assert_eq!(entry_keys, applied);
    assert_eq!(ledger.results.len(), applied.len());
    assert_eq!(
        ledger.duplicates,
        seen.expected_duplicates.load(Ordering::Relaxed),
        "duplicates counted"
    );
    // Every delivery of a key got the recorded result.
    for (key, results) in &outcomes {
        match ledger.results.get(key) {
            Some(recorded) => assert!(results.iter().all(|r| r.as_ref() == Ok(recorded)), "{key}"),
            None => assert!(results.iter().all(Result::is_err), "{key} not recorded"),
        }
    }

    // The books agree with the plan.
    let plans: Vec<DealPlan> = (0..DEALS).map(DealPlan::new).collect();
    let books = &state.books;
    let completed: Vec<&DealPlan> = plans.iter().filter(|d| !d.compensate).collect();
    let crm: BTreeSet<&str> = books.crm_deals.keys().map(String::as_str).collect();
    let expected_crm: BTreeSet<String> = completed
        .iter()
        .map(|d| format!("deal-{:04}", d.index))
        .collect();
    assert_eq!(crm, expected_crm.iter().map(String::as_str).collect());
    let mut portfolio: BTreeMap<String, f64> = BTreeMap::new();
    for deal in &completed {
        *portfolio.entry(deal.company.clone()).or_default() += deal.amount;
    }
    assert_eq!(books.portfolio, portfolio);
    assert_eq!(books.partners.len(), completed.len());
    let audited = plans.iter().filter(|d| !d.watchlisted).count();
    assert_eq!(books.audit.len(), audited);
    for n in 1..=audited {
        assert!(
            books.audit.contains_key(&format!("audit-{n}")),
            "audit-{n} missing"
        );
    }
    assert_eq!(
        books.audit.values().filter(|(_, voided)| *voided).count(),
        plans
            .iter()
            .filter(|d| d.compensate && !d.watchlisted)
            .count()
    );
    // Each notice's index points at that notice: indexes were taken atomically.
    for (key, call) in seen.changes.lock().unwrap().iter() {
        if let BookChange::NotifyCommittee { text } = &call.change {
            let index: usize = serde_json::from_value(ledger.results[key].clone()).unwrap();
            assert_eq!(&books.committee[index], text);
        }
    }
    // Upserts racing on one record each saw a different version before them.
    let mut previous_by_record: BTreeMap<String, Vec<Option<(u32, u32)>>> = BTreeMap::new();
    for call in seen.changes.lock().unwrap().values() {
        if let BookChange::UpsertDealRecord { record_key, .. } = &call.change {
            let write: RecordWrite =
                serde_json::from_value(ledger.results[&call.caller.key].clone()).unwrap();
            previous_by_record
                .entry(record_key.clone())
                .or_default()
                .push(write.previous);
        }
    }
    for (record_key, previous) in &previous_by_record {
        if !record_key.starts_with("shared-") {
            continue;
        }
        let mut versions: Vec<u32> = previous.iter().map(|p| p.map_or(0, |(_, v)| v)).collect();
        versions.sort_unstable();
        let n = u32::try_from(versions.len()).unwrap();
        assert_eq!(versions, (0..n).collect::<Vec<_>>(), "{record_key}");
        assert_eq!(books.deal_records[record_key].1, n, "{record_key}");
    }
    assert!(
        books.deal_records.keys().all(|k| k.starts_with("shared-")),
        "a compensated deal's record survived"
    );

    // Replaying the ledger's order in memory gives the same office: the concurrent effects
    // were applied as if one after another.
    let memory = MemoryOffice::default();
    let by_key = seen.changes.lock().unwrap().clone();
    for entry in &ledger.entries {
        let call = &by_key[&entry.key];
        memory.apply_once(&call.caller, &call.change).await.unwrap();
    }
    let mut replayed = memory.snapshot().await.unwrap();
    replayed.ledger.duplicates = ledger.duplicates;
    assert_eq!(replayed, state);
}

// ---------------------------------------------------------------------------------------
// 2. Real sagas on 64 workers.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_sagas_on_redis_pass_the_ledger_check() {
    if !can_spawn_servers("sixty_four_concurrent_sagas_on_redis_pass_the_ledger_check") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let prefix = unique_prefix("office_sagas");
    let store: Arc<dyn SagaStore> = Arc::new(
        RedisStore::builder()
            .url(server.url())
            .key_prefix(prefix.clone())
            .connect()
            .await
            .unwrap(),
    );
    let office: Arc<dyn OfficeStore> =
        Arc::new(RedisOffice::connect(&server.url(), &prefix).await.unwrap());
    let settings = Settings {
        companies: 120,
        seed: 11,
        fault_rate: 0.3,
        fail_at: None,
        crash_after: None,
        concurrency: 64,
        owner: "office-test".into(),
        search_date: "2025-01-15".into(),
        // One company per sourcing saga, as before batches existed: the counts below are
        // per company.
        batch_size: 1,
        approval_timeout: std::time::Duration::from_secs(3),
        partner: true,
        partner_spacing: std::time::Duration::from_millis(250),
    };
    let run = scenario::run(&settings, store, Arc::clone(&office), Arc::new(()))
        .await
        .unwrap();
    let sagas = report::collect(&run.engine).await.unwrap();
    let state = office.snapshot().await.unwrap();
    let check = report::check_ledger(&sagas, &state);
    let totals = report::totals(&sagas, run.duplicate_starts, &state);
    println!("{}", totals.line());
    assert!(check.holds(), "{:#?}", check.problems);
    assert!(
        totals
            .by_status
            .get(&SagaStatus::Completed)
            .copied()
            .unwrap_or(0)
            >= 100,
        "{}",
        totals.line()
    );
    assert!(check.effects > sagas.len(), "{} effects", check.effects);
    // Timeouts after the effect make steps retry with the same key: answered, not reapplied.
    assert!(state.ledger.duplicates >= 1, "{}", totals.line());
}

// ---------------------------------------------------------------------------------------
// 3. The same changes on both offices.

/// Applies every call to both offices, comparing each outcome, then the snapshots.
async fn compare(redis: &RedisOffice, calls: &[Call]) -> OfficeState {
    let memory = MemoryOffice::default();
    for (n, call) in calls.iter().enumerate() {
        let in_memory = outcome(memory.apply_once(&call.caller, &call.change).await);
        let in_redis = outcome(redis.apply_once(&call.caller, &call.change).await);
        assert_eq!(in_memory, in_redis, "call #{n} ({:?}) differs", call.change);
        let recorded_memory = memory.recorded(&call.caller.key).await.unwrap();
        let recorded_redis = redis.recorded(&call.caller.key).await.unwrap();
        assert_eq!(
            recorded_memory, recorded_redis,
            "call #{n}: recorded result differs"
        );
    }
    let in_memory = memory.snapshot().await.unwrap();
    let in_redis = redis.snapshot().await.unwrap();
    assert_eq!(in_memory, in_redis, "snapshots differ");
    in_redis
}

fn scripted_calls() -> Vec<Call> {
    let call = |n: u32, step: &str, phase, key: &str, change| Call {
        caller: caller(&format!("saga-{}", n / 10), n % 10, step, phase, key),
        change,
    };
    let f = Phase::Forward;
    let c = Phase::Compensate;
    vec![
        call(
            0,
            "upsert_deal_record",
            f,
            "k-up-1",
            BookChange::UpsertDealRecord {
                record_key: "rec-a".into(),
                company_id: "c-001".into(),
                score: 71,
            },
        ),
        call(
            1,
            "upsert_deal_record",
            f,
            "k-up-2",
            BookChange::UpsertDealRecord {
                record_key: "rec-a".into(),
                company_id: "c-001".into(),
                score: 88,
            },
        ),
        call(
            2,
            "create_deal",
            f,
            "k-deal-1",
            create_deal("deal-1", "c-001", 12.0),
        ),
        // A duplicate delivery: the recorded result, nothing applied.
        call(
            2,
            "create_deal",
            f,
            "k-deal-1",
            create_deal("deal-1", "c-001", 12.0),
        ),
        call(
            3,
            "update_portfolio",
            f,
            "k-pf-1",
            BookChange::AddToPortfolio {
                company_id: "c-001".into(),
                amount_musd: 12.0,
                summary: "portfolio c-001 +12M".into(),
            },
        ),
        call(
            4,
            "update_portfolio",
            f,
            "k-pf-2",
            BookChange::AddToPortfolio {
                company_id: "c-001".into(),
                amount_musd: 0.25,
                summary: "portfolio c-001 +0.25M".into(),
            },
        ),
        call(
            5,
            "notify_committee",
            f,
            "k-ic-1",
            BookChange::NotifyCommittee {
                text: "IC: new deal deal-1 — Ünïcode / \"quoted\" (12M)".into(),
            },
        ),
        call(
            6,
            "notify_committee",
            f,
            "k-ic-2",
            BookChange::NotifyCommittee {
                text: "IC: new deal deal-2".into(),
            },
        ),
        call(
            7,
            "write_audit_entry",
            f,
            "k-audit-1",
            BookChange::WriteAuditEntry {
                deal_id: "deal-1".into(),
                company_name: "Helix".into(),
                watchlisted: false,
            },
        ),
        // The business rule: refused, nothing recorded; a retry with the key is refused again.
        call(
            8,
            "write_audit_entry",
            f,
            "k-audit-2",
            BookChange::WriteAuditEntry {
                deal_id: "deal-2".into(),
                company_name: "Watched Co".into(),
                watchlisted: true,
            },
        ),
        call(
            8,
            "write_audit_entry",
            f,
            "k-audit-2",
            BookChange::WriteAuditEntry {
                deal_id: "deal-2".into(),
                company_name: "Watched Co".into(),
                watchlisted: true,
            },
        ),
        call(
            9,
            "write_audit_entry",
            f,
            "k-audit-3",
            BookChange::WriteAuditEntry {
                deal_id: "deal-3".into(),
                company_name: "Lumen".into(),
                watchlisted: false,
            },
        ),
        call(
            10,
            "void_audit_entry",
            c,
            "k-void-1",
            BookChange::VoidAuditEntry {
                audit_id: "audit-1".into(),
                summary: "audit entry audit-1 voided".into(),
            },
        ),
        // Voiding an entry that is not there changes nothing but is recorded.
        call(
            11,
            "void_audit_entry",
            c,
            "k-void-2",
            BookChange::VoidAuditEntry {
                audit_id: "audit-99".into(),
                summary: "audit entry audit-99 voided".into(),
            },
        ),
        call(
            12,
            "send_retraction",
            c,
            "k-ret-1",
            BookChange::RetractCommitteeNotice {
                text: "IC: RETRACTED notice #0 for deal deal-1".into(),
            },
        ),
        call(
            13,
            "revert_portfolio",
            c,
            "k-rev-1",
            BookChange::TakeFromPortfolio {
                company_id: "c-001".into(),
                amount_musd: 12.0,
                summary: "portfolio c-001 reverted".into(),
            },
        ),
        // Floating-point dust closes the position.
        call(
            14,
            "revert_portfolio",
            c,
            "k-rev-2",
            BookChange::TakeFromPortfolio {
                company_id: "c-001".into(),
                amount_musd: 0.25 + 1e-12,
                summary: "portfolio c-001 reverted".into(),
            },
        ),
        // Taking from a position that is not there opens it negative.
        call(
            15,
            "revert_portfolio",
            c,
            "k-rev-3",
            BookChange::TakeFromPortfolio {
                company_id: "c-404".into(),
                amount_musd: 3.5,
                summary: "portfolio c-404 reverted".into(),
            },
        ),
        // Deleting a deal that is not there changes nothing.
        call(
            16,
            "delete_deal",
            c,
            "k-del-0",
            BookChange::DeleteDeal {
                deal_id: "deal-missing".into(),
                summary: "CRM deal deal-missing deleted".into(),
            },
        ),
        call(
            17,
            "delete_deal",
            c,
            "k-del-1",
            BookChange::DeleteDeal {
                deal_id: "deal-1".into(),
                summary: "CRM deal deal-1 deleted".into(),
            },
        ),
        call(
            18,
            "restore_deal_record",
            c,
            "k-res-1",
            BookChange::RestoreDealRecord {
                record_key: "rec-a".into(),
                previous: Some((71, 1)),
                summary: "deal record c-001 restored".into(),
            },
        ),
        call(
            19,
            "upsert_deal_record",
            f,
            "k-up-3",
            BookChange::UpsertDealRecord {
                record_key: "rec-b".into(),
                company_id: "c-002".into(),
                score: 5,
            },
        ),
        call(
            20,
            "restore_deal_record",
            c,
            "k-res-2",
            BookChange::RestoreDealRecord {
                record_key: "rec-b".into(),
                previous: None,
                summary: "deal record c-002 restored".into(),
            },
        ),
        call(
            21,
            "notify_partners",
            f,
            "k-pt-1",
            BookChange::MessagePartners {
                text: "Helix scored 88 — worth a look".into(),
            },
        ),
        call(
            22,
            "create_deal",
            f,
            "k-deal-2",
            create_deal("deal-2", "c-002", 7.5),
        ),
        // The same key with a different change still answers the recorded result.
        call(
            22,
            "create_deal",
            f,
            "k-deal-2",
            create_deal("deal-2", "c-002", 99.0),
        ),
    ]
}

/// A seeded random sequence over few records, so that changes meet on the same records, with
/// repeated keys and refusals.
fn random_calls(seed: u64, count: usize) -> Vec<Call> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut calls: Vec<Call> = Vec::new();
    for n in 0..count {
        if !calls.is_empty() && rng.u8(0..10) == 0 {
            let again = calls[rng.usize(0..calls.len())].clone();
            calls.push(again);
            continue;
        }
        let company = format!("c-{}", rng.u8(0..4));
        // Multiples of 1/4: sums are exact, so both offices' floats agree bit for bit.
        let amount = f64::from(rng.u8(1..40)) / 4.0;
        let record = format!("rec-{}", rng.u8(0..3));
        let deal = format!("deal-{}", rng.u8(0..6));
        let (step, change) = match rng.u8(0..11) {
            0 => ("create_deal", create_deal(&deal, &company, amount)),
            1 => (
                "delete_deal",
                BookChange::DeleteDeal {
                    deal_id: deal.clone(),
                    summary: format!("CRM deal {deal} deleted"),
                },
            ),
            2 => (
                "update_portfolio",
                BookChange::AddToPortfolio {
                    company_id: company.clone(),
                    amount_musd: amount,
                    summary: format!("portfolio {company} +{amount}M"),
                },
            ),
            3 => (
                "revert_portfolio",
                BookChange::TakeFromPortfolio {
                    company_id: company.clone(),
                    amount_musd: amount,
                    summary: format!("portfolio {company} reverted"),
                },
            ),
            4 => (
                "notify_committee",
                BookChange::NotifyCommittee {
                    text: format!("IC: new deal {deal}"),
                },
            ),
            5 => (
                "send_retraction",
                BookChange::RetractCommitteeNotice {
                    text: format!("IC: RETRACTED {deal}"),
                },
            ),
            6 => (
                "write_audit_entry",
                BookChange::WriteAuditEntry {
                    deal_id: deal.clone(),
                    company_name: company.clone(),
                    watchlisted: rng.u8(0..4) == 0,
                },
            ),
            7 => {
                let audit_id = format!("audit-{}", rng.u8(1..8));
                (
                    "void_audit_entry",
                    BookChange::VoidAuditEntry {
                        summary: format!("audit entry {audit_id} voided"),
                        audit_id,
                    },
                )
            }
            8 => (
                "upsert_deal_record",
                BookChange::UpsertDealRecord {
                    record_key: record.clone(),
                    company_id: company.clone(),
                    score: rng.u32(0..=100),
                },
            ),
            9 => (
                "restore_deal_record",
                BookChange::RestoreDealRecord {
                    previous: (rng.bool()).then(|| (rng.u32(0..=100), rng.u32(1..5))),
                    summary: format!("deal record {record} restored"),
                    record_key: record.clone(),
                },
            ),
            _ => (
                "notify_partners",
                BookChange::MessagePartners {
                    text: format!("{company} — worth a look"),
                },
            ),
        };
        let phase = if rng.bool() {
            Phase::Forward
        } else {
            Phase::Compensate
        };
        let n = u32::try_from(n).unwrap();
        calls.push(Call {
            caller: caller(
                &format!("saga-{}", n / 7),
                n % 7,
                step,
                phase,
                &format!("key-{n}"),
            ),
            change,
        });
    }
    calls
}

/// Where the Redis office of a comparison lives.
enum Target {
    Server(String),
    Cluster(Vec<String>),
}

impl Target {
    async fn office(&self, test: &str) -> RedisOffice {
        let prefix = unique_prefix(test);
        match self {
            Target::Server(url) => RedisOffice::connect(url, &prefix).await.unwrap(),
            Target::Cluster(urls) => RedisOffice::connect_cluster(urls, &prefix).await.unwrap(),
        }
    }
}

async fn offices_agree(target: &Target) {
    let state = compare(&target.office("office_agree").await, &scripted_calls()).await;
    // The results have the shapes the steps decode.
    let results = &state.ledger.results;
    let write: RecordWrite = serde_json::from_value(results["k-up-2"].clone()).unwrap();
    assert_eq!(write.previous, Some((71, 1)));
    let change: PortfolioChange = serde_json::from_value(results["k-pf-2"].clone()).unwrap();
    assert_eq!((change.before_musd, change.after_musd), (12.0, 12.25));
    let deal: Deal = serde_json::from_value(results["k-deal-1"].clone()).unwrap();
    assert_eq!(deal.deal_id, "deal-1");
    let notice: usize = serde_json::from_value(results["k-ic-2"].clone()).unwrap();
    assert_eq!(notice, 1);
    let audit: String = serde_json::from_value(results["k-audit-3"].clone()).unwrap();
    assert_eq!(audit, "audit-2");
    assert!(
        !results.contains_key("k-audit-2"),
        "a refused change was recorded"
    );
    assert_eq!(state.ledger.duplicates, 2);
    assert_eq!(state.books.portfolio.get("c-001"), None, "dust kept");
    assert_eq!(state.books.portfolio.get("c-404"), Some(&-3.5));
    assert_eq!(state.books.crm_deals["deal-2"].1, 7.5);
    assert_eq!(state.books.deal_records.get("rec-a"), Some(&(71, 1)));
    assert_eq!(state.books.deal_records.get("rec-b"), None);

    for seed in [1, 2, 3] {
        let office = target.office(&format!("office_agree_{seed}")).await;
        compare(&office, &random_calls(seed, 400)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_offices_agree_change_by_change() {
    if !can_spawn_servers("memory_and_redis_offices_agree_change_by_change") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    offices_agree(&Target::Server(server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_offices_agree_on_a_cluster() {
    if !can_spawn_servers("memory_and_redis_offices_agree_on_a_cluster") {
        return;
    }
    let cluster = RedisCluster::start(3);
    offices_agree(&Target::Cluster(cluster.urls())).await;
}
