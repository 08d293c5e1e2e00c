//! Who sends each message, and what each customer has been told, kept in a JetStream
//! key-value bucket so that replying needs NATS alone: PostgreSQL may be away and every
//! complaint still gets its first reply, once.
//!
//! Every delivery has a record under its deterministic id. A sender creates it (create-only,
//! so of two senders one wins), calls the gateway, then records the outcome. Within one
//! process a delivery is reserved before it is claimed, so two tasks never race for it. A
//! record being sent names its sender (one notify process) and a deadline. Another sender may take it
//! over (compare-and-set on the record's revision) when the deadline has passed or when the
//! sender is gone: every process answers requests on its own subject while it lives, so a
//! request nobody answers ("no responders", told at once by the server) means the process
//! died, and its deliveries are taken over within the redelivery of their events, not after
//! their deadline.
//!
//! A customer's progress is the newest work-order version they were told about, so a late
//! status update for an older version is not sent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use closedloop_proto::v1::{Delivery, DeliveryState};
use closedloop_runtime::bus::StreamSettings;
use closedloop_runtime::time;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The bucket's name (its stream is `KV_CLOSEDLOOP_NOTIFY`).
pub const BUCKET: &str = "CLOSEDLOOP_NOTIFY";
/// Where each notify process answers while it lives: `<prefix>.<instance>`.
const SENDER_SUBJECT_PREFIX: &str = "closedloop.notify.senders";
/// How long a sender's silence counts as life: an overloaded process may answer late.
const ASK_SENDER_TIMEOUT: Duration = Duration::from_secs(1);
/// Compare-and-set rounds before a contended record is reported busy.
const MAX_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("key-value store: {0}")]
    Store(String),
    #[error("record of {key} does not decode: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("not an id a key can hold: {0:?}")]
    BadId(String),
}

fn store_error(error: impl std::fmt::Display) -> ClaimError {
    ClaimError::Store(error.to_string())
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A sender holds it until `until_ms`.
    Sending,
    /// Its last attempt failed; the next one may take it.
    Pending,
    Delivered,
    /// Refused for good by its gateway.
    Failed,
}

/// The record of one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub stage: Stage,
    /// The process sending it, while `Sending`.
    #[serde(default)]
    pub owner: String,
    /// Until when that sender holds it (Unix milliseconds), while `Sending`.
    #[serde(default)]
    pub until_ms: i64,
    /// Gateway calls made so far.
    pub attempts: i32,
    #[serde(default)]
    pub last_error: String,
    /// What the gateway answered when it took the delivery.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub receipt: String,
    /// When the delivery was first claimed (Unix milliseconds).
    pub created_ms: i64,
    /// When the gateway took it (Unix milliseconds).
    #[serde(default)]
    pub delivered_ms: Option<i64>,
}

/// What a claimer does about an existing record (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Finished: nothing to send.
    Done,
    /// Someone is sending it now.
    Busy,
    /// Free to take.
    TakeOver,
    /// Held by this other process: take it over if that process is gone.
    AskOwner(String),
}

impl Record {
    fn sending(owner: &str, now: DateTime<Utc>, lease: Duration, attempts: i32, created_ms: i64) -> Self {
        Self {
            stage: Stage::Sending,
            owner: owner.to_owned(),
            until_ms: (now + chrono::Duration::from_std(lease).unwrap_or_default()).timestamp_millis(),
            attempts,
            last_error: String::new(),
            receipt: String::new(),
            created_ms,
            delivered_ms: None,
        }
    }

    /// What a claimer in process `me` does about this record at `now`; with `again`, a
    /// delivery refused for good is tried again.
    pub fn step(&self, me: &str, now: DateTime<Utc>, again: bool) -> Step {
        match self.stage {
            Stage::Failed if again => Step::TakeOver,
            Stage::Delivered | Stage::Failed => Step::Done,
            Stage::Pending => Step::TakeOver,
            Stage::Sending if self.until_ms <= now.timestamp_millis() => Step::TakeOver,
            // This process, in an attempt that did not finish: the claimer holds the
            // process's reservation, so no other task here is sending it.
            Stage::Sending if self.owner == me => Step::TakeOver,
            Stage::Sending => Step::AskOwner(self.owner.clone()),
        }
    }

    /// After one more gateway call that ended in `stage`; `word` is what the gateway said:
    /// its receipt when it took the delivery, the error otherwise.
    fn after_attempt(&self, stage: Stage, word: &str, now: DateTime<Utc>) -> Self {
        let delivered = stage == Stage::Delivered;
        Self {
            stage,
            owner: String::new(),
            until_ms: 0,
            attempts: self.attempts + 1,
            last_error: if delivered { String::new() } else { word.to_owned() },
            receipt: if delivered { word.to_owned() } else { String::new() },
            created_ms: self.created_ms,
            delivered_ms: delivered.then(|| now.timestamp_millis()),
        }
    }

