//! A local stand-in for the WeChat API, following its published request and answer
//! formats: `GET /cgi-bin/token` issues access tokens (a new one replaces the old, as
//! WeChat's does), and `POST /cgi-bin/message/custom/send` and `/template/send` take
//! messages, answering with WeChat's errcodes: 40001/42001 for a token that is not the
//! current one, 45015 for a customer outside the customer-service window, 45011 while a
//! rate limit is set. Tests steer it (expire the token, close a customer's window, limit
//! the rate, hold answers) and read what it took. The other way, [`signed_query`],
//! [`text_push`] and [`encrypted_push`] make the callbacks WeChat sends to ingest; the
//! signatures are computed here, apart from ingest's code, so that tests check it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A message the fake took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenMessage {
    /// `custom` or `template`.
    pub api: &'static str,
    pub touser: String,
    /// The text (custom) or the first field's value (template).
    pub text: String,
    pub template_id: String,
}

#[derive(Default)]
struct Fake {
    app_id: String,
    app_secret: String,
    /// The current token; older ones answer 42001 (expired) or 40001.
    token: Mutex<Option<String>>,
    issued: AtomicU64,
    /// Tokens marked expired before a new one is issued.
    expired: Mutex<HashSet<String>>,
    outside_window: Mutex<HashSet<String>>,
    /// How many of the next sends answer 45011.
    rate_limited: AtomicUsize,
    /// How many of the next sends are taken and then answered only after `hold`.
    held: AtomicUsize,
    hold_ms: AtomicU64,
    taken: Mutex<Vec<TakenMessage>>,
    /// Answers by errcode, for tests to see the errors were met.
    answers: Mutex<HashMap<i64, usize>>,
}

/// The fake's address and handle.
#[derive(Clone)]
pub struct FakeWechat {
    pub addr: SocketAddr,
    fake: Arc<Fake>,
}

fn error(errcode: i64, errmsg: &str) -> Value {
    json!({"errcode": errcode, "errmsg": errmsg})
}

impl Fake {
    fn answered(&self, answer: Value) -> axum::Json<Value> {
        let code = answer["errcode"].as_i64().unwrap_or(0);
        if let Ok(mut answers) = self.answers.lock() {
            *answers.entry(code).or_default() += 1;
        }
        axum::Json(answer)
    }

    /// The errcode for `token`, if it is not the current one.
    fn check_token(&self, token: &str) -> Option<Value> {
        let current = self.token.lock().ok()?.clone();
        if current.as_deref() == Some(token) {
            if self.expired.lock().is_ok_and(|e| e.contains(token)) {
                return Some(error(42001, "access_token expired"));
            }
            return None;
        }
        Some(error(
            40001,
            "invalid credential, access_token is invalid or not latest",
        ))
    }
}

async fn token(
    State(fake): State<Arc<Fake>>,
    Query(query): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    let field = |name: &str| query.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credential" {
        return fake.answered(error(40002, "invalid grant_type"));
    }
    if field("appid") != fake.app_id || field("secret") != fake.app_secret {
        return fake.answered(error(40125, "invalid appsecret"));
    }
    let n = fake.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("ACCESS_TOKEN_{n}");
    if let Ok(mut current) = fake.token.lock() {
        *current = Some(token.clone());
    }
    fake.answered(json!({"access_token": token, "expires_in": 7200}))
}

async fn send(
    fake: Arc<Fake>,
    api: &'static str,
    query: HashMap<String, String>,
    body: Value,
) -> axum::Json<Value> {
    let token = query.get("access_token").map(String::as_str).unwrap_or_default();
    if let Some(refusal) = fake.check_token(token) {
        return fake.answered(refusal);
    }
    let limited = fake
        .rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if limited {
        return fake.answered(error(
            45011,
            "api minute-quota reach limit mustslower retry next minute",
        ));
    }
    let touser = body["touser"].as_str().unwrap_or_default().to_owned();
    if touser.is_empty() {
        return fake.answered(error(40003, "invalid openid"));
    }
    let (text, template_id) = if api == "custom" {
        if fake.outside_window.lock().is_ok_and(|o| o.contains(&touser)) {
            return fake.answered(error(
                45015,
                "response out of time limit or subscription is canceled",
            ));
        }
        (
            body["text"]["content"].as_str().unwrap_or_default().to_owned(),
            String::new(),
        )
    } else {
        let template_id = body["template_id"].as_str().unwrap_or_default().to_owned();
        if template_id.is_empty() {
            return fake.answered(error(40037, "invalid template_id"));
        }
        let value = body["data"]
            .as_object()
            .and_then(|fields| fields.values().next())
            .and_then(|field| field["value"].as_str())
            .unwrap_or_default()
            .to_owned();
        (value, template_id)
    };
    let msgid = if let Ok(mut taken) = fake.taken.lock() {
        taken.push(TakenMessage {
            api,
            touser,
            text,
            template_id,
        });
        taken.len()
    } else {
        0
    };
    let hold = fake
        .held
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if hold {
        // Taken, answered late: the caller may be gone before the answer.
        tokio::time::sleep(Duration::from_millis(fake.hold_ms.load(Ordering::SeqCst))).await;
    }
    if api == "custom" {
        fake.answered(error(0, "ok"))
    } else {
        fake.answered(json!({"errcode": 0, "errmsg": "ok", "msgid": 200_000_000 + msgid}))
    }
}

