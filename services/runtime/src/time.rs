//! Conversions between chrono times and protobuf timestamps, and durations as people write
//! them in settings.

use chrono::{DateTime, Duration, TimeZone, Utc};
use prost_types::Timestamp;

/// A duration that is not written like 90s, 15m, 4h or 3d.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 90s, 15m, 4h or 3d")]
pub struct BadDuration(pub String);

/// Parses "90s", "15m", "4h", "3d": a positive whole number and one unit.
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let text = text.trim();
    let bad = || BadDuration(text.to_owned());
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = text.split_at_checked(split).ok_or_else(bad)?;
    let number: i64 = number.parse().map_err(|_| bad())?;
    if number <= 0 {
        return Err(bad());
    }
    match unit {
        "s" => Duration::try_seconds(number),
        "m" => Duration::try_minutes(number),
        "h" => Duration::try_hours(number),
        "d" => Duration::try_days(number),
        _ => None,
    }
    .ok_or_else(bad)
}

pub fn to_timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// `None` for a timestamp outside chrono's range or with invalid nanos.
pub fn from_timestamp(ts: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    Utc.timestamp_opt(ts.seconds, nanos).single()
}

/// A time as Weibo writes it, in its API and its pushes: `Mon Jul 16 18:09:20 +0800 2012`.
pub fn from_weibo(created_at: &str) -> Option<Timestamp> {
    let at = DateTime::parse_from_str(created_at, "%a %b %d %H:%M:%S %z %Y").ok()?;
    Some(to_timestamp(at.with_timezone(&Utc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weibo_times_parse_with_their_offset() {
        let at = from_weibo("Mon Jul 16 18:09:20 +0800 2012").expect("a Weibo time");
        assert_eq!(at.seconds, 1_342_433_360, "10:09:20 UTC");
        assert_eq!(from_weibo("2012-07-16 18:09:20"), None);
    }

    #[test]
    fn durations_parse_or_say_why_not() {
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration(" 4h "), Ok(Duration::hours(4)));
        assert_eq!(parse_duration("3d"), Ok(Duration::days(3)));
        for bad in [
            "",
            "s",
            "0m",
            "-5m",
            "5",
            "5w",
            "1.5h",
            "9999999999999999d",
            "五m",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(BadDuration(bad.trim().to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn round_trip_keeps_nanoseconds() {
        let at = Utc.timestamp_opt(1_700_000_000, 123_456_789).single();
        let at = at.expect("valid time");
        assert_eq!(from_timestamp(&to_timestamp(at)), Some(at));
        assert_eq!(
            from_timestamp(&Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }
}
