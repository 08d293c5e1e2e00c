//! The Weibo listener: for each tenant, follows the brand's mentions, the comments on its
//! posts and a search for its keywords, and submits what it finds to ingest as the tenant's
//! gateway. Each feed has a cursor (the newest id taken) in the shared bucket, moved only
//! past what ingest has stored, so a crash loses nothing (ingest drops what it already has).
//! One replica polls a tenant at a time (a lease in the bucket). Search hits never
//! addressed the brand, so they go through classify first and noise is dropped, counted.

use std::time::Duration;

use closedloop_proto::v1::classify_service_client::ClassifyServiceClient;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::{ClassifyRequest, ComplaintSubmission, Intent, SubmitComplaintRequest};
use closedloop_runtime::auth::authed;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::store::{Store, Versioned};
use crate::weibo::{self, CallError, Keywords};

/// Most pages read from one feed in one round: more waits for the next round.
const MAX_PAGES: u32 = 5;

/// The API tokens connect submits with, by tenant (a token with the gateway and viewer
/// roles: ingest for submitting, classify for search hits).
#[derive(Clone, Debug, Default)]
pub struct ApiTokens(std::collections::HashMap<String, String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("API token entry {0:?} is not `tenant=token`")]
pub struct MalformedToken(String);

impl std::str::FromStr for ApiTokens {
    type Err = MalformedToken;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, MalformedToken, |tenant, token| match token {
            "" => Err(MalformedToken(tenant.to_owned())),
            token => Ok(token.to_owned()),
        })
        .map(Self)
    }
}

/// A feed of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed<'k> {
    Mentions,
    Comments,
    Search(&'k str),
}

impl Feed<'_> {
    fn name(&self) -> &'static str {
        match self {
            Feed::Mentions => "mentions",
            Feed::Comments => "comments",
            Feed::Search(_) => "search",
        }
    }

    fn cursor_key(&self, tenant: &str) -> String {
        match self {
            // Keys allow few characters: the keyword goes in as hex.
            Feed::Search(keyword) => format!(
                "cursor.weibo.{tenant}.search.{}",
                keyword.bytes().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            other => format!("cursor.weibo.{tenant}.{}", other.name()),
        }
    }
}

/// Who polls a tenant, until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    owner: String,
    until_ms: i64,
}

pub struct Listener {
    pub weibo: weibo::Client,
    pub keywords: Keywords,
    pub store: Store,
    pub ingest: IngestServiceClient<Channel>,
    pub classify: ClassifyServiceClient<Channel>,
    pub tokens: ApiTokens,
    pub every: Duration,
    /// This process, for the lease.
    pub instance: String,
}

/// Something found, ready to submit.
struct Found {
    id: u64,
    submission: ComplaintSubmission,
    /// Posted by the brand itself.
    own: bool,
}

