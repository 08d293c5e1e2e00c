//! Protections around gateways: a circuit breaker per gateway (stop calling one that keeps
//! failing, try again after a cool-down) and a token-bucket rate limit per channel (channel
//! platforms cap how often they may be called). Both take the current instant as an
//! argument, so they are plain state machines that tests drive without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum BreakerState {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is allowed through; its outcome closes or reopens the breaker.
    HalfOpen {
        trial_in_flight: bool,
    },
}

/// Opens after `threshold` consecutive failures, for `cooldown`.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Mutex<BreakerState>,
    threshold: u32,
    cooldown: Duration,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(BreakerState::Closed {
                consecutive_failures: 0,
            }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may go out now; `Err(wait)` says how long until it may.
    pub fn allow(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now < until => Err(until - now),
            BreakerState::Open { .. }
            | BreakerState::HalfOpen {
                trial_in_flight: false,
            } => {
                *state = BreakerState::HalfOpen {
                    trial_in_flight: true,
                };
                Ok(())
            }
            BreakerState::HalfOpen {
                trial_in_flight: true,
            } => Err(self.cooldown / 4),
        }
    }

    /// Whether calls are held back (open, or half open with its trial call out).
    pub fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            BreakerState::Closed { .. }
        )
    }

    pub fn record(&self, success: bool, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = match (*state, success) {
            (_, true) => BreakerState::Closed {
                consecutive_failures: 0,
            },
            (BreakerState::Closed { consecutive_failures }, false)
                if consecutive_failures + 1 < self.threshold =>
            {
                BreakerState::Closed {
                    consecutive_failures: consecutive_failures + 1,
                }
            }
            (_, false) => BreakerState::Open {
                until: now + self.cooldown,
            },
        };
    }
}

/// At most `per_second` calls a second on average, with bursts up to the same number (at
/// least one, so a rate below one a second still lets a call through now and then).
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    /// Most tokens the bucket holds.
    burst: f64,
    /// (tokens available, when they were counted)
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_second: f64, now: Instant) -> Self {
        let per_second = per_second.max(0.01);
        let burst = per_second.max(1.0);
        Self {
            per_second,
            burst,
            bucket: Mutex::new((burst, now)),
        }
    }

    /// Takes a token, or says how long until one is free.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, counted) = *bucket;
        let refilled =
            (tokens + now.saturating_duration_since(counted).as_secs_f64() * self.per_second).min(self.burst);
        if refilled >= 1.0 {
            *bucket = (refilled - 1.0, now);
            Ok(())
        } else {
            *bucket = (refilled, now);
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_recovers_through_one_trial() {
        let start = Instant::now();
        let breaker = CircuitBreaker::new(3, Duration::from_secs(30));
        for _ in 0..2 {
            assert!(breaker.allow(start).is_ok());
            breaker.record(false, start);
        }
        assert!(breaker.allow(start).is_ok(), "two failures keep it closed");
        assert!(!breaker.is_open());
        breaker.record(false, start);
        assert!(breaker.is_open());
        assert_eq!(
            breaker.allow(start + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );

        let later = start + Duration::from_secs(31);
        assert!(breaker.allow(later).is_ok(), "one trial after the cool-down");
        assert!(breaker.allow(later).is_err(), "only one");
        breaker.record(false, later);
        assert!(
            breaker.allow(later + Duration::from_secs(1)).is_err(),
            "a failed trial reopens it"
        );

        let much_later = later + Duration::from_secs(31);
        assert!(breaker.allow(much_later).is_ok());
        breaker.record(true, much_later);
        assert!(
            breaker.allow(much_later).is_ok() && breaker.allow(much_later).is_ok(),
            "closed again"
        );
        assert!(!breaker.is_open());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let now = Instant::now();
        let breaker = CircuitBreaker::new(2, Duration::from_secs(30));
        breaker.record(false, now);
        breaker.record(true, now);
        breaker.record(false, now);
        assert!(breaker.allow(now).is_ok());
    }

    #[test]
    fn a_rate_below_one_a_second_still_lets_calls_through() {
        let start = Instant::now();
        let limiter = RateLimiter::new(0.5, start);
        assert!(limiter.try_acquire(start).is_ok(), "the first call");
        let wait = limiter
            .try_acquire(start)
            .expect_err("then one every two seconds");
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-9, "{wait:?}");
        assert!(limiter.try_acquire(start + Duration::from_secs(2)).is_ok());
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_paces() {
        let start = Instant::now();
        let limiter = RateLimiter::new(2.0, start);
        assert!(limiter.try_acquire(start).is_ok());
        assert!(limiter.try_acquire(start).is_ok());
        let wait = limiter.try_acquire(start).expect_err("burst used up");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(limiter.try_acquire(start + Duration::from_millis(500)).is_ok());
        assert!(limiter.try_acquire(start + Duration::from_millis(500)).is_err());
    }
}
