//! Wall-clock time as the engine and the in-memory store see it.
//!
//! Timestamps are milliseconds since the Unix epoch ([`Timestamp`]). The default clock is
//! anchored once to the system clock and then advances with tokio's monotonic clock, so a
//! test that pauses tokio time (`#[tokio::test(start_paused = true)]`) moves every timestamp,
//! lease expiry and retry time along with it, and a backward jump of the system clock never
//! makes a lease look younger than it is.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp `duration` after this one (saturating).
    #[must_use]
    pub fn plus(self, duration: Duration) -> Self {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(millis))
    }

    /// How long after `earlier` this timestamp is (zero when it is not after it).
    #[must_use]
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// The timestamp as an RFC 3339 string with milliseconds, e.g. `2025-01-15T14:32:02.000Z`.
    #[must_use]
    pub fn to_rfc3339(self) -> String {
        // RFC 3339 ends at year 9999; a later time (a saturated `plus`) is shown as raw
        // milliseconds rather than failing to format.
        const LAST_RFC3339_MS: u64 = 253_402_300_799_999;
        if self.0 > LAST_RFC3339_MS {
            return format!("{}ms after the epoch", self.0);
        }
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(self.0)).to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The default clock: the system time at creation, advanced by tokio's monotonic clock.
#[derive(Debug, Clone)]
pub struct TokioClock {
    anchor_wall: Timestamp,
    anchor_instant: tokio::time::Instant,
}

impl TokioClock {
    /// A clock anchored to the system time now.
    #[must_use]
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            // A system clock set before 1970 is a misconfiguration; starting at the epoch
            // keeps every duration computation correct.
            .unwrap_or(0);
        Self {
            anchor_wall: Timestamp(wall),
            anchor_instant: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.anchor_wall.plus(self.anchor_instant.elapsed())
    }
}
