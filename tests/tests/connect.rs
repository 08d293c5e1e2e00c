//! The connect service against a local fake of the WeChat API, on real NATS (and, for the
//! whole loop, the four services on real PostgreSQL): replies and closure messages go out
//! through WeChat's own API, through an expiring token and rate limits, as template
//! messages where the customer-service window is closed, and never twice, whether notify
//! retries or connect is killed mid-call.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use closedloop_e2e::fake_wechat::{FakeWechat, encrypted_push, signed_query, text_push};
use closedloop_e2e::fake_weibo::{FakeWeibo, TakenReply, private_message_push};
use closedloop_e2e::servers::{NatsServer, nats_password};
use closedloop_e2e::system::{
    TestEnv, WECHAT_AES_KEY, WECHAT_APP_ID, WECHAT_SAFE_TOKEN, WEIBO_PUSH_SECRET, authed, contact,
};
use closedloop_e2e::{free_port, wait_for, wait_until};
use closedloop_proto::v1::*;
use closedloop_runtime::auth::hash_token;
use closedloop_runtime::webhook::{SIGNATURE_HEADER, WebhookMessage, sign};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const APP_ID: &str = "wx5e1f0a2b3c4d5e6f";
const APP_SECRET: &str = "fake-app-secret";
const TEMPLATE_ID: &str = "tmpl-work-order-update";
const CONNECT_SECRET: &str = "connect-webhook-secret";

