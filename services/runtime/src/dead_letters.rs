//! Working with the dead-letter stream: listing what is parked there grouped by consumer and
//! reason, showing one event decoded, and replaying events to the subject they came from.
//! `closedloop-admin dead-letters` is the command line over these.
//!
//! A replay publishes the event again with its original headers (so trace context and
//! CloudEvents attributes carry over), marked with [`REPLAYED_FROM`], under a message id
//! derived from its place in the dead-letter stream, then removes it from that stream. A
//! replay cut short between the two is repeated harmlessly: the stream drops the second
//! publish inside its duplicate window, and every consumer is idempotent beyond it. Every
//! consumer of the original subject sees the replayed event; those that handled it before
//! find their work done.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use closedloop_proto::v1 as pb;
use prost::Message as _;

use crate::bus::{DEAD_LETTER_STREAM, dead_letter_headers as h};

/// Header on a replayed event: the dead-letter stream sequence it was replayed from.
pub const REPLAYED_FROM: &str = "Closedloop-Replayed-From";

/// Whether `headers` mark an event replayed from the dead-letter stream: an operator asked
/// for it to be tried again, so even what was refused for good may be retried.
pub fn is_replay(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|headers| headers.get(REPLAYED_FROM).is_some())
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("the dead-letter stream is not available: {0}")]
    Stream(String),
    #[error("no dead letter at sequence {0}")]
    NotFound(u64),
    #[error("replaying dead letter {sequence}: {reason}")]
    Replay { sequence: u64, reason: String },
}

/// One parked event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    pub consumer: String,
    pub reason: String,
    /// The subject it was published on, and its sequence in that stream.
    pub subject: String,
    pub original_sequence: String,
    /// Deliveries to the consumer before it was parked.
    pub deliveries: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl DeadLetter {
    fn from_raw(message: jetstream::message::StreamMessage) -> Self {
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        Self {
            sequence: message.sequence,
            consumer: header(h::CONSUMER),
            reason: header(h::REASON),
            subject: header(h::SUBJECT),
            original_sequence: header(h::STREAM_SEQUENCE),
            deliveries: header(h::DELIVERIES),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        }
    }

    /// The payload decoded as the event its subject carries, for a person to read.
    pub fn decoded(&self) -> String {
        let entity_event: Vec<&str> = self.subject.splitn(4, '.').skip(1).take(2).collect();
        let payload = self.payload.as_ref();
        let decoded = match entity_event.as_slice() {
            ["complaint", "received"] => pb::ComplaintReceived::decode(payload).map(|m| format!("{m:#?}")),
            ["complaint", "classified"] => {
                pb::ComplaintClassified::decode(payload).map(|m| format!("{m:#?}"))
            }
            ["workorder", _] => pb::WorkOrderEvent::decode(payload).map(|m| format!("{m:#?}")),
            ["notification", "delivered"] => {
                pb::NotificationDelivered::decode(payload).map(|m| format!("{m:#?}"))
            }
            ["notification", "failed"] => pb::NotificationFailed::decode(payload).map(|m| format!("{m:#?}")),
            ["feedback", "received"] => pb::FeedbackReceived::decode(payload).map(|m| format!("{m:#?}")),
            ["incident", "opened"] => pb::IncidentOpened::decode(payload).map(|m| format!("{m:#?}")),
            _ => return format!("{} bytes of an event this tool does not know", payload.len()),
        };
        decoded.unwrap_or_else(|error| format!("{} bytes that do not decode: {error}", payload.len()))
    }
}

/// Which dead letters a command acts on: all of them, or those matching every given filter.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub all: bool,
    /// Dead-letter stream sequences.
    pub sequences: Vec<u64>,
    pub consumer: Option<String>,
    /// A part of the reason.
    pub reason: Option<String>,
}

impl Selection {
    /// Whether it names anything at all (a replay of nothing named is refused).
    pub fn is_empty(&self) -> bool {
        !self.all && self.sequences.is_empty() && self.consumer.is_none() && self.reason.is_none()
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        (self.sequences.is_empty() || self.sequences.contains(&letter.sequence))
            && self.consumer.as_ref().is_none_or(|c| *c == letter.consumer)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| letter.reason.contains(r.as_str()))
    }
}

/// Dead letters of one consumer with one reason, ids in the reason left out (so that, say,
/// every delivery a gateway refused with the same status counts as one reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub consumer: String,
    pub reason: String,
    pub sequences: Vec<u64>,
}

