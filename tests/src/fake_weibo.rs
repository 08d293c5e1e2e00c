//! A local stand-in for the Weibo open API v2, following its published request and answer
//! formats: the mentions and comments timelines (`since_id`, `count`, `page`), the keyword
//! search, `comments/create`, `comments/reply`, the fan-service private message, and the
//! OAuth2 refresh grant. Errors are Weibo's JSON `{"error", "error_code", "request"}` with
//! HTTP 403 (rate limit: 10023) or 401 (expired token: 21327). Tests add posts and
//! comments, expire the token, set rate limits, and read the replies it took.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A reply the fake took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenReply {
    /// `comment`, `comment_reply` or `private_message`.
    pub api: &'static str,
    /// The post commented on (empty for private messages).
    pub status_id: String,
    /// The comment replied to (`comment_reply`).
    pub comment_id: String,
    /// The user written to (`private_message`).
    pub receiver_id: String,
    pub text: String,
}

struct Fake {
    app_key: String,
    app_secret: String,
    token: Mutex<String>,
    refresh_token: Mutex<String>,
    refreshes: AtomicU64,
    expired: Mutex<bool>,
    rate_limited: AtomicUsize,
    next_id: AtomicU64,
    mentions: Mutex<Vec<Value>>,
    comments: Mutex<Vec<Value>>,
    /// Public posts the search finds, by the text they contain.
    public_posts: Mutex<Vec<Value>>,
    replies: Mutex<Vec<TakenReply>>,
    /// Users the brand may write to privately (they wrote to it recently).
    private_open: Mutex<std::collections::HashSet<String>>,
    /// Answers by error code (0 for success), by API.
    answers: Mutex<HashMap<(String, i64), usize>>,
}

/// The fake's address and handle.
#[derive(Clone)]
pub struct FakeWeibo {
    pub addr: SocketAddr,
    fake: Arc<Fake>,
}

fn user(uid: &str, followers: i64) -> Value {
    json!({"id": uid.parse::<u64>().unwrap_or(0), "idstr": uid, "screen_name": format!("user{uid}"),
           "followers_count": followers, "verified": false})
}

/// The API a path names, e.g. `comments/reply` for `/2/comments/reply.json`.
fn api_name(uri: &Uri) -> String {
    uri.path()
        .trim_start_matches("/2/")
        .trim_end_matches(".json")
        .to_owned()
}

impl Fake {
    fn count(&self, api: &str, code: i64) {
        if let Ok(mut answers) = self.answers.lock() {
            *answers.entry((api.to_owned(), code)).or_default() += 1;
        }
    }

    fn error(&self, api: &str, status: StatusCode, code: i64, message: &str) -> Response {
        self.count(api, code);
        (
            status,
            axum::Json(json!({"error": message, "error_code": code, "request": format!("/2/{api}.json")})),
        )
            .into_response()
    }

    /// The refusal of a call, if the token or the rate limit refuses it.
    fn refuse(&self, api: &str, token: &str) -> Option<Response> {
        let current = self.token.lock().map(|t| t.clone()).unwrap_or_default();
        if token != current {
            return Some(self.error(api, StatusCode::UNAUTHORIZED, 21332, "invalid_access_token"));
        }
        if self.expired.lock().is_ok_and(|e| *e) {
            return Some(self.error(api, StatusCode::UNAUTHORIZED, 21327, "expired_token"));
        }
        let limited = self
            .rate_limited
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        limited.then(|| {
            self.error(
                api,
                StatusCode::FORBIDDEN,
                10023,
                "User requests out of rate limit!",
            )
        })
    }

    fn ok(&self, api: &str, body: Value) -> Response {
        self.count(api, 0);
        axum::Json(body).into_response()
    }
}

fn field<'a>(map: &'a HashMap<String, String>, name: &str) -> &'a str {
    map.get(name).map(String::as_str).unwrap_or_default()
}

/// Items newer than `since_id`, newest first, one page of `count`.
fn page(items: &[Value], query: &HashMap<String, String>) -> Vec<Value> {
    let since: u64 = field(query, "since_id").parse().unwrap_or(0);
    let count: usize = field(query, "count").parse().unwrap_or(20).clamp(1, 200);
    let page: usize = field(query, "page").parse().unwrap_or(1).max(1);
    let mut newer: Vec<Value> = items
        .iter()
        .filter(|item| item["id"].as_u64().unwrap_or(0) > since)
        .cloned()
        .collect();
    newer.sort_by_key(|item| std::cmp::Reverse(item["id"].as_u64().unwrap_or(0)));
    newer.into_iter().skip((page - 1) * count).take(count).collect()
}