impl FakeWechat {
    /// Listens on a free port until `cancel` fires, for the account `app_id`/`app_secret`.
    pub async fn start(app_id: &str, app_secret: &str, cancel: CancellationToken) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let fake = Arc::new(Fake {
            app_id: app_id.to_owned(),
            app_secret: app_secret.to_owned(),
            ..Fake::default()
        });
        let app = Router::new()
            .route("/cgi-bin/token", get(token))
            .route(
                "/cgi-bin/message/custom/send",
                post(|State(fake), Query(query), axum::Json(body)| send(fake, "custom", query, body)),
            )
            .route(
                "/cgi-bin/message/template/send",
                post(|State(fake), Query(query), axum::Json(body)| send(fake, "template", query, body)),
            )
            .with_state(fake.clone());
        crate::serve_in_background("fake WeChat", listener, app, cancel);
        Ok(Self { addr, fake })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Expires the current token: calls with it answer 42001 until a new one is issued.
    pub fn expire_token(&self) {
        let current = self.fake.token.lock().ok().and_then(|t| t.clone());
        if let (Some(token), Ok(mut expired)) = (current, self.fake.expired.lock()) {
            expired.insert(token);
        }
    }

    /// Closes the customer-service window of `openid`: custom messages answer 45015.
    pub fn close_window(&self, openid: &str) {
        if let Ok(mut outside) = self.fake.outside_window.lock() {
            outside.insert(openid.to_owned());
        }
    }

    /// Answers the next `n` sends with 45011 (per-minute quota).
    pub fn rate_limit_next(&self, n: usize) {
        self.fake.rate_limited.store(n, Ordering::SeqCst);
    }

    /// Takes the next `n` sends and answers them only after `hold`.
    pub fn hold_next(&self, n: usize, hold: Duration) {
        self.fake.hold_ms.store(hold.as_millis() as u64, Ordering::SeqCst);
        self.fake.held.store(n, Ordering::SeqCst);
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.fake.issued.load(Ordering::SeqCst)
    }

    /// Every message taken, in order.
    pub fn taken(&self) -> Vec<TakenMessage> {
        self.fake.taken.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// How many answers carried `errcode`.
    pub fn answers_with(&self, errcode: i64) -> usize {
        self.fake
            .answers
            .lock()
            .ok()
            .and_then(|a| a.get(&errcode).copied())
            .unwrap_or(0)
    }
}

/// The query of a signed push (WeChat's plain mode, Weibo's fan service): `signature` is
/// SHA-1 over the sorted secret (WeChat's callback token, Weibo's app secret), timestamp and
/// nonce.
pub fn signed_query(token: &str, timestamp: &str, nonce: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    let signature = hex::encode(Sha1::digest(parts.concat().as_bytes()));
    format!("signature={signature}&timestamp={timestamp}&nonce={nonce}")
}

/// The XML of a text message from `openid`.
pub fn text_push(openid: &str, msg_id: &str, content: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_acme]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
         <CreateTime>1763856000</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>"
    )
}

/// A safe-mode push as WeChat sends it, encrypted under `encoding_aes_key` for `app_id`:
/// the query (with `msg_signature` over the ciphertext, SHA-1 over the sorted four) and
/// the body.
pub fn encrypted_push(
    token: &str,
    app_id: &str,
    encoding_aes_key: &str,
    timestamp: &str,
    nonce: &str,
    message: &str,
) -> anyhow::Result<(String, String)> {
    use closedloop_ingest::wechat::safe_mode::{AesKey, encrypt};
    use sha1::{Digest, Sha1};
    let key = AesKey::from_encoding_aes_key(encoding_aes_key)?;
    let encrypted = encrypt(&key, app_id, message, *b"0123456789abcdef");
    let mut parts = [token, timestamp, nonce, encrypted.as_str()];
    parts.sort_unstable();
    let signature = hex::encode(Sha1::digest(parts.concat().as_bytes()));
    let query = format!(
        "{}&encrypt_type=aes&msg_signature={signature}",
        signed_query(token, timestamp, nonce)
    );
    let body = format!(
        "<xml><ToUserName><![CDATA[gh_acme]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    );
    Ok((query, body))
}
