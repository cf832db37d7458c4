//! Which partitions may have due work: the client-side index that lets `claim_due` visit only
//! those instead of every partition on every wake-up.
//!
//! A partition is visited when
//! - it is marked *dirty*: a wake-up message named one of its sagas (created without a lease,
//!   released, cancel requested, made due at once, reopened by an operator), or this store
//!   made such a write itself;
//! - its *next due* time has come: the lowest due score the last visit left behind (a durable
//!   timer, a lease that may lapse), or a timer this store set itself;
//! - or a *sweep* is due: every partition is visited at least once per sweep interval, which
//!   bounds how late anything the hints cannot see is found (timers and lapsed leases of other
//!   processes' sagas).
//!
//! Without a live wake-up subscription every call is a sweep: nothing else would tell this
//! process about work that other processes created.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// "Nothing known to be due in this partition."
const NEVER: u64 = u64::MAX;

/// The due-work index of one store.
#[derive(Debug)]
pub(crate) struct DueHints {
    dirty: Vec<AtomicBool>,
    /// Client-clock milliseconds since the epoch; [`NEVER`] when empty as far as we know.
    next_due: Vec<AtomicU64>,
    last_sweep: Mutex<Option<Instant>>,
    sweep_every: Duration,
    /// The wake-up subscription is connected and subscribed.
    live: AtomicBool,
}

/// The partitions one claim visits.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Visit {
    /// Ascending partition numbers.
    pub(crate) partitions: Vec<u16>,
    /// Every partition (a sweep).
    pub(crate) sweep: bool,
}

/// The client's clock, in milliseconds since the Unix epoch.
pub(crate) fn client_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl DueHints {
    pub(crate) fn new(partitions: u16, sweep_every: Duration) -> Self {
        Self {
            // Unknown at first: the first visit of each partition finds out.
            dirty: (0..partitions).map(|_| AtomicBool::new(true)).collect(),
            next_due: (0..partitions).map(|_| AtomicU64::new(NEVER)).collect(),
            last_sweep: Mutex::new(None),
            sweep_every,
            live: AtomicBool::new(false),
        }
    }

    /// Work may be waiting in partition `p`.
    pub(crate) fn mark_dirty(&self, p: u16) {
        if let Some(flag) = self.dirty.get(usize::from(p)) {
            flag.store(true, Ordering::Release);
        }
    }

    /// Every partition may have work (a reconnection may have missed messages).
    pub(crate) fn mark_all_dirty(&self) {
        for flag in &self.dirty {
            flag.store(true, Ordering::Release);
        }
    }

    /// A saga of partition `p` becomes due at `at_ms` (client clock).
    pub(crate) fn note_due(&self, p: u16, at_ms: u64) {
        if let Some(next) = self.next_due.get(usize::from(p)) {
            next.fetch_min(at_ms, Ordering::AcqRel);
        }
    }

    /// Whether the wake-up subscription is live (hints are trusted only then).
    pub(crate) fn set_live(&self, live: bool) {
        if live {
            self.mark_all_dirty();
        }
        self.live.store(live, Ordering::Release);
    }

    /// The partitions to visit now. Takes their dirty marks, so that a mark made while the
    /// claim is in flight survives for the next one.
    pub(crate) fn plan(&self) -> Visit {
        let all = || (0..self.dirty.len()).filter_map(|p| u16::try_from(p).ok());
        let sweep = !self.live.load(Ordering::Acquire) || self.sweep_due();
        if sweep {
            for flag in &self.dirty {
                flag.store(false, Ordering::Release);
            }
            return Visit {
                partitions: all().collect(),
                sweep: true,
            };
        }
        let now = client_now_ms();
        let partitions = all()
            .filter(|&p| {
                let i = usize::from(p);
                let dirty = self.dirty[i].swap(false, Ordering::AcqRel);
                dirty || self.next_due[i].load(Ordering::Acquire) <= now
            })
            .collect();
        Visit {
            partitions,
            sweep: false,
        }
    }

    /// Records what a visit of partition `p` left behind: its lowest due score, as client
    /// time (`None`: the due set is empty).
    pub(crate) fn visited(&self, p: u16, next_due_ms: Option<u64>) {
        if let Some(next) = self.next_due.get(usize::from(p)) {
            next.store(next_due_ms.unwrap_or(NEVER), Ordering::Release);
        }
    }

    /// A claim did not finish: visit these partitions again next time.
    pub(crate) fn retry(&self, partitions: &[u16]) {
        for &p in partitions {
            self.mark_dirty(p);
        }
    }

    fn sweep_due(&self) -> bool {
        // The guarded value is an `Option<Instant>`; a panic elsewhere cannot corrupt it.
        let mut last = self
            .last_sweep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|at| at.elapsed() >= self.sweep_every);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(partitions: u16) -> DueHints {
        let hints = DueHints::new(partitions, Duration::from_secs(3600));
        hints.set_live(true);
        // The first plan is a sweep (none happened yet); it also clears the initial marks.
        assert!(hints.plan().sweep);
        hints
    }

    #[test]
    fn without_a_live_subscription_every_plan_is_a_sweep() {
        let hints = DueHints::new(4, Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(
                hints.plan(),
                Visit {
                    partitions: vec![0, 1, 2, 3],
                    sweep: true
                }
            );
        }
    }

    #[test]
    fn a_live_subscription_visits_only_marked_or_due_partitions() {
        let hints = live(8);
        for p in 0..8 {
            hints.visited(p, None);
        }
        assert!(hints.plan().partitions.is_empty());
        hints.mark_dirty(5);
        hints.note_due(2, client_now_ms().saturating_sub(1));
        hints.note_due(3, client_now_ms() + 3_600_000);
        assert_eq!(hints.plan().partitions, vec![2, 5]);
        // The dirty mark was taken; the past due time stays until a visit reports anew.
        assert_eq!(hints.plan().partitions, vec![2]);
        hints.visited(2, None);
        assert!(hints.plan().partitions.is_empty());
    }

    #[test]
    fn a_mark_made_during_a_claim_survives_it() {
        let hints = live(2);
        hints.visited(0, None);
        hints.visited(1, None);
        hints.mark_dirty(1);
        let visit = hints.plan();
        assert_eq!(visit.partitions, vec![1]);
        hints.mark_dirty(1); // a wake-up while the claim is in flight
        hints.visited(1, None);
        assert_eq!(hints.plan().partitions, vec![1]);
    }

    #[test]
    fn reconnecting_marks_every_partition() {
        let hints = live(3);
        for p in 0..3 {
            hints.visited(p, None);
        }
        hints.set_live(false);
        hints.set_live(true);
        assert_eq!(hints.plan().partitions, vec![0, 1, 2]);
    }

    #[test]
    fn sweeps_come_back_after_the_interval() {
        let hints = DueHints::new(2, Duration::ZERO);
        hints.set_live(true);
        assert!(hints.plan().sweep);
        assert!(hints.plan().sweep);
    }
}
