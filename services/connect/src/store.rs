//! What the connector remembers, in a JetStream key-value bucket so that every replica
//! shares it and replies need NATS alone:
//!
//! - `delivery.<id>`: each delivery notify asked for, by its Idempotency-Key. A replica
//!   creates the record (create-only) before calling the platform, so of two calls for one
//!   delivery only one sends. A record left `sending` by a replica that died mid-call has an
//!   unknown outcome: the platform may have delivered it, and its APIs take no idempotency
//!   key, so it is not sent again but refused with that reason (an operator may replay it).
//! - `token.<platform>.<tenant>`: a platform access token and when it expires, and, while
//!   one replica refreshes it, who and until when, so that one refresh per token happens
//!   across replicas.
//! - `cursor.weibo.…` and `lease.weibo.<tenant>`: the listener's place in each feed, and
//!   which replica polls a tenant.
//! - `budget.weibo.<tenant>`: the calls claimed in the current hour and any pause
//!   ([`crate::budget::SharedHour`]).

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use closedloop_runtime::bus::StreamSettings;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The bucket's name (its stream is `KV_CLOSEDLOOP_CONNECT`).
pub const BUCKET: &str = "CLOSEDLOOP_CONNECT";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key-value store: {0}")]
    Kv(String),
    #[error("record of {key} does not decode: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("not a delivery id (a UUID): {0:?}")]
    BadId(String),
}

fn kv_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Kv(error.to_string())
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A replica is calling the platform, since `started_ms`.
    Sending,
    /// The platform said not now; the next request for it sends it.
    Pending,
    Sent,
    /// Refused for good, or its outcome is unknown; `reason` says which.
    Failed,
}

/// The record of one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub stage: Stage,
    #[serde(default)]
    pub started_ms: i64,
    /// How it went out: `custom` or `template` (WeChat).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The platform's id of the message, where it gives one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub platform_message_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl DeliveryRecord {
    fn sending(now_ms: i64) -> Self {
        Self {
            stage: Stage::Sending,
            started_ms: now_ms,
            method: String::new(),
            platform_message_id: String::new(),
            reason: String::new(),
        }
    }
}

/// What a request for a delivery may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Send it; the lease finishes the record.
    Send(Lease),
    /// It was sent, or refused for good: answer as then.
    Done(DeliveryRecord),
    /// Another call is sending it now: ask again later.
    InProgress,
}

/// The right to send one delivery: its key and the record's revision when taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    key: String,
    revision: u64,
}

/// A cached access token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    #[serde(default)]
    pub access_token: String,
    /// When the platform said it expires (Unix milliseconds).
    #[serde(default)]
    pub expires_ms: i64,
    /// A replica refreshing it holds it until then (Unix milliseconds); 0 when none.
    #[serde(default)]
    pub refreshing_until_ms: i64,
    /// What renews it, where the platform uses refresh tokens (Weibo).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refresh_token: String,
}

/// A key's value and revision, if it holds one.
pub struct Versioned<T> {
    pub value: Option<T>,
    /// The revision to update from; 0 when the key was never written or was deleted.
    pub revision: u64,
}

#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
}

impl Store {
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        settings: &StreamSettings,
    ) -> Result<Self, StoreError> {
        let kv = closedloop_runtime::bus::open_bucket(
            jetstream,
            BUCKET,
            "connect: deliveries sent to the platforms, and their access tokens",
            settings.max_age,
            settings,
        )
        .await
        .map_err(kv_error)?;
        Ok(Self { kv })
    }

    pub async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Versioned<T>, StoreError> {
        match self.kv.entry(key).await.map_err(kv_error)? {
            Some(entry) if entry.operation == Operation::Put => Ok(Versioned {
                value: Some(
                    serde_json::from_slice(&entry.value).map_err(|source| StoreError::Corrupt {
                        key: key.to_owned(),
                        source,
                    })?,
                ),
                revision: entry.revision,
            }),
            _ => Ok(Versioned {
                value: None,
                revision: 0,
            }),
        }
    }

    /// Writes `value` if the key is still at `revision` (0: never written or deleted).
    /// Returns the new revision, or `None` when someone wrote first.
    pub async fn write<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let bytes = Bytes::from(serde_json::to_vec(value).map_err(|source| StoreError::Corrupt {
            key: key.to_owned(),
            source,
        })?);
        if revision == 0 {
            match self.kv.create(key, bytes).await {
                Ok(revision) => Ok(Some(revision)),
                Err(error) if error.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(error) => Err(kv_error(error)),
            }
        } else {
            match self.kv.update(key, bytes, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(error) => Err(kv_error(error)),
            }
        }
    }

    /// Takes a delivery for sending, unless it was sent, refused, or is being sent. A record
    /// `sending` for longer than `call_timeout` was left by a call that never finished: it
    /// is marked failed with an unknown outcome and answered as such.
    pub async fn begin(
        &self,
        delivery_id: &str,
        now_ms: i64,
        call_timeout: Duration,
    ) -> Result<Begin, StoreError> {
        let key = delivery_key(delivery_id)?;
        let sending = DeliveryRecord::sending(now_ms);
        loop {
            let current: Versioned<DeliveryRecord> = self.read(&key).await?;
            let next = match &current.value {
                None => sending.clone(),
                Some(record) => match record.stage {
                    Stage::Sent | Stage::Failed => return Ok(Begin::Done(record.clone())),
                    Stage::Pending => sending.clone(),
                    Stage::Sending if now_ms - record.started_ms < call_timeout.as_millis() as i64 => {
                        return Ok(Begin::InProgress);
                    }
                    Stage::Sending => DeliveryRecord {
                        stage: Stage::Failed,
                        reason:
                            "outcome unknown: a call to the platform was cut off, so it is not sent again"
                                .into(),
                        ..record.clone()
                    },
                },
            };
            if let Some(revision) = self.write(&key, &next, current.revision).await? {
                return Ok(match next.stage {
                    Stage::Sending => Begin::Send(Lease { key, revision }),
                    _ => Begin::Done(next),
                });
            }
            // Another request wrote first: look again.
        }
    }

    /// Records how a send ended. If the record moved meanwhile (it cannot while the lease
    /// is held, short of a call outliving its timeout), the outcome is kept anyway.
    pub async fn finish(&self, lease: Lease, record: &DeliveryRecord) -> Result<(), StoreError> {
        if self.write(&lease.key, record, lease.revision).await?.is_none() {
            tracing::warn!(key = %lease.key, "a delivery's record moved while it was sent");
            let current: Versioned<DeliveryRecord> = self.read(&lease.key).await?;
            self.write(&lease.key, record, current.revision).await?;
        }
        Ok(())
    }
}

/// Delivery ids are UUIDs: the key holds its simple form, which any key may.
pub fn delivery_key(delivery_id: &str) -> Result<String, StoreError> {
    let id = uuid::Uuid::parse_str(delivery_id).map_err(|_| StoreError::BadId(delivery_id.to_owned()))?;
    Ok(format!("delivery.{}", id.simple()))
}

/// The key of a tenant's token on a platform (tenant names are key-safe).
pub fn token_key(platform: &str, tenant: &str) -> String {
    format!("token.{platform}.{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe() {
        let id = uuid::Uuid::new_v4().to_string();
        assert_eq!(
            delivery_key(&id).ok(),
            Some(format!("delivery.{}", id.replace('-', "")))
        );
        assert!(matches!(delivery_key("a.b>"), Err(StoreError::BadId(_))));
        assert_eq!(token_key("wechat", "acme"), "token.wechat.acme");
    }
}
