//! Access tokens, cached in the shared bucket and refreshed before they expire, by one
//! replica at a time: a replica that finds the token missing, expiring or refused writes
//! itself in as the refresher (compare-and-set), fetches a new one and stores it; the
//! others wait for it. A refresher that dies is replaced once its hold runs out.

use std::future::Future;
use std::time::Duration;

use crate::store::{Store, StoreError, TokenRecord, Versioned};

/// A token is refreshed this long before the platform said it expires.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// How long a refresher holds the token record: longer than a token call can take.
const REFRESH_HOLD: Duration = Duration::from_secs(15);
/// How often a replica waiting for another's refresh looks again.
const WAIT_STEP: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The platform refused to issue a token (wrong AppSecret, IP not allowed, …).
    #[error("the platform refused a token: {0}")]
    Refused(String),
    /// The platform could not be reached or was busy.
    #[error("no token now: {0}")]
    Unavailable(String),
    #[error("another replica's token refresh did not finish in time")]
    Waited,
}

/// A token as the platform issued it.
pub struct Issued {
    pub access_token: String,
    pub expires_in: Duration,
    /// A new refresh token, where the platform rotates them (Weibo).
    pub refresh_token: Option<String>,
}

/// Whether `record` holds a token usable at `now_ms` that is not `refused`.
fn usable<'r>(record: &'r TokenRecord, now_ms: i64, refused: Option<&str>) -> Option<&'r str> {
    let fresh = record.expires_ms - REFRESH_AHEAD.as_millis() as i64 > now_ms;
    (fresh && !record.access_token.is_empty() && Some(record.access_token.as_str()) != refused)
        .then_some(record.access_token.as_str())
}

/// The tenant's token under `key`: the cached one if usable (and not `refused`, the one the
/// platform just turned down), else a new one from `fetch`, fetched by one replica;
/// `fetch` is given the record as it stands (empty before the first token).
pub async fn token<F, Fut>(
    store: &Store,
    key: &str,
    refused: Option<&str>,
    fetch: F,
) -> Result<String, TokenError>
where
    F: Fn(TokenRecord) -> Fut,
    Fut: Future<Output = Result<Issued, TokenError>>,
{
    let deadline = tokio::time::Instant::now() + REFRESH_HOLD * 2;
    loop {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let current: Versioned<TokenRecord> = store.read(key).await?;
        let record = current.value.clone().unwrap_or_default();
        if let Some(token) = usable(&record, now_ms, refused) {
            return Ok(token.to_owned());
        }
        if record.refreshing_until_ms > now_ms {
            // Another replica is refreshing it.
            if tokio::time::Instant::now() >= deadline {
                return Err(TokenError::Waited);
            }
            tokio::time::sleep(WAIT_STEP).await;
            continue;
        }
        let held = TokenRecord {
            refreshing_until_ms: now_ms + REFRESH_HOLD.as_millis() as i64,
            ..record.clone()
        };
        let Some(revision) = store.write(key, &held, current.revision).await? else {
            continue;
        };
        let fetched = fetch(record.clone()).await;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let next = match &fetched {
            Ok(issued) => TokenRecord {
                access_token: issued.access_token.clone(),
                expires_ms: now_ms + issued.expires_in.as_millis() as i64,
                refreshing_until_ms: 0,
                refresh_token: issued
                    .refresh_token
                    .clone()
                    .unwrap_or_else(|| record.refresh_token.clone()),
            },
            // Let the next caller try again at once.
            Err(_) => TokenRecord {
                refreshing_until_ms: 0,
                ..record
            },
        };
        if store.write(key, &next, revision).await?.is_none() {
            tracing::warn!(%key, "the token record moved during a refresh");
        }
        return fetched.map(|issued| issued.access_token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_used_until_shortly_before_it_expires() {
        let record = TokenRecord {
            access_token: "t1".into(),
            expires_ms: 1_000_000,
            ..TokenRecord::default()
        };
        let ahead = REFRESH_AHEAD.as_millis() as i64;
        assert_eq!(usable(&record, 1_000_000 - ahead - 1, None), Some("t1"));
        assert_eq!(usable(&record, 1_000_000 - ahead, None), None);
        assert_eq!(usable(&record, 0, Some("t1")), None, "the platform refused it");
        assert_eq!(
            usable(&record, 0, Some("t0")),
            Some("t1"),
            "a newer one than refused"
        );
        let empty = TokenRecord {
            access_token: String::new(),
            ..record
        };
        assert_eq!(usable(&empty, 0, None), None);
    }
}
