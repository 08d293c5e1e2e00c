//! A tenant's Weibo call allowance, shared by every connect replica: `per_hour` calls in
//! each clock hour, of which polling may claim only four fifths so that replies always have
//! room, and a pause with doubling backoff each time Weibo says the limit is reached.
//!
//! The hour's count and the pause live in the bucket ([`SharedHour`]); a replica claims
//! calls from it a chunk at a time (compare-and-set) and spends them locally ([`Budget`]),
//! so the bucket is written once per chunk, not once per call. Calls a replica claimed and
//! did not make by the end of the hour are lost; no replica can make more than the hour
//! allows.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const HOUR: Duration = Duration::from_secs(3600);
const HOUR_MS: i64 = 3_600_000;

/// The clock hour of a time in milliseconds since the epoch.
fn hour_of(now_ms: i64) -> i64 {
    now_ms.div_euclid(HOUR_MS)
}

/// What a replica may do about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Make it: it was claimed already.
    Granted,
    /// Claim more calls from the hour first.
    Claim,
    /// Not before this long.
    Wait(Duration),
}

/// One replica's side of a tenant's allowance: the calls it claimed this hour, how many it
/// made, and its own pause.
#[derive(Debug)]
pub struct Budget {
    per_hour: u32,
    hour: i64,
    granted: u32,
    used: u32,
    paused_until: Option<Instant>,
    first_backoff: Duration,
    backoff: Duration,
}

impl Budget {
    pub fn new(per_hour: u32, first_backoff: Duration) -> Self {
        Self {
            per_hour: per_hour.max(1),
            hour: 0,
            granted: 0,
            used: 0,
            paused_until: None,
            first_backoff: first_backoff.clamp(Duration::from_secs(1), HOUR),
            backoff: Duration::ZERO,
        }
    }

    /// Takes one of the calls claimed this hour, if one is left.
    pub fn take(&mut self, now: Instant, now_ms: i64) -> Take {
        if let Some(until) = self.paused_until {
            if until > now {
                return Take::Wait(until - now);
            }
            self.paused_until = None;
        }
        self.enter(hour_of(now_ms));
        if self.used < self.granted {
            self.used += 1;
            Take::Granted
        } else {
            Take::Claim
        }
    }

    /// `calls` more claimed in `hour`.
    pub fn grant(&mut self, hour: i64, calls: u32) {
        self.enter(hour);
        self.granted += calls;
    }

    fn enter(&mut self, hour: i64) {
        if hour != self.hour {
            self.hour = hour;
            self.granted = 0;
            self.used = 0;
        }
    }

    /// How far the hour's count may go with this claim: polling stops at four fifths.
    pub fn limit(&self, polling: bool) -> u32 {
        if polling {
            self.per_hour * 4 / 5
        } else {
            self.per_hour
        }
    }

    /// Calls claimed at once: a twentieth of the hour, so that one replica cannot hold
    /// much of it idle.
    pub fn chunk(&self) -> u32 {
        (self.per_hour / 20).clamp(1, 50)
    }

    /// Weibo said the rate limit is reached: pause, longer each time in a row.
    pub fn limited(&mut self, now: Instant) -> Duration {
        self.backoff = (self.backoff * 2).clamp(self.first_backoff, HOUR);
        self.paused_until = Some(now + self.backoff);
        self.backoff
    }

    /// A call succeeded: the next limit starts from the first backoff again.
    pub fn succeeded(&mut self) {
        self.backoff = Duration::ZERO;
    }
}

/// A tenant's hour across replicas, as the bucket keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedHour {
    /// The clock hour `claimed` counts.
    pub hour: i64,
    pub claimed: u32,
    /// No replica calls Weibo before this time (milliseconds since the epoch).
    #[serde(default)]
    pub paused_until_ms: i64,
}