impl Listener {
    /// Polls every tenant each `every` until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            let tenants: Vec<String> = self.weibo.accounts.tenants().map(str::to_owned).collect();
            for tenant in tenants {
                self.poll(&tenant).await;
            }
        }
    }

    /// One round for a tenant, if this replica holds its lease.
    pub async fn poll(&self, tenant: &str) {
        match self.lease(tenant).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%tenant, %error, "cannot take the Weibo polling lease");
                return;
            }
        }
        let keywords = self.keywords.of(tenant);
        let feeds = [Feed::Mentions, Feed::Comments]
            .into_iter()
            .chain(keywords.iter().map(|k| Feed::Search(k)));
        for feed in feeds {
            if let Err(error) = self.follow(tenant, feed).await {
                tracing::warn!(%tenant, feed = feed.name(), %error, "Weibo feed not followed this round");
            }
        }
    }

    /// Takes or renews the tenant's polling lease; false when another live replica has it.
    async fn lease(&self, tenant: &str) -> Result<bool, crate::store::StoreError> {
        let key = format!("lease.weibo.{tenant}");
        let now_ms = chrono::Utc::now().timestamp_millis();
        let current: Versioned<Lease> = self.store.read(&key).await?;
        if let Some(lease) = &current.value
            && lease.owner != self.instance
            && lease.until_ms > now_ms
        {
            return Ok(false);
        }
        let lease = Lease {
            owner: self.instance.clone(),
            until_ms: now_ms + (self.every * 3).as_millis() as i64,
        };
        Ok(self.store.write(&key, &lease, current.revision).await?.is_some())
    }

    /// Reads what is new in `feed` and submits it, moving the cursor past what is stored.
    async fn follow(&self, tenant: &str, feed: Feed<'_>) -> Result<(), ListenError> {
        let key = feed.cursor_key(tenant);
        let cursor: Versioned<u64> = self.store.read(&key).await?;
        let since = cursor.value.unwrap_or(0);
        let mut found = self.fetch(tenant, feed, since).await?;
        found.sort_by_key(|f| f.id);
        found.dedup_by_key(|f| f.id);
        let mut taken = since;
        for item in found {
            let outcome = self.take(tenant, feed, &item).await;
            match outcome {
                Ok(outcome) => crate::metrics::found("weibo", tenant, feed.name(), outcome),
                Err(error) => {
                    // Stop here; the rest waits for the next round, from this item on.
                    self.save(&key, taken, cursor.revision).await?;
                    return Err(error);
                }
            }
            taken = item.id;
        }
        self.save(&key, taken, cursor.revision).await
    }

    async fn save(&self, key: &str, taken: u64, revision: u64) -> Result<(), ListenError> {
        if taken > 0 && self.store.write(key, &taken, revision).await?.is_none() {
            tracing::warn!(%key, "another replica moved the Weibo cursor");
        }
        Ok(())
    }

    /// What is newer than `since` in `feed`, a page at a time, newest first.
    async fn fetch(&self, tenant: &str, feed: Feed<'_>, since: u64) -> Result<Vec<Found>, ListenError> {
        let account = self
            .weibo
            .accounts
            .get(tenant)
            .map(|a| a.uid.clone())
            .unwrap_or_default();
        let mut found = Vec::new();
        for page in 1..=MAX_PAGES {
            let batch: Vec<(String, ComplaintSubmission)> = match feed {
                Feed::Mentions => self
                    .weibo
                    .mentions(tenant, since, page)
                    .await?
                    .iter()
                    .map(|s| (s.id(), weibo::post_submission(s)))
                    .collect(),
                Feed::Comments => self
                    .weibo
                    .comments(tenant, since, page)
                    .await?
                    .iter()
                    .map(|c| (c.written.id(), weibo::comment_submission(c)))
                    .collect(),
                Feed::Search(keyword) => self
                    .weibo
                    .search(tenant, keyword, page)
                    .await?
                    .iter()
                    .map(|s| (s.id(), weibo::post_submission(s)))
                    .collect(),
            };
            let full = batch.len() as u32 >= weibo::PAGE_SIZE;
            let mut older_seen = false;
            for (id, submission) in batch {
                let id = weibo::id_number(&id);
                if id <= since {
                    older_seen = true;
                    continue;
                }
                let own = submission.poster.as_ref().is_some_and(|p| p.poster_id == account);
                found.push(Found { id, submission, own });
            }
            if !full || older_seen {
                break;
            }
        }
        Ok(found)
    }

    /// Submits one item (or drops it); the outcome for the metric.
    async fn take(&self, tenant: &str, feed: Feed<'_>, item: &Found) -> Result<&'static str, ListenError> {
        if item.own {
            return Ok("own");
        }
        let token = self
            .tokens
            .0
            .get(tenant)
            .ok_or_else(|| ListenError::NoToken(tenant.to_owned()))?;
        if matches!(feed, Feed::Search(_)) {
            let request = ClassifyRequest {
                text: item.submission.text.clone(),
                channel: item.submission.channel,
                poster: item.submission.poster.clone(),
                ..Default::default()
            };
            let verdict = self
                .classify
                .clone()
                .classify(authed(token, request))
                .await
                .map_err(ListenError::Classify)?
                .into_inner();
            if verdict
                .classification
                .is_some_and(|c| c.intent() == Intent::Noise)
            {
                return Ok("noise");
            }
        }
        let request = SubmitComplaintRequest {
            complaint: Some(item.submission.clone()),
        };
        match self.ingest.clone().submit_complaint(authed(token, request)).await {
            Ok(answer) if answer.get_ref().duplicate => Ok("duplicate"),
            Ok(_) => Ok("submitted"),
            // Retrying cannot fix it: say so and go on with the rest.
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::warn!(%tenant, id = item.id, %status, "ingest refused a Weibo item");
                Ok("rejected")
            }
            Err(status) => Err(ListenError::Ingest(status)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("Weibo: {0}")]
    Weibo(#[from] CallError),
    #[error("no API token for tenant {0} (CLOSEDLOOP_CONNECT_API_TOKENS)")]
    NoToken(String),
    #[error("classify: {0}")]
    Classify(tonic::Status),
    #[error("ingest: {0}")]
    Ingest(tonic::Status),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_keys_are_safe_for_any_keyword() {
        let key = Feed::Search("宽带 断网.>*").cursor_key("acme");
        assert!(
            key.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
            "{key}"
        );
        assert_ne!(key, Feed::Search("宽带").cursor_key("acme"));
        assert_eq!(Feed::Mentions.cursor_key("acme"), "cursor.weibo.acme.mentions");
    }

    #[test]
    fn api_tokens_parse() {
        let tokens: ApiTokens = "acme=t1; beta=t2".parse().expect("valid");
        assert_eq!(tokens.0.get("beta").map(String::as_str), Some("t2"));
        assert!("acme".parse::<ApiTokens>().is_err());
        assert!("acme=".parse::<ApiTokens>().is_err());
    }
}
