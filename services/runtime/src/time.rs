//! Conversions between chrono times and protobuf timestamps.

use chrono::{DateTime, TimeZone, Utc};
use prost_types::Timestamp;

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

#[cfg(test)]
mod tests {
    use super::*;

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
