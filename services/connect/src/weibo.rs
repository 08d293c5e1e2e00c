//! Weibo: the brand account's mentions and the comments on its posts, a keyword search for
//! posts that never addressed it, and replies as comments or private messages, through the
//! Weibo open API v2 with the account's OAuth2 access token.
//!
//! Weibo answers errors as JSON `{"error", "error_code", "request"}` (with a 4xx status);
//! what each code means for a call is [`verdict`]. Calls are paced by a budget per tenant
//! shared by the replicas ([`crate::budget`]), and pause, with growing backoff, when Weibo
//! says the rate limit is reached.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster};
use closedloop_runtime::time::from_weibo;
use closedloop_runtime::webhook::WebhookMessage;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::budget::{Budget, SharedHour, Take};
use crate::sent::{SendError, Sent, cut};
use crate::store::Versioned;

/// One tenant's Weibo account.
#[derive(Clone)]
pub struct WeiboAccount {
    /// The brand account's uid: its own posts and comments are not contacts.
    pub uid: String,
    pub access_token: String,
    /// Where the app may renew the token (OAuth2 `refresh_token` grant): the refresh token,
    /// the app key and the app secret.
    pub refresh: Option<(String, String, String)>,
}

impl std::fmt::Debug for WeiboAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeiboAccount")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

/// Each tenant's Weibo account.
#[derive(Clone, Debug, Default)]
pub struct WeiboAccounts(HashMap<String, WeiboAccount>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Weibo account entry {0:?} is not `tenant=uid|access_token[|refresh_token|app_key|app_secret]`")]
pub struct MalformedAccount(String);

impl FromStr for WeiboAccounts {
    type Err = MalformedAccount;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, MalformedAccount, |tenant, value| {
            let malformed = || MalformedAccount(tenant.to_owned());
            let fields: Vec<&str> = value.split('|').map(str::trim).collect();
            if fields.iter().any(|f| f.is_empty()) {
                return Err(malformed());
            }
            match fields[..] {
                [uid, token] => Ok(WeiboAccount {
                    uid: uid.to_owned(),
                    access_token: token.to_owned(),
                    refresh: None,
                }),
                [uid, token, refresh, key, secret] => Ok(WeiboAccount {
                    uid: uid.to_owned(),
                    access_token: token.to_owned(),
                    refresh: Some((refresh.to_owned(), key.to_owned(), secret.to_owned())),
                }),
                _ => Err(malformed()),
            }
        })
        .map(Self)
    }
}

impl WeiboAccounts {
    pub fn get(&self, tenant: &str) -> Option<&WeiboAccount> {
        self.0.get(tenant)
    }
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Search keywords by tenant: `acme=宽带,光猫;beta=…`.
#[derive(Clone, Debug, Default)]
pub struct Keywords(HashMap<String, Vec<String>>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Weibo keyword entry {0:?} is not `tenant=keyword,keyword`")]
pub struct MalformedKeywords(String);

impl FromStr for Keywords {
    type Err = MalformedKeywords;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, MalformedKeywords, |_, words| {
            Ok(words
                .split([',', '，'])
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect())
        })
        .map(Self)
    }
}

impl Keywords {
    pub fn of(&self, tenant: &str) -> &[String] {
        self.0.get(tenant).map(Vec::as_slice).unwrap_or_default()
    }
}

/// What an error code means for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The rate limit of the IP, the user or the API is reached (10022, 10023, 10024).
    RateLimited,
    /// The token expired or was revoked (21314–21319, 21327, 21332, 21501).
    TokenInvalid,
    /// A passing system error (10001 system error, 10009 too many pending tasks).
    Busy,
    /// Anything else: this call cannot succeed (a deleted post, 20019 repeated content, …).
    Refused(String),
}