/// `reason` with every UUID replaced by `<id>`.
fn without_ids(reason: &str) -> String {
    reason
        .split(' ')
        .map(|word| {
            let trimmed = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            if uuid::Uuid::parse_str(trimmed).is_ok() {
                word.replace(trimmed, "<id>")
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `letters` grouped by consumer and reason, largest group first.
pub fn group(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for letter in letters {
        groups
            .entry((letter.consumer.clone(), without_ids(&letter.reason)))
            .or_default()
            .push(letter.sequence);
    }
    let mut groups: Vec<Group> = groups
        .into_iter()
        .map(|((consumer, reason), sequences)| Group {
            consumer,
            reason,
            sequences,
        })
        .collect();
    groups.sort_by_key(|group| std::cmp::Reverse(group.sequences.len()));
    groups
}

/// The dead-letter stream, read and replayed through one JetStream context.
pub struct DeadLetters {
    jetstream: jetstream::Context,
}

impl DeadLetters {
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self { jetstream }
    }

    async fn stream(&self) -> Result<jetstream::stream::Stream, DeadLetterError> {
        self.jetstream
            .get_stream(DEAD_LETTER_STREAM)
            .await
            .map_err(|e| DeadLetterError::Stream(e.to_string()))
    }

    /// Every dead letter `selection` matches, oldest first.
    pub async fn list(&self, selection: &Selection) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let mut stream = self.stream().await?;
        let state = stream
            .info()
            .await
            .map_err(|e| DeadLetterError::Stream(e.to_string()))?
            .state
            .clone();
        let mut letters = Vec::new();
        if state.messages == 0 {
            return Ok(letters);
        }
        for sequence in state.first_sequence..=state.last_sequence {
            if !selection.sequences.is_empty() && !selection.sequences.contains(&sequence) {
                continue;
            }
            // Gaps are letters already replayed (deleted).
            let Ok(raw) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let letter = DeadLetter::from_raw(raw);
            if selection.matches(&letter) {
                letters.push(letter);
            }
        }
        Ok(letters)
    }

    /// The last event `consumer` parked, if any.
    pub async fn last_of(&self, consumer: &str) -> Option<DeadLetter> {
        let stream = self.stream().await.ok()?;
        stream
            .get_last_raw_message_by_subject(&format!("closedloop.deadletter.{consumer}"))
            .await
            .ok()
            .map(DeadLetter::from_raw)
    }

    /// One dead letter.
    pub async fn get(&self, sequence: u64) -> Result<DeadLetter, DeadLetterError> {
        let stream = self.stream().await?;
        let raw = stream
            .get_raw_message(sequence)
            .await
            .map_err(|_| DeadLetterError::NotFound(sequence))?;
        Ok(DeadLetter::from_raw(raw))
    }

    /// Publishes `letter` to its original subject and removes it from the dead-letter stream.
    pub async fn replay(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let failed = |reason: String| DeadLetterError::Replay {
            sequence: letter.sequence,
            reason,
        };
        if letter.subject.is_empty() {
            return Err(failed("it does not say where it came from".into()));
        }
        let mut headers = HeaderMap::new();
        for (name, values) in letter.headers.iter() {
            let name: &str = name.as_ref();
            let parked = [
                h::REASON,
                h::SUBJECT,
                h::STREAM_SEQUENCE,
                h::CONSUMER,
                h::DELIVERIES,
                "Nats-Msg-Id",
            ];
            if parked.iter().any(|p| p.eq_ignore_ascii_case(name)) {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
        headers.insert("Nats-Msg-Id", format!("replay-{}", letter.sequence).as_str());
        headers.insert(REPLAYED_FROM, letter.sequence.to_string().as_str());
        let ack = self
            .jetstream
            .send_publish(
                letter.subject.clone(),
                PublishMessage::build()
                    .payload(letter.payload.clone())
                    .headers(headers),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        ack.await.map_err(|e| failed(e.to_string()))?;
        self.stream()
            .await?
            .delete_message(letter.sequence)
            .await
            .map_err(|e| failed(format!("published, but not removed: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(sequence: u64, consumer: &str, reason: &str) -> DeadLetter {
        DeadLetter {
            sequence,
            consumer: consumer.into(),
            reason: reason.into(),
            subject: "closedloop.complaint.classified.acme".into(),
            original_sequence: "7".into(),
            deliveries: "1".into(),
            headers: HeaderMap::new(),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn letters_group_by_consumer_and_reason_without_ids() {
        let letters = [
            letter(
                1,
                "notify-classified",
                "delivery 0b7e7c36-63c0-5c2f-9b3e-1f3b5d7a9c11 refused: HTTP 410",
            ),
            letter(2, "classify", "undecodable payload"),
            letter(
                3,
                "notify-classified",
                "delivery 9f0e5a3c-2b1d-5e4f-8a7b-6c5d4e3f2a10 refused: HTTP 410",
            ),
        ];
        assert_eq!(
            group(&letters),
            [
                Group {
                    consumer: "notify-classified".into(),
                    reason: "delivery <id> refused: HTTP 410".into(),
                    sequences: vec![1, 3],
                },
                Group {
                    consumer: "classify".into(),
                    reason: "undecodable payload".into(),
                    sequences: vec![2],
                },
            ]
        );
    }

    #[test]
    fn a_selection_matches_every_filter_it_names() {
        let refused = letter(5, "notify-classified", "refused: HTTP 410");
        assert!(
            Selection {
                all: true,
                ..Default::default()
            }
            .matches(&refused)
        );
        assert!(Selection::default().is_empty());
        let by_consumer = Selection {
            consumer: Some("notify-classified".into()),
            ..Default::default()
        };
        assert!(by_consumer.matches(&refused));
        let both = Selection {
            consumer: Some("notify-classified".into()),
            reason: Some("HTTP 500".into()),
            ..Default::default()
        };
        assert!(!both.matches(&refused), "every filter must match");
        let by_sequence = Selection {
            sequences: vec![4, 6],
            ..Default::default()
        };
        assert!(!by_sequence.matches(&refused));
    }

    #[test]
    fn a_payload_is_decoded_as_its_subject_says() {
        let mut classified = letter(1, "dispatch-classified", "");
        classified.payload = Bytes::from(
            pb::ComplaintClassified {
                complaint: Some(pb::Complaint {
                    complaint_id: "c-42".into(),
                    ..Default::default()
                }),
                classification: None,
            }
            .encode_to_vec(),
        );
        let shown = classified.decoded();
        assert!(
            shown.contains("ComplaintClassified") && shown.contains("c-42"),
            "{shown}"
        );
        classified.payload = Bytes::from_static(b"\xff\xff\xff");
        assert!(classified.decoded().contains("do not decode"));
    }
}
