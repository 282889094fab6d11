//! How long a failed flight holds every caller off, on every instance: gRPC's connection
//! back-off (initial 1 s, multiplied by 1.6 with each consecutive failed flight, ±20 %
//! jitter), at most `lock.failure_backoff`. The count of consecutive failures travels in the
//! lease notes, so the instance that fails next continues the growth wherever the last
//! failure happened, and the first flight that stores a new record — anywhere — resets it
//! (`flight::end_flight` clears the notes). A blip then costs callers about a second; a
//! sustained outage costs the provider a few requests per growing interval, not one per
//! caller or per instance.

use std::time::Duration;

/// The back-off's shape; its maximum is `lock.failure_backoff`.
#[derive(Debug, Clone, Copy)]
pub(super) struct BackoffPolicy {
    initial: Duration,
    multiplier: f64,
    /// The share of the delay the jitter may add or take away.
    jitter: f64,
    max: Duration,
}

impl BackoffPolicy {
    /// gRPC's connection back-off, up to `max` (and never starting above it).
    pub(super) fn new(max: Duration) -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1).min(max),
            multiplier: 1.6,
            jitter: 0.2,
            max,
        }
    }

    /// The back-off after the `failures`-th consecutive failed flight (1 for the first),
    /// with `spread` (in [-1, 1]; clamped) choosing where in the jitter band it falls: the
    /// grown delay, capped at the maximum, moved by up to ±20 %, and never past the maximum.
    pub(super) fn delay(&self, failures: u32, spread: f64) -> Duration {
        // 1.6^40 is far past any maximum: the exponent needs no more.
        let exponent = failures.saturating_sub(1).min(40) as i32;
        let max = self.max.as_secs_f64();
        let grown = (self.initial.as_secs_f64() * self.multiplier.powi(exponent)).min(max);
        let jittered = grown * (1.0 + self.jitter * spread.clamp(-1.0, 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, max))
    }

    /// [`Self::delay`] with a random place in the jitter band, so instances that fail
    /// together do not come back together.
    pub(super) fn delay_jittered(&self, failures: u32) -> Duration {
        use rand::Rng;
        self.delay(failures, rand::thread_rng().gen_range(-1.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_grows_by_1_6_within_its_jitter_and_stops_at_the_maximum() {
        let policy = BackoffPolicy::new(Duration::from_secs(30));
        let secs = |failures, spread| policy.delay(failures, spread).as_secs_f64();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        // The middle of the band: 1, 1.6, 2.56, 4.096 … seconds.
        for (failures, expected) in [(1, 1.0), (2, 1.6), (3, 2.56), (4, 4.096)] {
            assert!(close(secs(failures, 0.0), expected), "{failures}");
            assert!(close(secs(failures, -1.0), expected * 0.8), "{failures}");
            assert!(close(secs(failures, 1.0), expected * 1.2), "{failures}");
        }
        // 1.6^8 = 42.9 > 30: capped, and jitter never lifts it past the maximum.
        assert!(close(secs(9, 0.0), 30.0));
        assert!(close(secs(9, 1.0), 30.0));
        assert!(close(secs(9, -1.0), 24.0));
        assert!(close(secs(u32::MAX, 0.0), 30.0));
        // Out-of-band spreads are clamped; "no failure yet" is the first delay.
        assert!(close(secs(1, 7.0), 1.2));
        assert!(close(secs(0, 0.0), 1.0));
        // A maximum under a second caps the first delay too.
        let short = BackoffPolicy::new(Duration::from_millis(500));
        assert!(close(short.delay(1, 1.0).as_secs_f64(), 0.5));
        // Random spreads stay in the band.
        for _ in 0..1000 {
            let delay = policy.delay_jittered(2).as_secs_f64();
            assert!((1.28..=1.92).contains(&delay), "{delay}");
        }
    }
}