pub fn verdict(error_code: i64, error: &str) -> Verdict {
    match error_code {
        10022..=10024 => Verdict::RateLimited,
        21314..=21319 | 21327 | 21332 | 21501 => Verdict::TokenInvalid,
        10001 | 10009 => Verdict::Busy,
        _ => Verdict::Refused(format!("Weibo error_code {error_code}: {error}")),
    }
}

/// Weibo's error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: i64,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    #[serde(default)]
    pub idstr: String,
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub screen_name: String,
    #[serde(default)]
    pub followers_count: i64,
    #[serde(default)]
    pub verified: bool,
}

impl User {
    pub fn uid(&self) -> String {
        id_text(&self.idstr, self.id.as_ref())
    }
}

/// A post.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub idstr: String,
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub created_at: String,
    pub user: Option<User>,
}

/// A comment: written like a post (its id, text, time and author), with the post it is on.
#[derive(Debug, Clone, Deserialize)]
pub struct Comment {
    #[serde(flatten)]
    pub written: Status,
    pub status: Option<Status>,
}

/// `idstr` if given, else `id` as text (Weibo gives both; ids exceed what a double holds
/// exactly, so the string is preferred).
fn id_text(idstr: &str, id: Option<&serde_json::Value>) -> String {
    if !idstr.is_empty() {
        return idstr.to_owned();
    }
    match id {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

impl Status {
    pub fn id(&self) -> String {
        id_text(&self.idstr, self.id.as_ref())
    }
}

/// An id as a number, for ordering and cursors (0 if it is not one).
pub fn id_number(id: &str) -> u64 {
    id.parse().unwrap_or(0)
}

/// The thread of a customer's contact about one post: their follow-ups on it join the
/// same work order, and a reply to one of their comments needs the post's id from it.
pub fn thread_id(status_id: &str, uid: &str) -> String {
    format!("weibo:{status_id}:{uid}")
}

/// The post id of a [`thread_id`].
pub fn thread_status(thread_id: &str) -> Option<&str> {
    let mut parts = thread_id.split(':');
    (parts.next() == Some("weibo"))
        .then(|| parts.next())
        .flatten()
        .filter(|id| !id.is_empty())
}

fn poster(user: Option<&User>) -> Poster {
    user.map(|u| Poster {
        poster_id: u.uid(),
        display_name: u.screen_name.clone(),
        followers: u.followers_count,
        verified: u.verified,
    })
    .unwrap_or_default()
}

/// A post (a mention, or found by search) as a submission.
pub fn post_submission(status: &Status) -> ComplaintSubmission {
    let poster = poster(status.user.as_ref());
    ComplaintSubmission {
        channel: Channel::WeiboPost as i32,
        channel_message_id: status.id(),
        thread_id: thread_id(&status.id(), &poster.poster_id),
        poster: Some(poster),
        text: status.text.clone(),
        posted_at: from_weibo(&status.created_at),
        ..Default::default()
    }
}

/// A comment on one of the brand's posts as a submission.
pub fn comment_submission(comment: &Comment) -> ComplaintSubmission {
    let poster = poster(comment.written.user.as_ref());
    let status_id = comment.status.as_ref().map(Status::id).unwrap_or_default();
    ComplaintSubmission {
        channel: Channel::WeiboComment as i32,
        channel_message_id: comment.written.id(),
        thread_id: thread_id(&status_id, &poster.poster_id),
        in_reply_to: status_id,
        poster: Some(poster),
        text: comment.written.text.clone(),
        posted_at: from_weibo(&comment.written.created_at),
        ..Default::default()
    }
}

/// Longest comment, in characters.
pub const COMMENT_CHARS: usize = 140;
/// Longest private message, in characters.
pub const PRIVATE_MESSAGE_CHARS: usize = 300;

/// The bucket key of a tenant's shared hour.
fn budget_key(tenant: &str) -> String {
    format!("budget.weibo.{tenant}")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where the Weibo APIs are.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The open API and OAuth2 (`https://api.weibo.com`).
    pub api: String,
    /// The commercial search API (`https://c.api.weibo.com`).
    pub search: String,
    /// The fan-service private-message API (`https://m.api.weibo.com`).
    pub messages: String,
}

/// Why a call gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("not now: {1}")]
    Later(Duration, String),
    #[error("{0}")]
    Refused(String),
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl From<CallError> for SendError {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Later(wait, why) => SendError::Later(wait, why),
            CallError::Refused(why) => SendError::Refused(why),
            CallError::Unknown(why) => SendError::Unknown(why),
        }
    }
}

