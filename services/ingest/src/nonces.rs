//! Signed WeChat and Weibo pushes already seen, in a JetStream key-value bucket shared by
//! every ingest replica: each signed (timestamp, nonce) may carry one message. Entries live for
//! twice the replay window, past which the timestamp check refuses the push anyway.

use async_nats::jetstream::kv::{self, CreateErrorKind};
use bytes::Bytes;
use closedloop_runtime::bus::StreamSettings;

use crate::signed::REPLAY_WINDOW;

/// The bucket's name (its stream is `KV_CLOSEDLOOP_INGEST`).
pub const BUCKET: &str = "CLOSEDLOOP_INGEST";

#[derive(Debug, thiserror::Error)]
#[error("the store of seen pushes is unavailable: {0}")]
pub struct NonceError(String);

/// The signed pushes seen, and the message each carried.
#[derive(Clone)]
pub struct Nonces {
    kv: kv::Store,
}

impl Nonces {
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        settings: &StreamSettings,
    ) -> Result<Self, NonceError> {
        let kv = closedloop_runtime::bus::open_bucket(
            jetstream,
            BUCKET,
            "ingest: signed WeChat pushes seen, and the message each carried",
            (REPLAY_WINDOW * 2).to_std().unwrap_or_default(),
            settings,
        )
        .await
        .map_err(|e| NonceError(e.to_string()))?;
        Ok(Self { kv })
    }

    /// Whether the push remembered under `key` may carry `message_id`: the first message
    /// under its signature does, and so do the platform's retries of that message.
    pub async fn admit(&self, key: &str, message_id: &str) -> Result<bool, NonceError> {
        let carried = Bytes::copy_from_slice(message_id.as_bytes());
        match self.kv.create(key, carried.clone()).await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                let seen = self.kv.get(key).await.map_err(|e| NonceError(e.to_string()))?;
                Ok(seen.is_some_and(|seen| seen == carried))
            }
            Err(error) => Err(NonceError(error.to_string())),
        }
    }
}