async fn timeline(
    State(fake): State<Arc<Fake>>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let api = api_name(&uri);
    if let Some(refusal) = fake.refuse(&api, field(&query, "access_token")) {
        return refusal;
    }
    match api.as_str() {
        "statuses/mentions" => {
            let statuses = page(
                &fake.mentions.lock().map(|m| m.clone()).unwrap_or_default(),
                &query,
            );
            fake.ok(
                &api,
                json!({"statuses": statuses, "total_number": statuses.len()}),
            )
        }
        "comments/to_me" => {
            let comments = page(
                &fake.comments.lock().map(|c| c.clone()).unwrap_or_default(),
                &query,
            );
            fake.ok(
                &api,
                json!({"comments": comments, "total_number": comments.len()}),
            )
        }
        _ => {
            let keyword = field(&query, "q");
            let posts: Vec<Value> = fake
                .public_posts
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|p| {
                    p["text"]
                        .as_str()
                        .is_some_and(|t| !keyword.is_empty() && t.contains(keyword))
                })
                .collect();
            let statuses = page(&posts, &query);
            fake.ok(
                &api,
                json!({"statuses": statuses, "total_number": statuses.len()}),
            )
        }
    }
}

async fn write(
    State(fake): State<Arc<Fake>>,
    uri: Uri,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let api = api_name(&uri);
    if let Some(refusal) = fake.refuse(&api, field(&form, "access_token")) {
        return refusal;
    }
    let reply = match api.as_str() {
        "comments/create" => TakenReply {
            api: "comment",
            status_id: field(&form, "id").to_owned(),
            comment_id: String::new(),
            receiver_id: String::new(),
            text: field(&form, "comment").to_owned(),
        },
        "comments/reply" => TakenReply {
            api: "comment_reply",
            status_id: field(&form, "id").to_owned(),
            comment_id: field(&form, "cid").to_owned(),
            receiver_id: String::new(),
            text: field(&form, "comment").to_owned(),
        },
        _ => {
            let data: Value = serde_json::from_str(field(&form, "data")).unwrap_or_default();
            TakenReply {
                api: "private_message",
                status_id: String::new(),
                comment_id: String::new(),
                receiver_id: field(&form, "receiver_id").to_owned(),
                text: data["text"].as_str().unwrap_or_default().to_owned(),
            }
        }
    };
    if reply.api == "private_message"
        && !fake
            .private_open
            .lock()
            .is_ok_and(|open| open.contains(&reply.receiver_id))
    {
        // The fan service refuses users with no message quota; connect treats every refusal
        // alike, so the code here is this fake's choice.
        return fake.error(
            &api,
            StatusCode::BAD_REQUEST,
            21602,
            "no quota to send message to this user",
        );
    }
    if reply.text.is_empty() || (reply.api != "private_message" && reply.status_id.is_empty()) {
        return fake.error(&api, StatusCode::BAD_REQUEST, 10008, "param error");
    }
    if reply.text.chars().count() > 140 && reply.api != "private_message" {
        return fake.error(
            &api,
            StatusCode::BAD_REQUEST,
            20012,
            "Text too long, please input text less than 140 characters!",
        );
    }
    let id = fake.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut replies) = fake.replies.lock() {
        replies.push(reply);
    }
    fake.ok(
        &api,
        json!({"id": id, "idstr": id.to_string(), "created_at": "Sat Dec 05 10:00:00 +0800 2026"}),
    )
}

async fn refresh(State(fake): State<Arc<Fake>>, Form(form): Form<HashMap<String, String>>) -> Response {
    let expected = fake.refresh_token.lock().map(|t| t.clone()).unwrap_or_default();
    if field(&form, "grant_type") != "refresh_token"
        || field(&form, "client_id") != fake.app_key
        || field(&form, "client_secret") != fake.app_secret
        || field(&form, "refresh_token") != expected
    {
        return fake.error("access_token", StatusCode::BAD_REQUEST, 21325, "invalid_grant");
    }
    let n = fake.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
    let (token, refresh_token) = (format!("weibo-token-{n}"), format!("weibo-refresh-{n}"));
    if let (Ok(mut current), Ok(mut current_refresh), Ok(mut expired)) =
        (fake.token.lock(), fake.refresh_token.lock(), fake.expired.lock())
    {
        *current = token.clone();
        *current_refresh = refresh_token.clone();
        *expired = false;
    }
    fake.ok(
        "access_token",
        json!({"access_token": token, "expires_in": 86400, "refresh_token": refresh_token}),
    )
}