/// The Weibo API for the tenants in `accounts`.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub endpoints: Endpoints,
    pub accounts: WeiboAccounts,
    pub store: crate::store::Store,
    budgets: Arc<Mutex<HashMap<String, Budget>>>,
    /// One claim on the shared budget at a time from this replica: the calls one claims
    /// serve the tasks that waited for it.
    claiming: Arc<tokio::sync::Mutex<()>>,
    per_hour: u32,
    first_backoff: Duration,
}

/// Tries at claiming calls when other replicas claim at the same moment.
const CLAIM_ATTEMPTS: usize = 10;

/// A mentions or comments page, or search results.
#[derive(Debug, Default, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub statuses: Vec<Status>,
    #[serde(default)]
    pub comments: Vec<Comment>,
}

impl Client {
    pub fn new(
        http: reqwest::Client,
        endpoints: Endpoints,
        accounts: WeiboAccounts,
        store: crate::store::Store,
        per_hour: u32,
        first_backoff: Duration,
    ) -> Self {
        let budgets = accounts
            .tenants()
            .map(|tenant| {
                crate::metrics::budget("weibo", tenant, per_hour);
                (tenant.to_owned(), Budget::new(per_hour, first_backoff))
            })
            .collect();
        Self {
            http,
            endpoints,
            accounts,
            store,
            budgets: Arc::new(Mutex::new(budgets)),
            claiming: Arc::default(),
            per_hour,
            first_backoff,
        }
    }

    fn account(&self, tenant: &str) -> Result<&WeiboAccount, CallError> {
        self.accounts
            .get(tenant)
            .ok_or_else(|| CallError::Refused(format!("no Weibo account configured for tenant {tenant}")))
    }

    /// `f` over this replica's side of the tenant's budget.
    fn local<R>(&self, tenant: &str, f: impl FnOnce(&mut Budget) -> R) -> R {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budget = budgets
            .entry(tenant.to_owned())
            .or_insert_with(|| Budget::new(self.per_hour, self.first_backoff));
        f(budget)
    }

    /// Takes a call from the tenant's budget, claiming more from the hour shared by the
    /// replicas when this one has spent what it claimed.
    async fn pace(&self, tenant: &str, polling: bool) -> Result<(), CallError> {
        let spent = |wait| CallError::Later(wait, "the tenant's Weibo call budget is spent for now".into());
        let unavailable =
            |e: crate::store::StoreError| CallError::Later(Duration::from_secs(2), e.to_string());
        let take = || self.local(tenant, |b| b.take(Instant::now(), now_ms()));
        for _ in 0..CLAIM_ATTEMPTS {
            match take() {
                Take::Granted => return Ok(()),
                Take::Wait(wait) => return Err(spent(wait)),
                Take::Claim => {}
            }
            let _claiming = self.claiming.lock().await;
            // Another task may have claimed while this one waited for the lock.
            match take() {
                Take::Granted => return Ok(()),
                Take::Wait(wait) => return Err(spent(wait)),
                Take::Claim => {}
            }
            let key = budget_key(tenant);
            let current: Versioned<SharedHour> = self.store.read(&key).await.map_err(unavailable)?;
            let shared = current.value.unwrap_or_default();
            let (limit, chunk) = self.local(tenant, |b| (b.limit(polling), b.chunk()));
            let now_ms = now_ms();
            let (next, calls) = match shared.claim(now_ms, limit, chunk) {
                Ok(claimed) => claimed,
                Err(wait) => {
                    crate::metrics::budget("weibo", tenant, shared.remaining(now_ms, self.per_hour));
                    return Err(spent(wait));
                }
            };
            // Written, or another replica claimed first and this one reads again.
            if self
                .store
                .write(&key, &next, current.revision)
                .await
                .map_err(unavailable)?
                .is_some()
            {
                self.local(tenant, |b| b.grant(next.hour, calls));
                crate::metrics::budget("weibo", tenant, next.remaining(now_ms, self.per_hour));
            }
        }
        Err(CallError::Later(
            Duration::from_secs(1),
            "the Weibo call budget is contended".into(),
        ))
    }

