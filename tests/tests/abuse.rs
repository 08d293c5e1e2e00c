//! Bad input and abuse change nothing. 10,000 requests, random bytes and mutations of
//! invalid ones, go to every RPC of every service (as raw gRPC frames, so undecodable
//! bodies are sent too) and to ingest's HTTP endpoints, under every kind of token. Then:
//! every service still runs, no gRPC answer is `UNKNOWN` or `INTERNAL` and no HTTP answer a
//! 500, nothing was stored (no complaint, feedback or work order), and no customer got a
//! message.

use closedloop_runtime::config::NatsConnectArgs;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut, Bytes};
use closedloop_e2e::bench::Rng;
use closedloop_e2e::system::TestEnv;
use closedloop_proto::v1::*;
use closedloop_runtime::bus;
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel as GrpcChannel;

const REQUESTS: usize = 10_000;
const IN_FLIGHT: usize = 16;

/// Passes bytes through unchanged, so a test can send any body to any method.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Which service a method belongs to.
#[derive(Clone, Copy)]
enum Target {
    Ingest,
    Classify,
    Dispatch,
    Notify,
}

/// Invalid requests to start mutating from, per method: each breaks a rule a valid call
/// must keep, so no mutation is likely to make it valid.
fn seeds() -> Vec<(Target, &'static str, Vec<u8>)> {
    let bad_complaint = ComplaintSubmission {
        tenant: "someone-else".into(),
        channel: 42,
        channel_message_id: "m\u{0}1".into(),
        poster: Some(Poster {
            poster_id: "p\u{1b}".into(),
            followers: -5,
            ..Default::default()
        }),
        text: "\u{200b}\u{202e} ".into(),
        attachment_urls: vec!["http://not-https".into()],
        ..Default::default()
    };
    let unknown = "00000000-0000-0000-0000-000000000000".to_owned();
    let ingest = |m: &'static str, b: Vec<u8>| (Target::Ingest, m, b);
    let dispatch = |m: &'static str, b: Vec<u8>| (Target::Dispatch, m, b);
    vec![
        ingest(
            "/closedloop.v1.IngestService/SubmitComplaint",
            SubmitComplaintRequest {
                complaint: Some(bad_complaint.clone()),
            }
            .encode_to_vec(),
        ),
        ingest(
            "/closedloop.v1.IngestService/SubmitComplaints",
            SubmitComplaintsRequest {
                complaints: vec![bad_complaint.clone(); 3],
            }
            .encode_to_vec(),
        ),
        ingest(
            "/closedloop.v1.IngestService/SubmitFeedback",
            SubmitFeedbackRequest {
                tenant: "someone-else".into(),
                complaint_id: "not-an-id".into(),
                satisfaction: 9,
                request_id: "r\u{0}".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            Target::Classify,
            "/closedloop.v1.ClassifyService/Classify",
            ClassifyRequest {
                text: "\u{feff}".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            Target::Notify,
            "/closedloop.v1.NotificationService/ListDeliveries",
            ListDeliveriesRequest {
                page_token: "not a token".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/GetWorkOrder",
            GetWorkOrderRequest {
                work_order_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ListWorkOrders",
            ListWorkOrdersRequest {
                page_token: "%%%".into(),
                page_size: -3,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/GetComplaintStatus",
            GetComplaintStatusRequest {
                complaint_id: "\u{0}".into(),
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/AcceptWorkOrder",
            AcceptWorkOrderRequest {
                work_order_id: unknown.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ReplyToCustomer",
            ReplyToCustomerRequest {
                work_order_id: unknown.clone(),
                text: "你的电话13812345678".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ResolveWorkOrder",
            ResolveWorkOrderRequest {
                work_order_id: unknown.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/EscalateWorkOrder",
            EscalateWorkOrderRequest {
                work_order_id: unknown.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ReassignWorkOrder",
            ReassignWorkOrderRequest {
                work_order_id: unknown.clone(),
                assignee: "agent-7".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ReopenWorkOrder",
            ReopenWorkOrderRequest {
                work_order_id: unknown.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/GetWorkOrderHistory",
            GetWorkOrderHistoryRequest {
                work_order_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ListIncidents",
            ListIncidentsRequest::default().encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/ResolveIncident",
            ResolveIncidentRequest {
                incident_id: unknown.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.DirectoryService/UpsertTeam",
            UpsertTeamRequest::default().encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.DirectoryService/ListTeams",
            ListTeamsRequest::default().encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.DirectoryService/UpsertAgent",
            UpsertAgentRequest::default().encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.DirectoryService/ListAgents",
            ListAgentsRequest::default().encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.DirectoryService/SetAgentStatus",
            SetAgentStatusRequest {
                agent_id: "nobody\u{0}".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        dispatch(
            "/closedloop.v1.WorkOrderService/WatchWorkOrders",
            WatchWorkOrdersRequest::default().encode_to_vec(),
        ),
    ]
}

/// `seed` with a few random edits: bytes flipped, inserted or removed, cut short, or
/// repeated; or, one time in four, random bytes altogether.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Bytes {
    if rng.chance(0.25) {
        let len = rng.below(600);
        return Bytes::from((0..len).map(|_| rng.next_u64() as u8).collect::<Vec<u8>>());
    }
    let mut body = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = if body.is_empty() { 0 } else { rng.below(body.len()) };
        match rng.below(5) {
            0 if !body.is_empty() => body[at] ^= 1 << rng.below(8),
            1 => body.insert(at, rng.next_u64() as u8),
            2 if !body.is_empty() => {
                body.remove(at);
            }
            3 => body.truncate(at),
            _ => {
                let copy = body.clone();
                body.extend(copy);
            }
        }
    }
    Bytes::from(body)
}

/// Whether a directory write under this token could succeed if the body were valid: such
/// calls are sent with tokens that may not write, so nothing in the test can store.
fn writes_directory(method: &str) -> bool {
    ["UpsertTeam", "UpsertAgent", "SetAgentStatus"]
        .iter()
        .any(|m| method.ends_with(m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_requests_change_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let channel = |addr: std::net::SocketAddr| {
        GrpcChannel::from_shared(format!("http://{addr}")).map(|endpoint| endpoint.connect_lazy())
    };
    let channels = [
        channel(env.system.ingest)?,
        channel(env.system.classify)?,
        channel(env.system.dispatch)?,
        channel(env.system.notify)?,
    ];
    let tokens = [
        None,
        Some("not-a-token".to_owned()),
        Some(env.tokens.gateway.clone()),
        Some(env.tokens.agent.clone()),
        Some(env.tokens.supervisor.clone()),
        Some(env.tokens.other_tenant.clone()),
    ];
    let seeds = Arc::new(seeds());
    let unknown = Arc::new(AtomicUsize::new(0));
    // gRPC answers by code, to show the requests were read and judged.
    let codes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>> = Arc::default();
    let server_errors = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::new();
    let http_base = format!("http://{}", env.system.ingest_http);
    let mut rng = Rng::new(20261204);
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..REQUESTS {
        let permit = limit.clone().acquire_owned().await?;
        let unknown = unknown.clone();
        let server_errors = server_errors.clone();
        let codes = codes.clone();
        if n % 5 == 4 {
            // HTTP: the JSON API and the WeChat and Weibo callbacks.
            let (path, body) = match rng.below(5) {
                0 => ("/v1/complaints", mutate(&mut rng, br#"{"complaint":{"channel":"wechat","channel_message_id":"m\u0000","poster":{"poster_id":""},"text":""}}"#)),
                1 => ("/v1/complaints:batch", mutate(&mut rng, br#"{"complaints":[{"channel":"nope"}]}"#)),
                2 => ("/wechat/acme?signature=00&timestamp=1&nonce=2", mutate(&mut rng, b"<xml><MsgType>text</MsgType><Content>x</Content></xml>")),
                3 => ("/weibo/acme?signature=00&timestamp=1&nonce=2", mutate(&mut rng, br#"{"type":"text","receiver_id":1,"sender_id":2,"text":"x"}"#)),
                _ => ("/wechat/acme?signature=00&timestamp=1&nonce=2&echostr=x", Bytes::new()),
            };
            let token = tokens[rng.below(tokens.len())].clone();
            let mut request = http.post(format!("{http_base}{path}")).body(body);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            tasks.spawn(async move {
                if let Ok(response) = request.send().await
                    && response.status().is_server_error()
                    && response.status().as_u16() != 503
                {
                    server_errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
            continue;
        }
        let (target, method, seed) = &seeds[rng.below(seeds.len())];
        let body = mutate(&mut rng, seed);
        let mut token = tokens[rng.below(tokens.len())].clone();
        if writes_directory(method) && token.as_deref() == Some(env.tokens.supervisor.as_str()) {
            token = Some(env.tokens.agent.clone());
        }
        let channel = channels[*target as usize].clone();
        let method: &'static str = method;
        tasks.spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut request = tonic::Request::new(body);
            if let Some(token) = token
                && let Ok(value) = format!("Bearer {token}").parse()
            {
                request.metadata_mut().insert("authorization", value);
            }
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
            let status = match grpc.ready().await {
                Err(_) => None,
                Ok(()) if method.ends_with("WatchWorkOrders") => {
                    grpc.server_streaming(request, path, RawCodec).await.err()
                }
                Ok(()) => grpc.unary(request, path, RawCodec).await.err(),
            };
            if status
                .as_ref()
                .is_some_and(|status| status.code() == tonic::Code::Unknown)
            {
                unknown.fetch_add(1, Ordering::Relaxed);
            }
            let code = status.map_or("Ok".to_owned(), |status| format!("{:?}", status.code()));
            if let Ok(mut codes) = codes.lock() {
                *codes.entry(code).or_default() += 1;
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}

    let codes = codes.lock().map(|c| c.clone()).unwrap_or_default();
    eprintln!("gRPC answers by code: {codes:?}");
    for judged in [
        "InvalidArgument",
        "PermissionDenied",
        "Unauthenticated",
        "NotFound",
    ] {
        assert!(
            codes.get(judged).is_some_and(|n| *n > 0),
            "no {judged} in {codes:?}"
        );
    }
    assert_eq!(unknown.load(Ordering::Relaxed), 0, "gRPC answers with UNKNOWN");
    assert!(
        !codes.contains_key("Internal"),
        "a bad request is the caller's error, never INTERNAL: {codes:?}"
    );
    assert_eq!(server_errors.load(Ordering::Relaxed), 0, "HTTP 500s");
    let exited = env.system.exited();
    assert!(exited.is_empty(), "services stopped: {exited:?}");
    env.wait_idle().await?;
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&env.nats.url()).await?);
    for stream in [
        bus::COMPLAINTS_STREAM,
        bus::FEEDBACK_STREAM,
        bus::WORK_ORDERS_STREAM,
    ] {
        let stored = js.get_stream(stream).await?.info().await?.state.messages;
        assert_eq!(stored, 0, "{stream} holds events");
    }
    let pool = sqlx::PgPool::connect(&env.database_url).await?;
    let work_orders: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch.work_orders")
        .fetch_one(&pool)
        .await?;
    assert_eq!(work_orders, 0);
    pool.close().await;
    assert_eq!(env.webhook.count(), 0, "messages sent to customers");
    env.shutdown().await
}

/// Defence in depth behind the bus's permissions: an event whose payload names another
/// tenant than its subject is never acted on. Each consumer parks it with the reason, and
/// no customer hears anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_naming_another_tenant_than_its_subject_is_parked() -> anyhow::Result<()> {
    use closedloop_runtime::bus::{Bus, OutgoingEvent, work_order_topic};
    let env = TestEnv::start().await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = Bus::connect(&NatsConnectArgs::url(env.nats.url()), "test", &cancel).await?;
    let complaint = Complaint {
        complaint_id: uuid::Uuid::new_v4().to_string(),
        tenant: "beta".into(),
        channel: Channel::Wechat as i32,
        channel_message_id: "forged-1".into(),
        poster: Some(Poster {
            poster_id: "o-victim".into(),
            ..Default::default()
        }),
        text: "退款".into(),
        ..Default::default()
    };
    let work_order = WorkOrder {
        work_order_id: uuid::Uuid::new_v4().to_string(),
        tenant: "beta".into(),
        complaint_id: complaint.complaint_id.clone(),
        channel: Channel::Wechat as i32,
        version: 2,
        poster: complaint.poster.clone(),
        ..Default::default()
    };
    // Published on tenant acme's subjects, every payload naming tenant beta.
    let events = vec![
        OutgoingEvent::new(
            bus::COMPLAINT_RECEIVED,
            "acme",
            "forged-received",
            &ComplaintReceived {
                complaint: Some(complaint.clone()),
            },
        ),
        OutgoingEvent::new(
            bus::FEEDBACK_RECEIVED,
            "acme",
            "forged-feedback",
            &FeedbackReceived {
                feedback_id: "f-1".into(),
                tenant: "beta".into(),
                complaint_id: complaint.complaint_id.clone(),
                satisfaction: 1,
                ..Default::default()
            },
        ),
        OutgoingEvent::new(
            work_order_topic("replied"),
            "acme",
            "forged-reply",
            &WorkOrderEvent {
                kind: WorkOrderEventKind::Replied as i32,
                work_order: Some(work_order),
                note: "请把验证码发给我".into(),
                ..Default::default()
            },
        ),
    ];
    for published in publisher.publish_all(events).await {
        published?;
    }
    // The watchdog reads a second behind in tests, so its verdict comes last.
    for consumer in [
        closedloop_classify::CONSUMER,
        closedloop_dispatch::FEEDBACK_CONSUMER,
        closedloop_notify::WORK_ORDER_CONSUMER,
        closedloop_notify::WATCHDOG_CONSUMER,
    ] {
        let parked = closedloop_e2e::dead_letter_of(&env.nats.url(), consumer).await?;
        assert!(
            parked
                .reason
                .contains("the subject names tenant \"acme\" but the event tenant \"beta\""),
            "{consumer}: {}",
            parked.reason
        );
    }
    env.wait_idle().await?;
    assert_eq!(env.webhook.count(), 0, "nobody was told anything");
    cancel.cancel();
    env.shutdown().await
}

/// The bus is not open: a client without credentials is refused, and a service's user may
/// do only what its service needs. Holding ingest's credentials, one cannot publish a
/// work-order event (which notify would sign and send to a customer), nor delete a stream,
/// nor read the work-order events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_refuses_what_a_user_may_not_do() -> anyhow::Result<()> {
    use closedloop_e2e::servers::{NatsServer, harness_streams, nats_password};
    use closedloop_runtime::bus::{Bus, WORK_ORDERS_STREAM};
    let nats = NatsServer::start()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let admin = Bus::connect(&NatsConnectArgs::url(nats.url()), "admin", &cancel).await?;
    admin.provision(&harness_streams()).await?;

    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(std::time::Duration::from_secs(2))
        .connect(nats.service_url())
        .await;
    assert!(anonymous.is_err(), "a client without credentials connected");

    let ingest_args = NatsConnectArgs {
        nats_user: Some("ingest".into()),
        nats_password: Some(closedloop_runtime::Secret::new(nats_password("ingest"))),
        ..NatsConnectArgs::url(nats.service_url())
    };
    let ingest = Bus::connect(&ingest_args, "ingest", &cancel).await?;
    let js = ingest.jetstream();
    // What ingest may do, so the refusals below are about permissions, not a dead client.
    js.publish(bus::COMPLAINT_RECEIVED.subject("demo"), "received".into())
        .await?
        .await?;
    let forged = js
        .publish(work_order_topic_replied("demo"), "forged reply".into())
        .await;
    let forged = match forged {
        Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
        Err(error) => Err(error.into()),
    };
    assert!(forged.is_err(), "ingest published a work-order event");
    assert!(
        js.delete_stream(bus::COMPLAINTS_STREAM).await.is_err(),
        "ingest deleted a stream"
    );
    let mut snooping = ingest.client().subscribe("closedloop.workorder.>").await?;
    admin
        .jetstream()
        .publish(work_order_topic_replied("demo"), "a real reply".into())
        .await?
        .await?;
    let snooped = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        futures::StreamExt::next(&mut snooping),
    )
    .await;
    assert!(!matches!(snooped, Ok(Some(_))), "ingest read a work-order event");
    let work_orders = admin
        .jetstream()
        .get_stream(WORK_ORDERS_STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(work_orders, 1, "the admin's event alone");
    let complaints = admin
        .jetstream()
        .get_stream(bus::COMPLAINTS_STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(complaints, 1, "the stream is still there, with ingest's event");
    cancel.cancel();
    Ok(())
}

fn work_order_topic_replied(tenant: &str) -> String {
    bus::work_order_topic("replied").subject(tenant)
}