impl FakeWeibo {
    /// Listens on a free port until `cancel` fires. The account's first token is
    /// `access_token`, renewable with `refresh_token` by the app `app_key`/`app_secret`.
    pub async fn start(
        access_token: &str,
        refresh_token: &str,
        app_key: &str,
        app_secret: &str,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let fake = Arc::new(Fake {
            app_key: app_key.to_owned(),
            app_secret: app_secret.to_owned(),
            token: Mutex::new(access_token.to_owned()),
            refresh_token: Mutex::new(refresh_token.to_owned()),
            refreshes: AtomicU64::new(0),
            expired: Mutex::new(false),
            rate_limited: AtomicUsize::new(0),
            next_id: AtomicU64::new(4_900_000_000_000_000),
            mentions: Mutex::default(),
            comments: Mutex::default(),
            public_posts: Mutex::default(),
            replies: Mutex::default(),
            private_open: Mutex::default(),
            answers: Mutex::default(),
        });
        let app = Router::new()
            .route("/2/statuses/mentions.json", get(timeline))
            .route("/2/comments/to_me.json", get(timeline))
            .route("/2/search/statuses/limited.json", get(timeline))
            .route("/2/comments/create.json", post(write))
            .route("/2/comments/reply.json", post(write))
            .route("/2/messages/reply.json", post(write))
            .route("/oauth2/access_token", post(refresh))
            .with_state(fake.clone());
        crate::serve_in_background("fake Weibo", listener, app, cancel);
        Ok(Self { addr, fake })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn next_id(&self) -> u64 {
        self.fake.next_id.fetch_add(1, Ordering::SeqCst)
    }

    fn status(&self, uid: &str, followers: i64, text: &str) -> (u64, Value) {
        let id = self.next_id();
        let status = json!({"id": id, "idstr": id.to_string(), "mid": id.to_string(), "text": text,
            "created_at": "Sat Dec 05 09:30:00 +0800 2026", "user": user(uid, followers)});
        (id, status)
    }

    /// A post by `uid` that mentions the brand; returns its id.
    pub fn mention(&self, uid: &str, followers: i64, text: &str) -> String {
        let (id, status) = self.status(uid, followers, text);
        if let Ok(mut mentions) = self.fake.mentions.lock() {
            mentions.push(status);
        }
        id.to_string()
    }

    /// A comment by `uid` on the brand's post `status_id`; returns the comment's id.
    pub fn comment(&self, uid: &str, status_id: &str, text: &str) -> String {
        let id = self.next_id();
        let comment = json!({"id": id, "idstr": id.to_string(), "text": text,
            "created_at": "Sat Dec 05 09:31:00 +0800 2026", "user": user(uid, 10),
            "status": {"id": status_id.parse::<u64>().unwrap_or(0), "idstr": status_id, "text": "品牌公告"}});
        if let Ok(mut comments) = self.fake.comments.lock() {
            comments.push(comment);
        }
        id.to_string()
    }

    /// A public post by `uid` the search can find; returns its id.
    pub fn public_post(&self, uid: &str, followers: i64, text: &str) -> String {
        let (id, status) = self.status(uid, followers, text);
        if let Ok(mut posts) = self.fake.public_posts.lock() {
            posts.push(status);
        }
        id.to_string()
    }

    /// Lets the brand write privately to `uid`, as when the user has written to it.
    pub fn open_private(&self, uid: &str) {
        if let Ok(mut open) = self.fake.private_open.lock() {
            open.insert(uid.to_owned());
        }
    }

    /// Expires the current token: calls answer 21327 until it is refreshed.
    pub fn expire_token(&self) {
        if let Ok(mut expired) = self.fake.expired.lock() {
            *expired = true;
        }
    }

    /// Answers the next `n` calls with 10023 (the user's rate limit).
    pub fn rate_limit_next(&self, n: usize) {
        self.fake.rate_limited.store(n, Ordering::SeqCst);
    }

    /// Refresh grants issued.
    pub fn refreshes(&self) -> u64 {
        self.fake.refreshes.load(Ordering::SeqCst)
    }

    /// Every reply taken, in order.
    pub fn replies(&self) -> Vec<TakenReply> {
        self.fake.replies.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many answers carried `error_code` (0: success), over every API.
    /// Every call the API answered, whatever the answer.
    pub fn calls(&self) -> usize {
        self.fake.answers.lock().map(|a| a.values().sum()).unwrap_or(0)
    }

    pub fn answers_with(&self, error_code: i64) -> usize {
        self.fake
            .answers
            .lock()
            .map(|a| {
                a.iter()
                    .filter(|((_, code), _)| *code == error_code)
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// A private message from `sender` to the brand account `receiver`, as the fan service
/// pushes it to the callback (its query is signed as `fake_wechat::signed_query` signs,
/// with the app secret and a timestamp in milliseconds).
pub fn private_message_push(sender: &str, receiver: &str, created_at: &str, text: &str) -> String {
    let number = |uid: &str| uid.parse::<u64>().map_or_else(|_| json!(uid), |n| json!(n));
    json!({"type": "text", "receiver_id": number(receiver), "sender_id": number(sender),
        "created_at": created_at, "text": text, "data": {}})
    .to_string()
}