    /// Weibo said the rate limit is reached: this replica pauses, and so, through the
    /// shared hour, do the others when they next claim. The pause is returned.
    async fn limited(&self, tenant: &str) -> Duration {
        let pause = self.local(tenant, |b| b.limited(Instant::now()));
        let until_ms = now_ms() + i64::try_from(pause.as_millis()).unwrap_or(i64::MAX);
        let key = budget_key(tenant);
        for _ in 0..CLAIM_ATTEMPTS {
            let written = match self.store.read::<SharedHour>(&key).await {
                Ok(current) => {
                    let paused = current.value.unwrap_or_default().paused(until_ms);
                    self.store.write(&key, &paused, current.revision).await
                }
                Err(error) => Err(error),
            };
            match written {
                Ok(Some(_)) => break,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%tenant, %error, "the Weibo pause is this replica's alone");
                    break;
                }
            }
        }
        pause
    }

    /// The tenant's current token (the configured one until a refresh replaces it).
    async fn token(&self, tenant: &str, refused: Option<&str>) -> Result<String, CallError> {
        let account = self.account(tenant)?;
        let key = crate::store::token_key("weibo", tenant);
        crate::tokens::token(&self.store, &key, refused, |record| self.renew(account, record))
            .await
            .map_err(|error| match error {
                crate::tokens::TokenError::Refused(why) => CallError::Refused(why),
                other => CallError::Later(Duration::from_secs(5), other.to_string()),
            })
    }

    /// The first token is the configured one; later ones come from the refresh grant,
    /// where the account has one.
    async fn renew(
        &self,
        account: &WeiboAccount,
        record: crate::store::TokenRecord,
    ) -> Result<crate::tokens::Issued, crate::tokens::TokenError> {
        use crate::tokens::{Issued, TokenError};
        let configured = Issued {
            access_token: account.access_token.clone(),
            // Unknown: held until Weibo refuses it.
            expires_in: Duration::from_secs(365 * 24 * 3600),
            refresh_token: None,
        };
        if record.access_token.is_empty() {
            return Ok(configured);
        }
        let Some((configured_refresh, app_key, app_secret)) = &account.refresh else {
            // Without a refresh grant only the operator renews the token: a configured one
            // other than the one refused is that.
            if record.access_token != account.access_token {
                return Ok(configured);
            }
            return Err(TokenError::Unavailable(
                "the Weibo access token expired and no refresh token is configured: authorise the app again"
                    .into(),
            ));
        };
        let refresh = if record.refresh_token.is_empty() {
            configured_refresh
        } else {
            &record.refresh_token
        };
        let response = self
            .http
            .post(format!("{}/oauth2/access_token", self.endpoints.api))
            .form(&[
                ("client_id", app_key.as_str()),
                ("client_secret", app_secret.as_str()),
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
            ])
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(e.without_url().to_string()))?;
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
            #[serde(default)]
            refresh_token: Option<String>,
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| TokenError::Unavailable(e.without_url().to_string()))?;
        if let Ok(error) = serde_json::from_slice::<ErrorBody>(&bytes) {
            crate::metrics::api_call("weibo", "access_token", error.error_code);
            return Err(TokenError::Refused(format!(
                "Weibo refused the refresh: error_code {}: {}",
                error.error_code, error.error
            )));
        }
        let granted: Granted = serde_json::from_slice(&bytes)
            .map_err(|e| TokenError::Unavailable(format!("unreadable token answer: {e}")))?;
        crate::metrics::api_call("weibo", "access_token", 0);
        Ok(Issued {
            access_token: granted.access_token,
            expires_in: Duration::from_secs(granted.expires_in.unwrap_or(24 * 3600)),
            refresh_token: granted.refresh_token,
        })
    }

    /// One call with the tenant's token; once more with a renewed token if Weibo refuses
    /// it. `form` set means a POST of that form, else a GET with `query`.
    async fn call<T: DeserializeOwned>(
        &self,
        tenant: &str,
        url: &str,
        query: &[(&str, String)],
        form: Option<&[(&str, String)]>,
        polling: bool,
    ) -> Result<T, CallError> {
        // The API's name for the metrics: `comments/reply` of `…/2/comments/reply.json`.
        let api = url
            .split_once("/2/")
            .map_or(url, |(_, path)| path)
            .trim_end_matches(".json")
            .to_owned();
        let mut refused: Option<String> = None;
        for _ in 0..2 {
            self.pace(tenant, polling).await?;
            let token = self.token(tenant, refused.as_deref()).await?;
            let request = match form {
                Some(form) => {
                    let mut fields: Vec<(&str, String)> = form.to_vec();
                    fields.push(("access_token", token.clone()));
                    self.http.post(url).form(&fields)
                }
                None => self.http.get(url).query(query).query(&[("access_token", &token)]),
            };
            let response = request.send().await.map_err(|e| {
                crate::metrics::api_call_failed("weibo", &api);
                let e = e.without_url();
                if e.is_connect() || form.is_none() {
                    // Nothing was sent, or only a read was.
                    CallError::Later(Duration::from_secs(2), e.to_string())
                } else {
                    CallError::Unknown(e.to_string())
                }
            })?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| {
                crate::metrics::api_call_failed("weibo", &api);
                CallError::Unknown(format!("Weibo answer cut off: {}", e.without_url()))
            })?;
            if let Ok(error) = serde_json::from_slice::<ErrorBody>(&bytes) {
                crate::metrics::api_call("weibo", &api, error.error_code);
                match verdict(error.error_code, &error.error) {
                    Verdict::RateLimited => {
                        let pause = self.limited(tenant).await;
                        crate::metrics::rate_limited("weibo", tenant);
                        return Err(CallError::Later(
                            pause,
                            format!("Weibo rate limit: {}", error.error),
                        ));
                    }
                    Verdict::TokenInvalid if refused.is_none() => {
                        refused = Some(token);
                        continue;
                    }
                    Verdict::TokenInvalid => {
                        return Err(CallError::Later(
                            Duration::from_secs(5),
                            "Weibo refused a renewed token".into(),
                        ));
                    }
                    Verdict::Busy => return Err(CallError::Later(Duration::from_secs(2), error.error)),
                    Verdict::Refused(why) => return Err(CallError::Refused(why)),
                }
            }
            if !status.is_success() {
                crate::metrics::api_call_failed("weibo", &api);
                return Err(CallError::Later(
                    Duration::from_secs(2),
                    format!("Weibo API answered HTTP {status}"),
                ));
            }
            crate::metrics::api_call("weibo", &api, 0);
            self.local(tenant, Budget::succeeded);
            return serde_json::from_slice(&bytes)
                .map_err(|e| CallError::Unknown(format!("unreadable Weibo answer: {e}")));
        }
        Err(CallError::Later(Duration::from_secs(5), "no Weibo token".into()))
    }

    /// A page of the brand's mentions, newer than `since_id`.
    pub async fn mentions(&self, tenant: &str, since_id: u64, page: u32) -> Result<Vec<Status>, CallError> {
        let url = format!("{}/2/statuses/mentions.json", self.endpoints.api);
        let page: Page = self
            .call(tenant, &url, &feed_query(since_id, page), None, true)
            .await?;
        Ok(page.statuses)
    }

    /// A page of comments on the brand's posts, newer than `since_id`.
    pub async fn comments(&self, tenant: &str, since_id: u64, page: u32) -> Result<Vec<Comment>, CallError> {
        let url = format!("{}/2/comments/to_me.json", self.endpoints.api);
        let page: Page = self
            .call(tenant, &url, &feed_query(since_id, page), None, true)
            .await?;
        Ok(page.comments)
    }

    /// A page of public posts with `keyword`, newest first.
    pub async fn search(&self, tenant: &str, keyword: &str, page: u32) -> Result<Vec<Status>, CallError> {
        let url = format!("{}/2/search/statuses/limited.json", self.endpoints.search);
        let query = [
            ("q", keyword.to_owned()),
            ("sort", "time".to_owned()),
            ("count", PAGE_SIZE.to_string()),
            ("page", page.to_string()),
        ];
        let page: Page = self.call(tenant, &url, &query, None, true).await?;
        Ok(page.statuses)
    }

    /// Sends a reply on the channel the customer used: a comment on their post, a reply to
    /// their comment, or a private message. An invitation to a private channel (a public
    /// post that carried personal data) goes privately where Weibo lets the brand write to
    /// the customer, and as a public comment where it does not.
    pub async fn deliver(&self, message: &WebhookMessage<'_>) -> Result<Sent, SendError> {
        let (tenant, channel) = (message.tenant.as_ref(), message.channel.as_ref());
        if channel == "weibo_direct_message" {
            return self
                .private_message(tenant, &message.recipient, &message.text)
                .await;
        }
        if message.kind == "private_channel_invitation" {
            match self
                .private_message(tenant, &message.recipient, &message.text)
                .await
            {
                Err(SendError::Refused(why)) => {
                    tracing::info!(%tenant, %why, "no private channel to the customer yet; inviting in public");
                }
                sent => return sent,
            }
        }
        let reply_to = message.reply_to_message_id.as_ref();
        if reply_to.is_empty() {
            return Err(SendError::Refused("no Weibo post or comment to reply to".into()));
        }
        let comment = cut(&message.text, COMMENT_CHARS);
        let (method, path, form): (&'static str, &str, Vec<(&str, String)>) = match channel {
            "weibo_post" => (
                "comment",
                "comments/create",
                vec![("id", reply_to.to_owned()), ("comment", comment)],
            ),
            "weibo_comment" => {
                let thread = message.thread_id.as_ref();
                let status = thread_status(thread).ok_or_else(|| {
                    SendError::Refused(format!("thread {thread:?} names no Weibo post to reply on"))
                })?;
                (
                    "comment_reply",
                    "comments/reply",
                    vec![
                        ("cid", reply_to.to_owned()),
                        ("id", status.to_owned()),
                        ("comment", comment),
                    ],
                )
            }
            other => return Err(SendError::Refused(format!("no Weibo reply for channel {other}"))),
        };
        let url = format!("{}/2/{path}.json", self.endpoints.api);
        self.create(tenant, &url, &form, method).await
    }

    /// A private message through the fan service, which Weibo allows to customers who wrote
    /// to the brand recently.
    async fn private_message(&self, tenant: &str, receiver: &str, text: &str) -> Result<Sent, SendError> {
        let form = [
            ("type", "text".to_owned()),
            (
                "data",
                serde_json::json!({ "text": cut(text, PRIVATE_MESSAGE_CHARS) }).to_string(),
            ),
            ("receiver_id", receiver.to_owned()),
        ];
        let url = format!("{}/2/messages/reply.json", self.endpoints.messages);
        self.create(tenant, &url, &form, "private_message").await
    }

    /// A write that creates a comment or message; its id is the receipt.
    async fn create(
        &self,
        tenant: &str,
        url: &str,
        form: &[(&str, String)],
        method: &'static str,
    ) -> Result<Sent, SendError> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(default)]
            idstr: String,
            #[serde(default)]
            id: Option<serde_json::Value>,
        }
        let created: Created = self.call(tenant, url, &[], Some(form), false).await?;
        Ok(Sent {
            method,
            platform_message_id: id_text(&created.idstr, created.id.as_ref()),
        })
    }
}