    /// `delivery` as this record says it stands.
    pub fn apply_to(&self, mut delivery: Delivery) -> Delivery {
        delivery.state = match self.stage {
            Stage::Delivered => DeliveryState::Delivered,
            Stage::Failed => DeliveryState::Failed,
            Stage::Sending | Stage::Pending => DeliveryState::Pending,
        } as i32;
        delivery.attempts = self.attempts;
        delivery.last_error = self.last_error.clone();
        delivery.receipt = self.receipt.clone();
        delivery.created_at = DateTime::from_timestamp_millis(self.created_ms).map(time::to_timestamp);
        delivery.delivered_at = self
            .delivered_ms
            .and_then(DateTime::from_timestamp_millis)
            .map(time::to_timestamp);
        delivery
    }

    fn encode(&self) -> Bytes {
        // A plain struct of strings and numbers always serialises.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Whether the caller may call the gateway for a delivery.
#[derive(Debug)]
pub enum Claim {
    /// Held by the caller: send, then record the attempt.
    Mine(Lease),
    /// Delivered or refused for good already.
    Done(Record),
    /// Another live sender is on it.
    Busy,
    /// It existed already and the caller only sends what it starts itself.
    NotOurs,
}

/// A delivery held by this process.
#[derive(Debug)]
pub struct Lease {
    key: String,
    revision: u64,
    record: Record,
    _reserved: Reservation,
}

/// A delivery reserved by one task of this process until dropped.
#[derive(Debug)]
struct Reservation {
    key: String,
    reserved: Arc<Mutex<HashSet<String>>>,
}

impl Reservation {
    /// Reserves `key`, unless another task here holds it.
    fn take(reserved: &Arc<Mutex<HashSet<String>>>, key: &str) -> Option<Self> {
        let mut held = reserved.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.to_owned()).then(|| Self {
            key: key.to_owned(),
            reserved: reserved.clone(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut held = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Failed; a later attempt may succeed.
    Failed,
    /// Refused for good.
    Refused,
    /// No call was made (the gateway's circuit is open, or its rate limit full).
    NotMade,
}

/// The bucket and this process's place in it. Cheap to clone.
#[derive(Clone)]
pub struct Claims {
    kv: kv::Store,
    client: async_nats::Client,
    /// This process, as records name it.
    instance: String,
    /// How long a sender holds a delivery if it never records an outcome and stays alive.
    lease: Duration,
    /// Deliveries a task of this process is claiming or sending.
    reserved: Arc<Mutex<HashSet<String>>>,
}

fn delivery_key(delivery_id: &str) -> Result<String, ClaimError> {
    let id = Uuid::parse_str(delivery_id).map_err(|_| ClaimError::BadId(delivery_id.to_owned()))?;
    Ok(format!("delivery.{}", id.simple()))
}

fn progress_key(work_order_id: &str) -> Result<String, ClaimError> {
    let id = Uuid::parse_str(work_order_id).map_err(|_| ClaimError::BadId(work_order_id.to_owned()))?;
    Ok(format!("told.{}", id.simple()))
}

impl Claims {
    /// Opens (creating or updating) the bucket, keeping records as long as the streams keep
    /// events, so any event still in a stream finds its deliveries' records.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        client: async_nats::Client,
        settings: &StreamSettings,
        lease: Duration,
    ) -> Result<Self, ClaimError> {
        let kv = closedloop_runtime::bus::open_bucket(
            jetstream,
            BUCKET,
            "notify: who sends each delivery, and what customers were told",
            settings.max_age,
            settings,
        )
        .await
        .map_err(store_error)?;
        Ok(Self {
            kv,
            client,
            instance: Uuid::new_v4().simple().to_string(),
            lease,
            reserved: Arc::default(),
        })
    }

    /// The subject this process answers on while it lives.
    pub fn liveness_subject(&self) -> String {
        format!("{SENDER_SUBJECT_PREFIX}.{}", self.instance)
    }

    /// Answers "alive" on this process's subject until `cancel` fires, so others never take
    /// over what it is sending. Resubscribes after a reconnection.
    pub async fn answer_while_alive(self, cancel: CancellationToken) {
        let subject = self.liveness_subject();
        while !cancel.is_cancelled() {
            let mut requests = match self.client.subscribe(subject.clone()).await {
                Ok(requests) => requests,
                Err(error) => {
                    tracing::warn!(%error, "cannot answer as a live sender; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = cancel.cancelled() => return,
                    }
                }
            };
            loop {
                let request = tokio::select! {
                    request = requests.next() => request,
                    _ = cancel.cancelled() => return,
                };
                let Some(request) = request else { break };
                if let Some(reply) = request.reply {
                    let _ = self.client.publish(reply, Bytes::from_static(b"alive")).await;
                }
            }
        }
    }

    /// Whether the process `owner` still lives: it answers, or is too busy to (a request
    /// that times out counts as alive).
    async fn is_alive(&self, owner: &str) -> bool {
        let request = async_nats::Request::new().timeout(Some(ASK_SENDER_TIMEOUT));
        match self
            .client
            .send_request(format!("{SENDER_SUBJECT_PREFIX}.{owner}"), request)
            .await
        {
            Ok(_) => true,
            Err(error) => error.kind() != async_nats::RequestErrorKind::NoResponders,
        }
    }

    /// Registers the delivery and holds it for the caller if it may send: a new one, one
    /// whose last attempt failed, or one whose sender is gone or past its deadline. With
    /// `only_if_new`, only a delivery this call creates; with `again`, also one refused for
    /// good before.
    pub async fn claim(
        &self,
        delivery_id: &str,
        only_if_new: bool,
        again: bool,
    ) -> Result<Claim, ClaimError> {
        let key = delivery_key(delivery_id)?;
        let Some(reservation) = Reservation::take(&self.reserved, &key) else {
            return Ok(Claim::Busy);
        };
        for _ in 0..MAX_ROUNDS {
            let now = Utc::now();
            let fresh = Record::sending(&self.instance, now, self.lease, 0, now.timestamp_millis());
            match self.kv.create(&key, fresh.encode()).await {
                Ok(revision) => {
                    return Ok(Claim::Mine(Lease {
                        key,
                        revision,
                        record: fresh,
                        _reserved: reservation,
                    }));
                }
                Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {}
                Err(error) => return Err(store_error(error)),
            }
            if only_if_new {
                return Ok(Claim::NotOurs);
            }
            let Some(entry) = self.kv.entry(&key).await.map_err(store_error)? else {
                continue; // gone since (expired): create it again
            };
            if entry.operation != Operation::Put {
                continue;
            }
            let record: Record =
                serde_json::from_slice(&entry.value).map_err(|source| ClaimError::Corrupt {
                    key: key.clone(),
                    source,
                })?;
            let step = match record.step(&self.instance, now, again) {
                Step::AskOwner(owner) if !self.is_alive(&owner).await => Step::TakeOver,
                Step::AskOwner(_) => Step::Busy,
                step => step,
            };
            match step {
                Step::Done => return Ok(Claim::Done(record)),
                Step::Busy | Step::AskOwner(_) => return Ok(Claim::Busy),
                Step::TakeOver => {
                    let taken = Record::sending(
                        &self.instance,
                        now,
                        self.lease,
                        record.attempts,
                        record.created_ms,
                    );
                    match self.kv.update(&key, taken.encode(), entry.revision).await {
                        Ok(revision) => {
                            return Ok(Claim::Mine(Lease {
                                key,
                                revision,
                                record: taken,
                                _reserved: reservation,
                            }));
                        }
                        Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => continue,
                        Err(error) => return Err(store_error(error)),
                    }
                }
            }
        }
        Ok(Claim::Busy)
    }

    /// Records how an attempt ended and lets the delivery go; returns the record as kept.
    /// `word` is the gateway's receipt for a delivery, else the error. A delivery or a
    /// refusal is the gateway's word and is written whatever happened to the record
    /// meanwhile; a failure is written only if this sender still holds it.
    pub async fn record(&self, lease: Lease, attempt: Attempt, word: &str) -> Result<Record, ClaimError> {
        let now = Utc::now();
        let record = match attempt {
            Attempt::Delivered => lease.record.after_attempt(Stage::Delivered, word, now),
            Attempt::Failed => lease.record.after_attempt(Stage::Pending, word, now),
            Attempt::Refused => lease.record.after_attempt(Stage::Failed, word, now),
            Attempt::NotMade => Record {
                stage: Stage::Pending,
                owner: String::new(),
                until_ms: 0,
                last_error: word.to_owned(),
                ..lease.record.clone()
            },
        };
        let written = match attempt {
            Attempt::Delivered | Attempt::Refused => {
                self.kv.put(&lease.key, record.encode()).await.map(|_| ())
            }
            Attempt::Failed | Attempt::NotMade => {
                match self.kv.update(&lease.key, record.encode(), lease.revision).await {
                    Ok(_) => Ok(()),
                    // Taken over meanwhile: the new sender decides.
                    Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => return Ok(record),
                    Err(error) => return Err(store_error(error)),
                }
            }
        };
        written.map_err(store_error)?;
        Ok(record)
    }

    /// The newest version of `work_order_id` the customer has been told about (0 if none).
    pub async fn told(&self, work_order_id: &str) -> Result<i64, ClaimError> {
        let key = progress_key(work_order_id)?;
        Ok(self
            .kv
            .get(&key)
            .await
            .map_err(store_error)?
            .and_then(|value| std::str::from_utf8(&value).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Records that the customer has been told about `version` of `work_order_id`; never
    /// moves backwards.
    pub async fn advance_told(&self, work_order_id: &str, version: i64) -> Result<(), ClaimError> {
        let key = progress_key(work_order_id)?;
        let value = Bytes::from(version.to_string());
        for _ in 0..MAX_ROUNDS {
            let entry = self.kv.entry(&key).await.map_err(store_error)?;
            let written = match entry {
                Some(entry) if entry.operation == Operation::Put => {
                    let told: i64 = std::str::from_utf8(&entry.value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if told >= version {
                        return Ok(());
                    }
                    match self.kv.update(&key, value.clone(), entry.revision).await {
                        Ok(_) => true,
                        Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => false,
                        Err(error) => return Err(store_error(error)),
                    }
                }
                _ => match self.kv.create(&key, value.clone()).await {
                    Ok(_) => true,
                    Err(error) if error.kind() == CreateErrorKind::AlreadyExists => false,
                    Err(error) => return Err(store_error(error)),
                },
            };
            if written {
                return Ok(());
            }
        }
        Err(ClaimError::Store(format!(
            "progress of {work_order_id} kept changing"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap_or_default()
    }

    #[test]
    fn a_record_tells_a_claimer_what_to_do() {
        let sending = Record::sending("a", at(1_000), Duration::from_secs(15), 0, 1_000);
        assert_eq!(sending.until_ms, 16_000);
        assert_eq!(
            sending.step("a", at(2_000), false),
            Step::TakeOver,
            "our own, from an attempt that did not finish"
        );
        assert_eq!(
            sending.step("b", at(2_000), false),
            Step::AskOwner("a".into()),
            "someone else's: alive?"
        );
        assert_eq!(
            sending.step("b", at(16_000), false),
            Step::TakeOver,
            "past its deadline"
        );

        let failed_once = sending.after_attempt(Stage::Pending, "HTTP 503", at(3_000));
        assert_eq!(failed_once.attempts, 1);
        assert_eq!(failed_once.step("b", at(3_001), false), Step::TakeOver);

        let delivered = failed_once.after_attempt(Stage::Delivered, "", at(4_000));
        assert_eq!(delivered.attempts, 2);
        assert_eq!(delivered.delivered_ms, Some(4_000));
        assert_eq!(delivered.created_ms, 1_000, "kept from the first claim");
        assert_eq!(delivered.step("a", at(5_000), false), Step::Done);
        assert_eq!(delivered.step("a", at(5_000), true), Step::Done, "sent is sent");
        let refused = failed_once.after_attempt(Stage::Failed, "HTTP 410", at(4_000));
        assert_eq!(refused.step("a", at(5_000), false), Step::Done);
        assert_eq!(
            refused.step("a", at(5_000), true),
            Step::TakeOver,
            "tried again when replayed"
        );
    }

    #[test]
    fn a_record_round_trips_and_applies_to_its_delivery() {
        let record = Record::sending("a", at(1_000), Duration::from_secs(1), 0, 1_000).after_attempt(
            Stage::Delivered,
            "",
            at(1_500),
        );
        let decoded: Record = serde_json::from_slice(&record.encode()).expect("decodes");
        assert_eq!(decoded, record);
        let delivery = record.apply_to(Delivery {
            delivery_id: "d".into(),
            body: "已收到".into(),
            ..Default::default()
        });
        assert_eq!(delivery.state(), DeliveryState::Delivered);
        assert_eq!(delivery.attempts, 1);
        assert_eq!(delivery.body, "已收到");
        assert!(delivery.delivered_at.is_some() && delivery.created_at.is_some());
    }

    #[test]
    fn keys_hold_only_ids() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            delivery_key(&id.to_string()).expect("a uuid"),
            format!("delivery.{}", id.simple())
        );
        assert!(matches!(delivery_key("a.b>"), Err(ClaimError::BadId(_))));
        assert!(matches!(progress_key("*"), Err(ClaimError::BadId(_))));
    }
}
