//! Ingest end to end on real NATS and PostgreSQL: the JSON and WeChat ways in share the
//! gRPC path and its ids, backpressure and outages fail cleanly, feedback is published,
//! and thread follow-ups join the open work order.

use std::time::Duration;

use closedloop_e2e::fake_wechat::{encrypted_push, signed_query, text_push};
use closedloop_e2e::system::{
    TestEnv, WECHAT_AES_KEY, WECHAT_APP_ID, WECHAT_SAFE_TOKEN, WECHAT_TOKEN, authed, contact, refused,
};
use closedloop_e2e::{wait_for, wait_until};
use closedloop_proto::v1::*;
use closedloop_runtime::bus;
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(30);

fn post(message_id: &str, text: &str) -> ComplaintSubmission {
    contact(Channel::WeiboPost, message_id, "weibo-uid-7", 10, text)
}

/// Every `complaint.received` event in the stream, decoded.
async fn received_events(env: &TestEnv) -> anyhow::Result<Vec<Complaint>> {
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(bus::COMPLAINTS_STREAM).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: bus::COMPLAINT_RECEIVED.all_tenants(),
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut complaints = Vec::with_capacity(pending);
    if pending > 0 {
        let mut batch = consumer.fetch().max_messages(pending).messages().await?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!(e))?;
            complaints.extend(ComplaintReceived::decode(message.payload.as_ref())?.complaint);
        }
    }
    Ok(complaints)
}

async fn work_orders(env: &TestEnv) -> anyhow::Result<Vec<WorkOrder>> {
    env.list_work_orders(&env.tokens.agent, 500, false).await
}

struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(env: &TestEnv) -> Self {
        Self {
            client: reqwest::Client::new(),
            base: format!("http://{}", env.system.ingest_http),
        }
    }

    async fn post_json(&self, path: &str, token: Option<&str>, body: &str) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

/// The HTTP API checks the token before it reads a body: a caller without one who
/// announces 4 MB and sends a few bytes is answered 401 at once, not read to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_checks_the_token_before_reading_the_body() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::start().await?;
    let mut stream = tokio::net::TcpStream::connect(env.system.ingest_http).await?;
    stream
        .write_all(
            b"POST /v1/complaints HTTP/1.1\r\nHost: ingest\r\nContent-Type: application/json\r\n\
              Content-Length: 4000000\r\n\r\n{\"complaint\":",
        )
        .await?;
    let mut answer = vec![0; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .map_err(|_| anyhow::anyhow!("no answer: ingest is waiting for the body"))??;
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    env.shutdown().await
}