/// Items per page of the feeds.
pub const PAGE_SIZE: u32 = 50;

fn feed_query(since_id: u64, page: u32) -> Vec<(&'static str, String)> {
    vec![
        ("since_id", since_id.to_string()),
        ("count", PAGE_SIZE.to_string()),
        ("page", page.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_keywords_parse() {
        let accounts: WeiboAccounts = "acme=1001|tok; beta=2002|tok2|ref|key|secret"
            .parse()
            .expect("valid");
        assert_eq!(accounts.get("acme").map(|a| a.uid.as_str()), Some("1001"));
        assert!(accounts.get("acme").is_some_and(|a| a.refresh.is_none()));
        assert!(accounts.get("beta").is_some_and(|a| a.refresh.is_some()));
        assert!("acme=1001".parse::<WeiboAccounts>().is_err());
        assert!("acme=1001||".parse::<WeiboAccounts>().is_err());
        assert!(!format!("{accounts:?}").contains("tok"), "tokens are not printed");
        let keywords: Keywords = "acme=宽带, 光猫，停电;beta=".parse().expect("valid");
        assert_eq!(keywords.of("acme"), ["宽带", "光猫", "停电"]);
        assert!(keywords.of("beta").is_empty() && keywords.of("nobody").is_empty());
    }

    #[test]
    fn error_codes_decide_what_happens_next() {
        for code in [10022, 10023, 10024] {
            assert_eq!(verdict(code, ""), Verdict::RateLimited, "{code}");
        }
        for code in [21314, 21315, 21327, 21332, 21501] {
            assert_eq!(verdict(code, ""), Verdict::TokenInvalid, "{code}");
        }
        assert_eq!(verdict(10001, ""), Verdict::Busy);
        assert!(matches!(verdict(20019, "repeat content"), Verdict::Refused(_)));
        assert!(matches!(
            verdict(20101, "target weibo does not exist"),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn posts_and_comments_become_submissions() {
        let status: Status = serde_json::from_str(
            r#"{"id": 4900000000000001, "idstr": "4900000000000001", "text": "@某电信 宽带又断了",
                "created_at": "Tue May 31 17:46:55 +0800 2011",
                "user": {"id": 1404376560, "idstr": "1404376560", "screen_name": "zaku", "followers_count": 1204, "verified": true}}"#,
        )
        .expect("a status");
        let submission = post_submission(&status);
        assert_eq!(submission.channel(), Channel::WeiboPost);
        assert_eq!(submission.channel_message_id, "4900000000000001");
        assert_eq!(submission.thread_id, "weibo:4900000000000001:1404376560");
        let poster = submission.poster.clone().unwrap_or_default();
        assert_eq!((poster.followers, poster.verified), (1204, true));
        assert_eq!(submission.posted_at.map(|t| t.seconds), Some(1_306_835_215));

        let comment: Comment = serde_json::from_str(
            r#"{"id": 12438492184, "text": "你们的客服电话打不通", "created_at": "Wed Jun 01 00:50:25 +0800 2011",
                "user": {"id": 1404376561}, "status": {"id": 4900000000000002}}"#,
        )
        .expect("a comment");
        let submission = comment_submission(&comment);
        assert_eq!(submission.channel(), Channel::WeiboComment);
        assert_eq!(submission.channel_message_id, "12438492184");
        assert_eq!(thread_status(&submission.thread_id), Some("4900000000000002"));
        assert_eq!(thread_status("wechat:x:y"), None);
        assert_eq!(thread_status("weibo::y"), None);
    }
}
