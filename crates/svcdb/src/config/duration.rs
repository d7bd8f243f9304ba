//! How svcdb spells a duration setting, and the longest wait a deadline is computed for.

use std::time::Duration;

use crate::error::{Error, Result};

/// Parses `500ms`, `5s`, `2m`, `1h` or a bare number of seconds. A negative, non-finite
/// (`NaN`, `inf`) or unrepresentable (`1e30`) value is an [`Error::Config`] naming `key`,
/// never a panic. A value this accepts may still be too long for a clock: deadlines computed
/// from it go through [`capped_wait`].
pub fn parse_duration(key: &str, v: &str) -> Result<Duration> {
    let v = v.trim();
    let bad = |why: String| Error::config(key, format!("{v:?} {why}; write e.g. 500ms, 5s or 2m"));
    match v.parse::<f64>() {
        // `Duration::from_secs_f64` panics on all of these; `try_` says which it was.
        Ok(secs) if secs.is_nan() => Err(bad("is not a number of seconds".into())),
        Ok(secs) if secs < 0.0 => Err(bad("is negative".into())),
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|_| {
            bad(format!(
                "is more seconds than a duration holds (at most {})",
                u64::MAX
            ))
        }),
        Err(_) => humantime::parse_duration(v).map_err(|e| bad(format!("is not a duration ({e})"))),
    }
}

/// The longest wait svcdb computes a deadline for: 30 years, the cap tokio puts on its own
/// timers. Longer means "never" in practice, and `Instant::now() + wait` beyond what the
/// clock can represent panics.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `wait`, at most [`MAX_WAIT`]: what every deadline is computed from, so that a huge
/// configured timeout (`SVCDB_ACQUIRE_TIMEOUT=1e18`, `--lock-wait 1e19`) waits "forever"
/// instead of panicking in `Instant::now() + wait`.
pub fn capped_wait(wait: Duration) -> Duration {
    wait.min(MAX_WAIT)
}

/// `secs` seconds as a [`Duration`], saturating where `Duration::from_secs_f64` would panic:
/// zero for negative and `NaN`, [`Duration::MAX`] for too many. For values svcdb did not
/// parse itself (a `float8` read back from a table).
pub fn saturating_secs_f64(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(if secs > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

/// `d` as svcdb's messages write a duration, one format for all of them: tenths of a second
/// from a second up (`1.0s`, `2.5s`, `30.0s`), whole milliseconds below (`300ms`),
/// microseconds below a millisecond. Rust's `{:.1?}` switches unit on the exact value, so a
/// wait of 999.97 ms, a one-second acquire timeout less the time already spent, read
/// `1000.0ms` where the same wait a hair longer read `1.0s` (found by a user trial).
pub fn human_duration(d: Duration) -> impl std::fmt::Display {
    HumanDuration(d)
}

/// What [`human_duration`] returns.
struct HumanDuration(Duration);

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.as_secs_f64();
        // The unit is chosen on the rounded value: 999.97 ms is 1.0s, not 1000ms.
        if secs >= 0.9995 {
            write!(f, "{secs:.1}s")
        } else if secs >= 0.0005 {
            write!(f, "{:.0}ms", secs * 1e3)
        } else {
            write!(f, "{}µs", self.0.as_micros())
        }
    }
}

pub(super) fn parse_optional_duration(key: &str, v: &str) -> Result<Option<Duration>> {
    let d = parse_duration(key, v)?;
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn out_of_range_durations_are_config_errors_not_panics() {
        for bad in [
            "1e30",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "-1",
            "-0.5",
            "1e20",
            "18446744073709551616",
        ] {
            match parse_duration("SVCDB_ACQUIRE_TIMEOUT", bad) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "SVCDB_ACQUIRE_TIMEOUT", "{bad}"),
                other => panic!("{bad}: expected a config error, got {other:?}"),
            }
        }
        assert_eq!(
            parse_duration("k", "1e19").unwrap(),
            Duration::from_secs(10_000_000_000_000_000_000)
        );
        assert_eq!(
            parse_duration("k", "0.25").unwrap(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn saturating_secs_f64_saturates() {
        assert_eq!(saturating_secs_f64(f64::NAN), Duration::ZERO);
        assert_eq!(saturating_secs_f64(-3.0), Duration::ZERO);
        assert_eq!(saturating_secs_f64(1e300), Duration::MAX);
        assert_eq!(saturating_secs_f64(f64::INFINITY), Duration::MAX);
        assert_eq!(saturating_secs_f64(1.5), Duration::from_millis(1500));
        assert_eq!(capped_wait(Duration::MAX), MAX_WAIT);
        assert_eq!(capped_wait(Duration::from_secs(5)), Duration::from_secs(5));
        // The cap is one the clock can add: a deadline from it exists.
        assert!(std::time::Instant::now().checked_add(MAX_WAIT).is_some());
    }

    #[test]
    fn durations_in_messages_read_the_same_whatever_their_last_digits() {
        let shown = |d: Duration| human_duration(d).to_string();
        // A one-second timeout less what an attempt already spent: one format either side.
        assert_eq!(shown(Duration::from_micros(999_970)), "1.0s");
        assert_eq!(shown(Duration::from_micros(1_000_030)), "1.0s");
        assert_eq!(shown(Duration::from_secs(5)), "5.0s");
        assert_eq!(shown(Duration::from_secs(60)), "60.0s");
        assert_eq!(shown(Duration::from_millis(300)), "300ms");
        assert_eq!(shown(Duration::from_micros(999_400)), "999ms");
        assert_eq!(shown(Duration::from_micros(40)), "40µs");
        assert_eq!(shown(Duration::ZERO), "0µs");
        // The longest wait svcdb computes a deadline for is written, not a panic.
        assert!(shown(Duration::MAX).ends_with('s'));
    }

    /// Numbers as people (and fuzzers) write them: any float, in plain and exponent form.
    pub(in crate::config) fn number_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>().prop_map(|x| x.to_string()),
            any::<f64>().prop_map(|x| format!("{x:e}")),
            any::<u128>().prop_map(|x| x.to_string()),
            (
                any::<u64>(),
                prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "w", "y"])
            )
                .prop_map(|(n, unit)| format!("{n}{unit}")),
            "\\PC{0,24}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_duration_parser_never_panics(text in number_text()) {
            if let Ok(secs) = text.trim().parse::<f64>() {
                let parsed = parse_duration("k", &text);
                proptest::prop_assert_eq!(
                    parsed.is_ok(),
                    Duration::try_from_secs_f64(secs).is_ok(),
                    "{:?} -> {:?}", text, parsed
                );
            } else if let Err(e) = parse_duration("k", &text) {
                proptest::prop_assert!(matches!(&e, Error::Config { key, .. } if key == "k"), "{e:?}");
            }
        }
    }
}