/// Ingest's `/metrics` shows its counters from the start, each outcome at zero, so a
/// dashboard and an alert see the series before the first request. The binary runs in a
/// process of its own, since the registry is a process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_metrics_are_there_before_the_first_request() -> anyhow::Result<()> {
    let nats = closedloop_e2e::servers::NatsServer::start()?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], closedloop_e2e::free_port()?));
    let mut ingest =
        std::process::Command::new(closedloop_e2e::processes::bin_dir()?.join("closedloop-ingest"))
            .args([
                "--nats-url",
                &nats.url(),
                "--metrics-listen",
                &metrics.to_string(),
            ])
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
    let text = closedloop_e2e::wait_for("ingest's /metrics", WAIT, || async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    })
    .await;
    ingest.kill()?;
    ingest.wait()?;
    let text = text?;
    for outcome in ["accepted", "duplicate", "rejected", "unavailable", "full"] {
        let series = format!("closedloop_complaints_received_total{{outcome=\"{outcome}\"}} 0");
        assert!(text.contains(&series), "{series} in {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_grpc_share_one_path_and_one_id() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let http = Http::new(&env);
    let body = json!({"complaint": {
        "channel": "weibo_post", "channel_message_id": "json-1",
        "poster": {"poster_id": "weibo-uid-7", "followers": 10},
        "text": "寬頻斷網了，請盡快處理　ＡＢＣ", "posted_at": "2026-11-23T08:00:00+08:00"}})
    .to_string();
    let (status, first) = http
        .post_json("/v1/complaints", Some(&env.tokens.gateway), &body)
        .await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    let id = first["complaint_id"].as_str().unwrap_or_default().to_owned();

    // The same message through gRPC, and JSON again: the same id, nothing new.
    let grpc = env.submit(post("json-1", "寬頻斷網了")).await?;
    assert_eq!((grpc.complaint_id.as_str(), grpc.duplicate), (id.as_str(), true));
    let (_, again) = http
        .post_json("/v1/complaints", Some(&env.tokens.gateway), &body)
        .await?;
    assert_eq!(
        (again["complaint_id"].as_str(), again["duplicate"].as_bool()),
        (Some(id.as_str()), Some(true))
    );

    env.wait_idle().await?;
    let stored = received_events(&env).await?;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].script(), Script::Traditional);
    assert_eq!(
        stored[0].text, "寬頻斷網了,請盡快處理 ABC",
        "NFKC folds full-width forms"
    );
    assert_eq!(stored[0].original_text, "寬頻斷網了，請盡快處理　ＡＢＣ");
    assert_eq!(work_orders(&env).await?.len(), 1);
    assert_eq!(env.webhook.about(&id, "acknowledgement").len(), 1);

    // Errors, as JSON with HTTP statuses.
    let (status, error) = http.post_json("/v1/complaints", None, &body).await?;
    assert_eq!((status, error["code"].as_str()), (401, Some("UNAUTHENTICATED")));
    let (status, error) = http
        .post_json("/v1/complaints", Some(&env.tokens.agent), &body)
        .await?;
    assert_eq!((status, error["code"].as_str()), (403, Some("PERMISSION_DENIED")));
    let invalid = json!({"complaint": {"channel": "pigeon", "channel_message_id": "json-2",
        "poster": {"poster_id": "u"}, "text": "", "posted_at": "yesterday"}})
    .to_string();
    let (status, error) = http
        .post_json("/v1/complaints", Some(&env.tokens.gateway), &invalid)
        .await?;
    assert_eq!((status, error["code"].as_str()), (400, Some("INVALID_ARGUMENT")));
    let fields: Vec<&str> = error["field_violations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        vec!["complaint.channel", "complaint.text", "complaint.posted_at"]
    );
    // Bodies over the request limit (4 MiB by default) are refused unread.
    let huge = format!(
        r#"{{"complaint": {{"text": "{}"}}}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    // Refused before it is read: the server answers 413 and closes the connection, so a
    // client still sending the body may see the close (or a broken pipe) instead of the
    // answer. A client of its own, so the closed connection is not reused for what follows.
    match Http::new(&env)
        .post_json("/v1/complaints", Some(&env.tokens.gateway), &huge)
        .await
    {
        Ok((status, _)) => assert_eq!(status, 413),
        Err(error) => {
            let error = format!("{error:#}");
            assert!(
                error.contains("connection closed before message completed") || error.contains("Broken pipe"),
                "{error}"
            );
        }
    }
    for broken in ["{not json", r#"{"complaint": {"surprise": 1}}"#] {
        let (status, error) = http
            .post_json("/v1/complaints", Some(&env.tokens.gateway), broken)
            .await?;
        assert_eq!(status, 400, "{broken}: {error}");
    }

    // A batch: duplicate, accepted, rejected.
    let batch = json!({"complaints": [
        {"channel": "CHANNEL_WEIBO_POST", "channel_message_id": "json-1", "poster": {"poster_id": "weibo-uid-7"}, "text": "again"},
        {"channel": "wechat", "channel_message_id": "json-3", "poster": {"poster_id": "o-1"}, "text": "停电了"},
        {"channel": "wechat", "channel_message_id": "json-4", "poster": {"poster_id": "o-1"}, "text": " "}]})
    .to_string();
    let (status, results) = http
        .post_json("/v1/complaints:batch", Some(&env.tokens.gateway), &batch)
        .await?;
    assert_eq!(status, 200, "{results}");
    let outcomes: Vec<&str> = results["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, vec!["duplicate", "accepted", "rejected"]);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wechat_callback_verifies_and_ingests_each_message_once() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let client = reqwest::Client::new();
    let base = format!("http://{}/wechat", env.system.ingest_http);
    let now = chrono::Utc::now().timestamp();
    let at = |offset: i64| (now + offset).to_string();

    // The verification handshake.
    let query = signed_query(WECHAT_TOKEN, &at(0), "n1");
    let response = client
        .get(format!("{base}/acme?{query}&echostr=hello-wechat"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await?, "hello-wechat");
    let forged = signed_query("wrong-token", &at(0), "n1");
    let response = client
        .get(format!("{base}/acme?{forged}&echostr=x"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403);
    let response = client
        .get(format!("{base}/nobody?{query}&echostr=x"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 404);

    // A text push, then WeChat's retries of it (new timestamp and nonce, then the same
    // signature again; same MsgId).
    for (timestamp, nonce) in [(at(1), "n2"), (at(6), "n3"), (at(6), "n3")] {
        let query = signed_query(WECHAT_TOKEN, &timestamp, nonce);
        let response = client
            .post(format!("{base}/acme?{query}&openid=oCustomer1"))
            .body(text_push(
                "oCustomer1",
                "24000000000000001",
                "家里停电了，什么时候恢复？",
            ))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.text().await?, "success");
    }
    // A signature carries one message: the same signed URL with another message is refused.
    let replayed = signed_query(WECHAT_TOKEN, &at(6), "n3");
    let response = client
        .post(format!("{base}/acme?{replayed}"))
        .body(text_push("oCustomer1", "24000000000000003", "冒名的消息"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403, "a replayed signature");
    // So is a signature older than the replay window.
    let stale = signed_query(WECHAT_TOKEN, &at(-600), "n4");
    let response = client
        .post(format!("{base}/acme?{stale}"))
        .body(text_push("oCustomer1", "24000000000000004", "十分钟前的签名"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403, "a stale signature");
    // A forged push and an event push store nothing.
    let response = client
        .post(format!("{base}/acme?{forged}"))
        .body(text_push("oCustomer1", "24000000000000002", "伪造的消息"))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403);
    let event = "<xml><ToUserName>gh_acme</ToUserName><FromUserName>oCustomer1</FromUserName>\
        <CreateTime>1763856000</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>";
    let response = client
        .post(format!("{base}/acme?{query}"))
        .body(event)
        .send()
        .await?;
    assert_eq!(response.text().await?, "success");

    env.wait_idle().await?;
    let stored = received_events(&env).await?;
    assert_eq!(stored.len(), 1, "one complaint for one WeChat message");
    assert_eq!(stored[0].channel(), Channel::Wechat);
    assert_eq!(stored[0].channel_message_id, "24000000000000001");
    assert_eq!(
        stored[0].poster.as_ref().map(|p| p.poster_id.as_str()),
        Some("oCustomer1")
    );
    assert_eq!(work_orders(&env).await?.len(), 1);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_mode_account_takes_encrypted_pushes_only() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let client = reqwest::Client::new();
    let url = format!("http://{}/wechat/beta", env.system.ingest_http);
    let now = chrono::Utc::now().timestamp().to_string();
    let post = |query: String, body: String| client.post(format!("{url}?{query}")).body(body).send();

    let message = text_push("oCustomer1", "24000000000000101", "加密模式：宽带断了三天");
    let (query, body) = encrypted_push(
        WECHAT_SAFE_TOKEN,
        WECHAT_APP_ID,
        WECHAT_AES_KEY,
        &now,
        "s1",
        &message,
    )?;
    let response = post(query, body).await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await?, "success");

    // Refused: a plain push (even correctly signed), a ciphertext swapped under another
    // push's signature, and a message encrypted for another account.
    let plain = signed_query(WECHAT_SAFE_TOKEN, &now, "s2");
    let response = post(plain, text_push("oCustomer1", "24000000000000102", "明文")).await?;
    assert_eq!(
        response.status().as_u16(),
        403,
        "plain push to a safe-mode account"
    );
    let (query, _) = encrypted_push(
        WECHAT_SAFE_TOKEN,
        WECHAT_APP_ID,
        WECHAT_AES_KEY,
        &now,
        "s3",
        &message,
    )?;
    let (_, swapped) = encrypted_push(
        WECHAT_SAFE_TOKEN,
        WECHAT_APP_ID,
        WECHAT_AES_KEY,
        &now,
        "s3",
        &text_push("oCustomer1", "24000000000000103", "换过的密文"),
    )?;
    let response = post(query, swapped).await?;
    assert_eq!(response.status().as_u16(), 403, "signature of another ciphertext");
    let (query, body) = encrypted_push(
        WECHAT_SAFE_TOKEN,
        "wxSomeOtherAccount",
        WECHAT_AES_KEY,
        &now,
        "s4",
        &text_push("oCustomer1", "24000000000000104", "别的公众号"),
    )?;
    let response = post(query, body).await?;
    assert_eq!(response.status().as_u16(), 400, "encrypted for another AppID");

    env.wait_idle().await?;
    let stored: Vec<Complaint> = received_events(&env)
        .await?
        .into_iter()
        .filter(|c| c.tenant == "beta")
        .collect();
    assert_eq!(stored.len(), 1, "only the encrypted push is stored: {stored:?}");
    assert_eq!(stored[0].channel_message_id, "24000000000000101");
    assert_eq!(stored[0].original_text, "加密模式：宽带断了三天");
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_stopped_calls_fail_cleanly_and_nothing_is_falsely_accepted() -> anyhow::Result<()> {
    let mut env = TestEnv::start().await?;
    let mut accepted = vec![env.submit(post("outage-1", "停电了")).await?.complaint_id];

    env.nats.stop();
    let status = env
        .submit(post("outage-2", "停电了"))
        .await
        .expect_err("NATS is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.get_error_details().retry_info().is_some(),
        "carries retry advice"
    );
    let http = Http::new(&env);
    let body = json!({"complaint": {"channel": "weibo_post", "channel_message_id": "outage-3",
        "poster": {"poster_id": "u"}, "text": "停电了"}})
    .to_string();
    let response = http
        .client
        .post(format!("{}/v1/complaints", http.base))
        .header("authorization", format!("Bearer {}", env.tokens.gateway))
        .body(body)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());

    // Back up: the gateway's retry goes through, and everything reported accepted is stored.
    env.nats.resume()?;
    let retried = wait_for("ingest to reconnect", WAIT, || async {
        env.submit(post("outage-2", "停电了")).await.ok()
    })
    .await?;
    accepted.push(retried.complaint_id);
    let stored: Vec<String> = received_events(&env)
        .await?
        .into_iter()
        .map(|c| c.complaint_id)
        .collect();
    for id in &accepted {
        assert!(
            stored.contains(id),
            "{id} was reported accepted but is not stored"
        );
    }
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_with_resource_exhausted() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|options| {
        options.extra_args = vec!["--stream-max-bytes".into(), "4096".into()];
    })
    .await?;
    let mut accepted = 0;
    let mut refusal = None;
    for i in 0..50 {
        match env.submit(post(&format!("flood-{i}"), &"停电".repeat(200))).await {
            Ok(_) => accepted += 1,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.ok_or_else(|| anyhow::anyhow!("the stream never filled"))?;
    assert!(accepted >= 1);
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.get_error_details().retry_info().is_some());
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_published_and_bad_feedback_rejected() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let complaint = env.submit(post("fb-1", "网速太慢")).await?;
    let mut ingest = env.ingest().await?;
    let request = SubmitFeedbackRequest {
        complaint_id: complaint.complaint_id.clone(),
        satisfaction: 2,
        comment: "还是很慢".into(),
        ..Default::default()
    };
    let feedback_id = ingest
        .submit_feedback(authed(&env.tokens.gateway, request))
        .await?
        .into_inner()
        .feedback_id;

    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let message = js
        .get_stream(bus::FEEDBACK_STREAM)
        .await?
        .get_last_raw_message_by_subject(&bus::FEEDBACK_RECEIVED.subject("acme"))
        .await?;
    let event = FeedbackReceived::decode(message.payload.as_ref())?;
    assert_eq!(
        (event.feedback_id.as_str(), event.satisfaction),
        (feedback_id.as_str(), 2)
    );
    assert_eq!(event.complaint_id, complaint.complaint_id);

    let bad = SubmitFeedbackRequest {
        complaint_id: "not-an-id".into(),
        satisfaction: 9,
        ..Default::default()
    };
    let status = refused(
        ingest.submit_feedback(authed(&env.tokens.gateway, bad)).await,
        Code::InvalidArgument,
        "invalid",
    )?;
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, vec!["complaint_id", "satisfaction"]);
    // A follow-up (no rating) must say something.
    let empty = SubmitFeedbackRequest {
        complaint_id: complaint.complaint_id.clone(),
        ..Default::default()
    };
    let status = ingest
        .submit_feedback(authed(&env.tokens.gateway, empty))
        .await
        .expect_err("empty follow-up");
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, vec!["comment"]);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_follow_up_joins_the_open_work_order() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let threaded = |id: &str, text: &str| ComplaintSubmission {
        thread_id: "weibo-thread-9".into(),
        ..post(id, text)
    };
    let first = env.submit(threaded("t-1", "宽带断网了")).await?;
    env.wait_idle().await?;
    let follow_up = env.submit(threaded("t-2", "还没修好，已经第三次了")).await?;
    env.wait_idle().await?;

    let mut client = env.work_orders().await?;
    let status_of = |id: &str| GetComplaintStatusRequest {
        complaint_id: id.to_owned(),
    };
    let opened = client
        .get_complaint_status(authed(&env.tokens.agent, status_of(&first.complaint_id)))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order"))?;
    let joined = client
        .get_complaint_status(authed(&env.tokens.agent, status_of(&follow_up.complaint_id)))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order"))?;
    assert_eq!(joined.work_order_id, opened.work_order_id, "the follow-up joined");
    assert_eq!(joined.version, 2, "attaching is a versioned change");
    assert_eq!(work_orders(&env).await?.len(), 1);

    // Once resolved, the thread's next message opens a new work order.
    client
        .resolve_work_order(authed(
            &env.tokens.agent,
            ResolveWorkOrderRequest {
                work_order_id: opened.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    env.submit(threaded("t-3", "又断网了")).await?;
    env.wait_idle().await?;
    wait_until("a second work order", WAIT, || async {
        work_orders(&env).await.map(|w| w.len() == 2).unwrap_or(false)
    })
    .await?;
    env.shutdown().await
}