/// Connect's command line: on `nats_url` as its own bus user, WeChat at `fake`.
fn connect_args(nats_url: &str, http_port: u16, fake: &FakeWechat) -> Vec<String> {
    [
        "closedloop-connect",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-listen",
        &format!("127.0.0.1:{http_port}"),
        "--nats-url",
        nats_url,
        "--nats-user",
        "connect",
        "--nats-password",
        &nats_password("connect"),
        "--webhook-secret",
        CONNECT_SECRET,
        "--wechat-apps",
        &format!("acme={APP_ID}|{APP_SECRET}|{TEMPLATE_ID}|thing1"),
        "--wechat-api",
        &fake.url(),
        "--api-timeout-secs",
        "1",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Connect in process until `cancel` fires.
async fn start_connect(
    nats_url: &str,
    http_port: u16,
    fake: &FakeWechat,
    cancel: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    run_connect(connect_args(nats_url, http_port, fake), cancel).await
}

async fn run_connect(
    args: Vec<String>,
    cancel: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let config = closedloop_connect::Config::try_parse_from(args)?;
    let connect = closedloop_connect::Connect::build(config, cancel).await?;
    Ok(tokio::spawn(connect.run(cancel.clone())))
}

/// A webhook as notify signs it, for a WeChat delivery to `openid`.
fn webhook(delivery_id: &str, openid: &str, text: &str) -> (String, Vec<u8>) {
    webhook_on("wechat", delivery_id, openid, text)
}

fn webhook_on(channel: &str, delivery_id: &str, recipient: &str, text: &str) -> (String, Vec<u8>) {
    let message = WebhookMessage {
        delivery_id: delivery_id.into(),
        tenant: "acme".into(),
        kind: "acknowledgement".into(),
        channel: channel.into(),
        recipient: recipient.into(),
        reply_to_message_id: "".into(),
        thread_id: "".into(),
        complaint_id: "".into(),
        work_order_id: "".into(),
        text: text.into(),
    };
    let body = serde_json::to_vec(&message).unwrap_or_default();
    (format!("sha256={}", sign(CONNECT_SECRET.as_bytes(), &body)), body)
}

async fn post(port: u16, (signature, body): &(String, Vec<u8>)) -> anyhow::Result<(u16, String)> {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/deliveries"))
        .header(SIGNATURE_HEADER, signature)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// How many messages WeChat took for each customer.
fn per_customer(fake: &FakeWechat) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in fake.taken() {
        *counts.entry(message.touser).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_closures_go_out_through_the_wechat_api_once() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let fake = FakeWechat::start(APP_ID, APP_SECRET, stop.clone()).await?;
    let connect_port = free_port()?;
    let env = TestEnv::start_with(|options| {
        options.gateways.push_str(&format!(
            ";wechat=http://127.0.0.1:{connect_port}/deliveries|{CONNECT_SECRET}"
        ));
        // Tenant acme's official account in safe mode.
        options.wechat_accounts = format!("acme={WECHAT_SAFE_TOKEN}|{WECHAT_APP_ID}|{WECHAT_AES_KEY}");
    })
    .await?;
    let connect = start_connect(&env.nats.service_url(), connect_port, &fake, &stop).await?;

    // Customer A writes to the account: an encrypted push to ingest's callback.
    let now = chrono::Utc::now().timestamp().to_string();
    let (query, body) = encrypted_push(
        WECHAT_SAFE_TOKEN,
        WECHAT_APP_ID,
        WECHAT_AES_KEY,
        &now,
        "n-1",
        &text_push("oCustomerA", "24000000000000001", "家里宽带断了，一直连不上"),
    )?;
    let pushed = reqwest::Client::new()
        .post(format!("http://{}/wechat/acme?{query}", env.system.ingest_http))
        .body(body)
        .send()
        .await?;
    assert_eq!(pushed.status().as_u16(), 200);

    // Three more customers through a gateway: two inside the customer-service window, one
    // outside it.
    fake.close_window("oCustomerZ");
    let submit = |message_id: &str, openid: &str| {
        env.submit(contact(
            Channel::Wechat,
            message_id,
            openid,
            0,
            "家里宽带断了，一直连不上",
        ))
    };
    let mut complaints = HashMap::new();
    // The push's message again, as a gateway would retry it: the same complaint, its id.
    let again = submit("24000000000000001", "oCustomerA").await?;
    assert!(again.duplicate, "the push was stored once");
    complaints.insert("oCustomerA", again.complaint_id);
    for (message_id, openid) in [
        ("m-2", "oCustomerB"),
        ("m-3", "oCustomerC"),
        ("m-4", "oCustomerZ"),
    ] {
        complaints.insert(openid, submit(message_id, openid).await?.complaint_id);
    }
    wait_until("four first replies on WeChat", WAIT, || async {
        fake.taken().len() >= 4
    })
    .await?;

    // The token expires and the rate limit bites while more complaints arrive.
    fake.expire_token();
    fake.rate_limit_next(2);
    for (message_id, openid) in [("m-5", "oCustomerD"), ("m-6", "oCustomerE")] {
        complaints.insert(openid, submit(message_id, openid).await?.complaint_id);
    }
    wait_until("six first replies on WeChat", WAIT, || async {
        fake.taken().len() >= 6
    })
    .await?;

    // An agent resolves customer A's work order: the closure goes out on WeChat too.
    let work_order = env.work_order_for(&complaints["oCustomerA"]).await?;
    env.resolve(&work_order, "光猫已更换").await?;
    // The acknowledgement, the closure and the satisfaction survey.
    wait_until("the closure and survey on WeChat", WAIT, || async {
        per_customer(&fake).get("oCustomerA") == Some(&3)
    })
    .await?;
    env.wait_idle().await?;

    let taken = fake.taken();
    let counts = per_customer(&fake);
    assert_eq!(counts.len(), 6, "{taken:?}");
    for (openid, count) in &counts {
        let expected = if openid == "oCustomerA" { 3 } else { 1 };
        assert_eq!(*count, expected, "messages to {openid}: {taken:?}");
    }
    let to_a: Vec<&str> = taken
        .iter()
        .filter(|m| m.touser == "oCustomerA")
        .map(|m| m.text.as_str())
        .collect();
    assert!(
        to_a[0].contains("已收到") && to_a[1].contains("光猫已更换") && to_a[2].contains("满意"),
        "{to_a:?}"
    );
    for message in &taken {
        if message.touser == "oCustomerZ" {
            assert_eq!(
                (message.api, message.template_id.as_str()),
                ("template", TEMPLATE_ID)
            );
        } else {
            assert_eq!(message.api, "custom", "{message:?}");
        }
    }
    // Notify's delivery log says how each went out, as connect answered.
    let notifications = env.notifications().await?;
    let receipts = |recipient: &'static str| {
        let request = authed(
            &env.tokens.agent,
            ListDeliveriesRequest {
                recipient: recipient.into(),
                kind: NotificationKind::Acknowledgement as i32,
                ..Default::default()
            },
        );
        let mut notifications = notifications.clone();
        async move {
            let listed = notifications.list_deliveries(request).await?.into_inner();
            anyhow::Ok(
                listed
                    .deliveries
                    .into_iter()
                    .map(|d| d.receipt)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let template: serde_json::Value =
        serde_json::from_str(receipts("oCustomerZ").await?.first().map_or("", String::as_str))?;
    assert_eq!(template["method"], "template", "{template}");
    assert!(
        template["platform_message_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let custom: serde_json::Value =
        serde_json::from_str(receipts("oCustomerB").await?.first().map_or("", String::as_str))?;
    assert_eq!(custom["method"], "custom", "{custom}");

    // The errors were met, and one token replaced the expired one.
    assert!(
        fake.answers_with(42001) >= 1,
        "the expired token was used and refused"
    );
    assert_eq!(fake.answers_with(45011), 2, "both rate-limit answers were met");
    assert_eq!(fake.answers_with(45015), 1, "one customer outside the window");
    assert_eq!(fake.tokens_issued(), 2, "one token, then one refresh");
    // Nothing for WeChat went to the generic gateway.
    assert!(
        env.webhook
            .messages()
            .iter()
            .all(|m| m.field("channel") != "wechat"),
        "WeChat messages went to the webhook gateway"
    );
    assert_eq!(closedloop_e2e::dead_letter_count(&env.nats.url()).await?, 0);

    stop.cancel();
    connect.await??;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_token_and_a_retry_is_answered_from_the_record() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let stop = CancellationToken::new();
    let fake = FakeWechat::start(APP_ID, APP_SECRET, stop.clone()).await?;
    let ports = [free_port()?, free_port()?];
    let mut replicas = Vec::new();
    for port in ports {
        replicas.push(start_connect(&nats.service_url(), port, &fake, &stop).await?);
    }

    // Twenty deliveries at once, spread over both replicas; then the token expires and
    // twenty more go.
    let send_round = |round: usize| {
        futures::future::join_all((0..20).map(move |i| {
            let delivery = webhook(
                &uuid::Uuid::new_v4().to_string(),
                &format!("oRound{round}Customer{i}"),
                "已收到您的反馈",
            );
            async move { post(ports[i % 2], &delivery).await }
        }))
    };
    for answer in send_round(1).await {
        assert_eq!(answer?.0, 200);
    }
    assert_eq!(fake.tokens_issued(), 1, "one token for both replicas");
    fake.expire_token();
    for answer in send_round(2).await {
        assert_eq!(answer?.0, 200);
    }
    assert_eq!(fake.tokens_issued(), 2, "one refresh for both replicas");
    assert_eq!(fake.taken().len(), 40);

    // The same delivery again, to either replica: answered as before, not sent again.
    let delivery = webhook(&uuid::Uuid::new_v4().to_string(), "oRetried", "已收到");
    let first = post(ports[0], &delivery).await?;
    assert_eq!(first.0, 200);
    assert_eq!(post(ports[1], &delivery).await?, first);
    assert_eq!(post(ports[0], &delivery).await?, first);
    assert_eq!(per_customer(&fake).get("oRetried"), Some(&1));

    // A forged webhook and a channel connect does not serve are refused for good.
    let (_, body) = webhook(&uuid::Uuid::new_v4().to_string(), "oForged", "x");
    assert_eq!(post(ports[0], &("sha256=00".to_owned(), body)).await?.0, 401);
    assert!(!per_customer(&fake).contains_key("oForged"));
    let weibo = webhook_on(
        "weibo_post",
        &uuid::Uuid::new_v4().to_string(),
        "weibo-uid-1",
        "x",
    );
    let (status, reason) = post(ports[0], &weibo).await?;
    assert_eq!(status, 422, "{reason}");

    stop.cancel();
    for replica in replicas {
        replica.await??;
    }
    Ok(())
}

/// Kills `child` with SIGKILL and reaps it.
fn kill(child: &mut Child) -> anyhow::Result<()> {
    child.kill()?;
    child.wait()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_off_by_a_crash_is_never_sent_twice() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let stop = CancellationToken::new();
    let fake = FakeWechat::start(APP_ID, APP_SECRET, stop.clone()).await?;
    let binary = closedloop_e2e::processes::bin_dir()?.join("closedloop-connect");
    anyhow::ensure!(
        binary.exists(),
        "{} not found: cargo build --bins first",
        binary.display()
    );
    let spawn = |port: u16| -> anyhow::Result<Child> {
        let args = connect_args(&nats.service_url(), port, &fake);
        Ok(Command::new(&binary)
            .args(&args[1..])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    };
    let port = free_port()?;
    let mut first = spawn(port)?;
    let healthy = || async {
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    wait_until("connect to answer", WAIT, healthy).await?;

    // WeChat takes the message and answers late; connect is killed before the answer.
    fake.hold_next(1, Duration::from_secs(30));
    let delivery = webhook(&uuid::Uuid::new_v4().to_string(), "oCutOff", "已收到您的反馈");
    let pending = tokio::spawn({
        let delivery = delivery.clone();
        async move { post(port, &delivery).await }
    });
    wait_until("WeChat to take the message", WAIT, || async {
        per_customer(&fake).get("oCutOff") == Some(&1)
    })
    .await?;
    kill(&mut first)?;
    assert!(
        pending.await?.is_err(),
        "the caller lost its answer with the process"
    );

    // Notify retries against a new process: never sent again. While the cut-off call could
    // still be running the answer is "later"; after that, "outcome unknown", for good.
    let mut second = spawn(port)?;
    wait_until("connect to answer again", WAIT, healthy).await?;
    let (status, _) = post(port, &delivery).await?;
    assert_eq!(status, 429, "the first call's time is not up yet");
    let (status, reason) = wait_for("the outcome to be called unknown", WAIT, || {
        let delivery = delivery.clone();
        async move {
            post(port, &delivery)
                .await
                .ok()
                .filter(|(status, _)| *status != 429)
        }
    })
    .await?;
    assert_eq!(status, 422);
    assert!(reason.starts_with("outcome unknown"), "{reason}");
    assert_eq!(per_customer(&fake).get("oCutOff"), Some(&1), "sent once");

    // A delivery after the restart goes out as usual.
    let fresh = webhook(&uuid::Uuid::new_v4().to_string(), "oAfterRestart", "已收到");
    assert_eq!(post(port, &fresh).await?.0, 200);
    kill(&mut second)?;
    stop.cancel();
    Ok(())
}

const WEIBO_BRAND: &str = "5000000001";
const WEIBO_TOKEN: &str = "weibo-token-0";
const WEIBO_REFRESH: &str = "weibo-refresh-0";
const WEIBO_APP: (&str, &str) = ("weibo-app-key", "weibo-app-secret");

/// Connect's arguments that point every Weibo API at `weibo`.
fn weibo_api_args(weibo: &FakeWeibo) -> Vec<String> {
    ["--weibo-api", "--weibo-search-api", "--weibo-messages-api"]
        .into_iter()
        .flat_map(|flag| [flag.to_owned(), weibo.url()])
        .collect()
}
/// The API token connect submits with for tenant `acme` (roles gateway and viewer).
const CONNECT_API_TOKEN: &str = "connect-api-token";

/// The replies Weibo took about post or comment `id`.
fn replies_about(weibo: &FakeWeibo, id: &str) -> Vec<TakenReply> {
    weibo
        .replies()
        .into_iter()
        .filter(|r| {
            (r.api == "comment_reply" && r.comment_id == id) || (r.api == "comment" && r.status_id == id)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weibo_mentions_comments_and_search_are_heard_and_answered_on_weibo() -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let wechat = FakeWechat::start(APP_ID, APP_SECRET, stop.clone()).await?;
    let weibo = FakeWeibo::start(WEIBO_TOKEN, WEIBO_REFRESH, WEIBO_APP.0, WEIBO_APP.1, stop.clone()).await?;
    let connect_port = free_port()?;
    let env = TestEnv::start_with(|options| {
        for channel in ["weibo_post", "weibo_comment", "weibo_direct_message"] {
            options.gateways.push_str(&format!(
                ";{channel}=http://127.0.0.1:{connect_port}/deliveries|{CONNECT_SECRET}"
            ));
        }
        options.auth_tokens.push_str(&format!(
            ";acme:gateway,viewer:{}:connect",
            hash_token(CONNECT_API_TOKEN)
        ));
    })
    .await?;

    // Waiting on Weibo before the listener starts: a mention, a comment on the brand's
    // post, and three posts with the brand's keyword that never addressed it (a complaint,
    // a lottery repost, the brand's own). The listener's first call meets the rate limit.
    let mention = weibo.mention(
        "1001",
        2300,
        "@某电信客服 宽带断了三天了，客服电话一直占线，到底什么时候修好？",
    );
    let brand_post = "4800000000000001";
    let comment = weibo.comment("1002", brand_post, "你们家的光猫又坏了，这已经是第三次了");
    let searched = weibo.public_post(
        "1003",
        150_000,
        "某电信的信号太差了，地下室一格都没有，打电话一直断",
    );
    let noise = weibo.public_post("1004", 10, "转发抽奖 某电信 送流量 @小明 @小红 @小刚");
    let own = weibo.public_post(WEIBO_BRAND, 900_000, "某电信 冬季网络保障公告");
    weibo.rate_limit_next(1);

    let mut args = connect_args(&env.nats.service_url(), connect_port, &wechat);
    args.extend(weibo_api_args(&weibo));
    args.extend(
        [
            "--weibo-accounts",
            &format!(
                "acme={WEIBO_BRAND}|{WEIBO_TOKEN}|{WEIBO_REFRESH}|{}|{}",
                WEIBO_APP.0, WEIBO_APP.1
            ),
            "--weibo-keywords",
            "acme=某电信",
            "--weibo-poll-secs",
            "1",
            "--weibo-backoff-secs",
            "1",
            "--api-tokens",
            &format!("acme={CONNECT_API_TOKEN}"),
            "--ingest-url",
            &format!("http://{}", env.system.ingest),
            "--classify-url",
            &format!("http://{}", env.system.classify),
        ]
        .map(str::to_owned),
    );
    let connect = run_connect(args, &stop).await?;

    wait_until(
        "first replies on Weibo to the mention, the comment and the search hit",
        WAIT,
        || async {
            [&mention, &comment, &searched]
                .iter()
                .all(|id| !replies_about(&weibo, id).is_empty())
        },
    )
    .await?;

    // The token expires; fifty-five new mentions arrive at once (two pages of the feed).
    weibo.expire_token();
    let more: Vec<String> = (0..55)
        .map(|i| {
            weibo.mention(
                &format!("{}", 2000 + i),
                5,
                &format!("@某电信客服 我家手机没信号了，第{i}天"),
            )
        })
        .collect();
    wait_until("a reply to each of the new mentions", WAIT * 2, || async {
        more.iter().all(|id| !replies_about(&weibo, id).is_empty())
    })
    .await?;

    // Two mentions carrying a phone number: each customer is invited to a private channel,
    // privately where Weibo lets the brand write to them, else in public.
    weibo.open_private("1020");
    let private_post = weibo.mention("1020", 40, "@某电信客服 我的号码13812345678一直没信号");
    let public_post = weibo.mention("1021", 40, "@某电信客服 我的号码13912345678一直没信号");
    wait_until("both invitations", WAIT, || async {
        let replies = weibo.replies();
        replies
            .iter()
            .any(|r| r.api == "private_message" && r.receiver_id == "1020")
            && !replies_about(&weibo, &public_post).is_empty()
    })
    .await?;
    assert!(
        replies_about(&weibo, &private_post).is_empty(),
        "invited privately, not in public"
    );

    // A private message, pushed by Weibo's fan service to ingest's callback: the reply goes
    // back as a private message. The handshake is echoed; a forged push, and another
    // message under a signature already used, are refused; the push repeated is one
    // complaint.
    weibo.open_private("1010");
    let callback = format!("http://{}/weibo/acme", env.system.ingest_http);
    let http = reqwest::Client::new();
    let now_ms = chrono::Utc::now().timestamp_millis().to_string();
    let handshake = http
        .get(format!(
            "{callback}?{}&echostr=echo-1",
            signed_query(WEIBO_PUSH_SECRET, &now_ms, "nonce-1")
        ))
        .send()
        .await?;
    assert_eq!(handshake.status().as_u16(), 200);
    assert_eq!(handshake.text().await?, "echo-1");
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).ok_or_else(|| anyhow::anyhow!("UTC+8"))?;
    let sent_at = chrono::Utc::now()
        .with_timezone(&beijing)
        .format("%a %b %d %H:%M:%S %z %Y")
        .to_string();
    let push = private_message_push("1010", WEIBO_BRAND, &sent_at, "私信：这个月账单多扣了两百块");
    let signed = signed_query(WEIBO_PUSH_SECRET, &now_ms, "nonce-2");
    for _ in 0..2 {
        let pushed = http
            .post(format!("{callback}?{signed}"))
            .body(push.clone())
            .send()
            .await?;
        assert_eq!(pushed.status().as_u16(), 200, "{}", pushed.text().await?);
    }
    let forged = http
        .post(format!(
            "{callback}?{}",
            signed_query("not-the-app-secret", &now_ms, "nonce-3")
        ))
        .body(push.clone())
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 403);
    let other = private_message_push("1010", WEIBO_BRAND, &sent_at, "另一条消息");
    let replayed = http
        .post(format!("{callback}?{signed}"))
        .body(other)
        .send()
        .await?;
    assert_eq!(replayed.status().as_u16(), 403);
    wait_until("the private reply", WAIT, || async {
        weibo
            .replies()
            .iter()
            .any(|r| r.api == "private_message" && r.receiver_id == "1010")
    })
    .await?;

    // The mention's and the search hit's work orders are resolved: the closure and the
    // survey go out as comments on each post.
    for (post, uid) in [(&mention, "1001"), (&searched, "1003")] {
        // Submitted again, as a gateway would retry it: the same complaint, its id.
        let again = env
            .submit(contact(Channel::WeiboPost, post, uid, 0, "重复提交"))
            .await?;
        assert!(again.duplicate, "the listener submitted {post} once");
        let work_order = env.work_order_for(&again.complaint_id).await?;
        env.resolve(&work_order, "光缆已修复").await?;
    }
    wait_until("the closures and surveys on Weibo", WAIT, || async {
        replies_about(&weibo, &mention).len() == 3 && replies_about(&weibo, &searched).len() == 3
    })
    .await?;
    env.wait_idle().await?;

    // Each contact answered once (the mention and the search hit three times: reply,
    // closure, survey), on the Weibo API, as a comment, a reply to the comment, or a
    // private message.
    let replies = weibo.replies();
    assert_eq!(replies.len(), 3 + 1 + 3 + 55 + 2 + 1, "{replies:#?}");
    let private: Vec<&str> = replies
        .iter()
        .filter(|r| r.api == "private_message")
        .map(|r| r.receiver_id.as_str())
        .collect();
    assert_eq!(
        private,
        ["1020", "1010"],
        "the invitation and the reply to the private message"
    );
    let to_comment = replies_about(&weibo, &comment);
    assert_eq!(to_comment.len(), 1);
    assert_eq!(
        (to_comment[0].api, to_comment[0].status_id.as_str()),
        ("comment_reply", brand_post)
    );
    for id in more.iter().chain([&public_post]) {
        assert_eq!(replies_about(&weibo, id).len(), 1, "replies about {id}");
    }
    assert!(replies_about(&weibo, &noise).is_empty(), "noise is not answered");
    assert!(
        replies_about(&weibo, &own).is_empty(),
        "the brand's own post is not a contact"
    );
    assert!(replies.iter().all(|r| r.text.chars().count() <= 140));
    // The limits were met: one rate-limit answer, an expired token renewed once.
    assert_eq!(weibo.answers_with(10023), 1);
    assert!(weibo.answers_with(21327) >= 1);
    assert_eq!(weibo.refreshes(), 1, "one refresh of the expired token");
    let metrics = closedloop_runtime::metrics::render();
    for outcome in ["noise", "own"] {
        let series = format!(
            "closedloop_connect_found_total{{platform=\"weibo\",tenant=\"acme\",feed=\"search\",outcome=\"{outcome}\"}} 1"
        );
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    assert_eq!(closedloop_e2e::dead_letter_count(&env.nats.url()).await?, 0);

    stop.cancel();
    connect.await??;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_weibo_call_budget() -> anyhow::Result<()> {
    // An hour of ten calls, spent within one clock hour: start in a fresh one if this one
    // is about to end.
    let seconds_left = || 3600 - chrono::Utc::now().timestamp().rem_euclid(3600);
    if seconds_left() < 60 {
        let hour = chrono::Utc::now().timestamp().div_euclid(3600);
        wait_until("the next clock hour", Duration::from_secs(70), || async {
            chrono::Utc::now().timestamp().div_euclid(3600) > hour
        })
        .await?;
    }
    let nats = NatsServer::start()?;
    let stop = CancellationToken::new();
    let wechat = FakeWechat::start(APP_ID, APP_SECRET, stop.clone()).await?;
    let weibo = FakeWeibo::start(WEIBO_TOKEN, WEIBO_REFRESH, WEIBO_APP.0, WEIBO_APP.1, stop.clone()).await?;
    let ports = [free_port()?, free_port()?];
    let mut replicas = Vec::new();
    for port in ports {
        let mut args = connect_args(&nats.service_url(), port, &wechat);
        args.extend(weibo_api_args(&weibo));
        args.extend(
            [
                "--weibo-accounts",
                &format!("acme={WEIBO_BRAND}|{WEIBO_TOKEN}"),
                "--weibo-calls-per-hour",
                "10",
                // One listening round, at start: mentions and comments, two calls.
                "--weibo-poll-secs",
                "3600",
                "--api-tokens",
                "acme=unused",
            ]
            .map(str::to_owned),
        );
        replicas.push(run_connect(args, &stop).await?);
    }

    // Twenty private replies at once, spread over both replicas.
    let customers: Vec<String> = (0..20).map(|i| (3000 + i).to_string()).collect();
    for customer in &customers {
        weibo.open_private(customer);
    }
    let answers = futures::future::join_all(customers.iter().enumerate().map(|(i, customer)| {
        let delivery = webhook_on(
            "weibo_direct_message",
            &uuid::Uuid::new_v4().to_string(),
            customer,
            "已收到您的私信",
        );
        async move { post(ports[i % 2], &delivery).await }
    }))
    .await;
    let (mut sent, mut later) = (0, 0);
    for answer in answers {
        match answer? {
            (200, _) => sent += 1,
            (429, _) => later += 1,
            (status, body) => anyhow::bail!("answered {status}: {body}"),
        }
    }

    // Both replicas together made the hour's ten calls: the listener's round (two, or none
    // if the replies spent the polling share first) and the replies; the rest wait for the
    // next hour. Each replica alone would have allowed ten.
    wait_until("the hour's ten calls", WAIT, || async { weibo.calls() == 10 }).await?;
    let polls = weibo.calls() - weibo.replies().len();
    assert!(polls <= 2, "{polls} polling calls");
    assert_eq!(sent, weibo.replies().len(), "each reply answered 200 went out");
    assert_eq!((sent + polls, sent + later), (10, 20));

    stop.cancel();
    for replica in replicas {
        replica.await??;
    }
    Ok(())
}