impl SharedHour {
    /// Up to `chunk` calls claimed at `now_ms` with the hour's count kept within `limit`:
    /// the record to write and the calls it grants, or how long until any can be.
    pub fn claim(&self, now_ms: i64, limit: u32, chunk: u32) -> Result<(SharedHour, u32), Duration> {
        if self.paused_until_ms > now_ms {
            return Err(millis(self.paused_until_ms - now_ms));
        }
        let hour = hour_of(now_ms);
        let claimed = if self.hour == hour { self.claimed } else { 0 };
        let calls = limit.saturating_sub(claimed).min(chunk);
        if calls == 0 {
            return Err(millis((hour + 1) * HOUR_MS - now_ms));
        }
        let next = SharedHour {
            hour,
            claimed: claimed + calls,
            paused_until_ms: self.paused_until_ms,
        };
        Ok((next, calls))
    }

    /// The record with every replica paused until `until_ms` (a later pause stands).
    pub fn paused(&self, until_ms: i64) -> SharedHour {
        SharedHour {
            paused_until_ms: self.paused_until_ms.max(until_ms),
            ..*self
        }
    }

    /// Calls not yet claimed this hour.
    pub fn remaining(&self, now_ms: i64, per_hour: u32) -> u32 {
        if self.hour == hour_of(now_ms) {
            per_hour.saturating_sub(self.claimed)
        } else {
            per_hour
        }
    }
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON_MS: i64 = 1_764_936_000_000;

    #[test]
    fn claims_keep_the_hour_within_its_allowance_and_polling_within_four_fifths() {
        let budget = Budget::new(10, Duration::from_secs(60));
        assert_eq!(
            (budget.limit(true), budget.limit(false), budget.chunk()),
            (8, 10, 1)
        );
        let mut hour = SharedHour::default();
        let mut granted = 0;
        while let Ok((next, calls)) = hour.claim(NOON_MS, budget.limit(true), 3) {
            (hour, granted) = (next, granted + calls);
        }
        assert_eq!(
            granted, 8,
            "polling stops at four fifths, the last chunk cut to fit"
        );
        let (next, calls) = hour
            .claim(NOON_MS, budget.limit(false), 3)
            .expect("replies have room");
        assert_eq!((next.claimed, calls), (10, 2));
        let wait = next
            .claim(NOON_MS + 60_000, 10, 3)
            .expect_err("the hour is spent");
        assert_eq!(wait, Duration::from_secs(59 * 60), "until the next clock hour");
        let (fresh, calls) = next.claim(NOON_MS + HOUR_MS, 10, 3).expect("a new hour");
        assert_eq!((fresh.claimed, calls), (3, 3));
        assert_eq!(fresh.remaining(NOON_MS + HOUR_MS, 10), 7);
        assert_eq!(fresh.remaining(NOON_MS + 2 * HOUR_MS, 10), 10);
    }

    #[test]
    fn a_pause_stops_every_claim_until_it_ends() {
        let hour = SharedHour::default().paused(NOON_MS + 30_000);
        assert_eq!(hour.claim(NOON_MS, 10, 1), Err(Duration::from_secs(30)));
        assert_eq!(hour.paused(NOON_MS + 1_000), hour, "a later pause stands");
        assert!(hour.claim(NOON_MS + 30_000, 10, 1).is_ok());
    }

    #[test]
    fn a_replica_spends_what_it_claimed_then_claims_again_and_backs_off_when_limited() {
        let minute = Duration::from_secs(60);
        let start = Instant::now();
        let mut budget = Budget::new(100, minute);
        assert_eq!(budget.chunk(), 5);
        assert_eq!(budget.take(start, NOON_MS), Take::Claim);
        budget.grant(hour_of(NOON_MS), 2);
        assert_eq!(budget.take(start, NOON_MS), Take::Granted);
        assert_eq!(budget.take(start, NOON_MS), Take::Granted);
        assert_eq!(budget.take(start, NOON_MS), Take::Claim);
        budget.grant(hour_of(NOON_MS), 1);
        assert_eq!(
            budget.take(start, NOON_MS + HOUR_MS),
            Take::Claim,
            "what was claimed last hour is gone"
        );

        assert_eq!(budget.limited(start), minute);
        assert_eq!(budget.take(start + minute / 2, NOON_MS), Take::Wait(minute / 2));
        let after = start + minute;
        assert_eq!(budget.limited(after), minute * 2, "backoff doubles");
        budget.succeeded();
        assert_eq!(budget.limited(after), minute, "and starts again after a success");
    }
}
