//! The gRPC server every service runs: its own services behind the [`Authenticator`],
//! plus `grpc.health.v1.Health` and server reflection, with graceful shutdown. Health turns
//! NOT_SERVING as soon as shutdown starts, so load balancers stop sending new calls while
//! in-flight ones finish.
//!
//! Also the helpers that turn validation failures into `INVALID_ARGUMENT` with
//! `google.rpc.BadRequest` field violations.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status};
use tonic_health::ServingStatus;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

pub use crate::auth::Authenticator;

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the listen address (port 0 picks a free port; read it back with `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GrpcError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GrpcError::Bind { addr, source })
}

/// The connections `listener` accepts, with `TCP_NODELAY` set on each. Without it a
/// response written in pieces (headers, then body, then trailers) waits for the client's
/// delayed ACK: a flat ~40 ms on every small call.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// `listener` for `axum::serve`, with `TCP_NODELAY` set on every accepted connection, for
/// the same reason as [`incoming`].
pub fn http_listener(listener: TcpListener) -> impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream: &mut TcpStream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
    })
}

/// Serves `routes` (the service's own gRPC services, named in `service_names` for health)
/// until `cancel` fires, then finishes in-flight calls and returns.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    cancel: CancellationToken,
) -> Result<(), GrpcError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in service_names.iter().copied().chain([""]) {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    // Both reflection versions: many clients (older grpcurl, Postman, Python tools) still
    // ask v1alpha.
    // Advertise only what this port serves, though the descriptor set holds every service.
    let reflection = || {
        service_names.iter().copied().chain([HEALTH_SERVICE]).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(closedloop_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(name),
        )
    };
    let routes = routes
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let names: Vec<String> = service_names.iter().map(|n| (*n).to_owned()).collect();
    let shutdown = async move {
        cancel.cancelled().await;
        for name in names.iter().map(String::as_str).chain([""]) {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
    };
    tonic::transport::Server::builder()
        .layer(crate::telemetry::GrpcTraceLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}

/// One validation failure: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// `INVALID_ARGUMENT` naming every offending field, as `google.rpc.BadRequest` details and
/// in the message for clients that do not read details.
pub fn invalid_argument(violations: &[Violation]) -> Status {
    let summary = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .iter()
            .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {summary}"),
        details,
    )
}

/// What a page token is valid for: one tenant and one set of filters. A token carries where
/// its listing stopped and a digest of its scope; replayed by another tenant or with other
/// filters it is refused, rather than silently paging through a different listing. (The
/// listing is scoped by the caller's tenant whatever the token says; the digest makes misuse
/// an error instead of a wrong page.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageScope {
    digest: [u8; PAGE_SCOPE_DIGEST],
}

const PAGE_SCOPE_DIGEST: usize = 12;

/// A page token that this listing did not issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("is not a token this listing issued to this tenant for these filters")]
pub struct ForeignPageToken;

impl PageScope {
    /// The scope of a listing by `tenant` with `filters`, given in one canonical spelling
    /// (e.g. the `Debug` of the filter struct, so that a new filter is bound too).
    pub fn new(tenant: &str, filters: &str) -> Self {
        use sha2::Digest as _;
        let hash = sha2::Sha256::new()
            .chain_update(tenant.len().to_le_bytes())
            .chain_update(tenant)
            .chain_update(filters)
            .finalize();
        let mut digest = [0; PAGE_SCOPE_DIGEST];
        digest.copy_from_slice(&hash[..PAGE_SCOPE_DIGEST]);
        Self { digest }
    }

    /// The scope of a listing by `tenant` with these filters, spelled by their `Debug`, so a
    /// filter added to the struct is bound too.
    pub fn of(tenant: &str, filters: &impl std::fmt::Debug) -> Self {
        Self::new(tenant, &format!("{filters:?}"))
    }

    /// An opaque token (URL-safe base64) for the next page, which starts after `position`.
    pub fn seal(&self, position: &str) -> String {
        use base64::Engine as _;
        let mut raw = self.digest.to_vec();
        raw.extend_from_slice(position.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// The position in `token`: `None` for the first page (an empty token), an error for a
    /// token issued for another scope or not by this API.
    pub fn open(&self, token: &str) -> Result<Option<String>, ForeignPageToken> {
        use base64::Engine as _;
        if token.is_empty() {
            return Ok(None);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| ForeignPageToken)?;
        let (digest, position) = raw.split_at_checked(PAGE_SCOPE_DIGEST).ok_or(ForeignPageToken)?;
        if digest != self.digest {
            return Err(ForeignPageToken);
        }
        String::from_utf8(position.to_vec())
            .map(Some)
            .map_err(|_| ForeignPageToken)
    }
}

/// `INVALID_ARGUMENT` for a page token this listing did not issue to this caller.
pub fn foreign_page_token() -> Status {
    invalid_argument(&[Violation::new("page_token", ForeignPageToken.to_string())])
}

/// Clamps a requested page size: 0 means the default, larger than `max` means `max`.
pub fn page_size(requested: i32, default: u32, max: u32) -> u32 {
    match u32::try_from(requested) {
        Ok(0) | Err(_) => default,
        Ok(n) => n.min(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = invalid_argument(&[
            Violation::new("complaint.text", "must not be empty"),
            Violation::new("complaint.channel", "must be set"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("complaint.text: must not be empty"));
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[1].field, "complaint.channel");
    }

    #[test]
    fn page_tokens_are_opaque_and_bound_to_their_scope() {
        let scope = PageScope::new("acme", "state=Some(New)");
        let token = scope.seal("1700000000:abc");
        assert!(!token.contains("1700000000"));
        assert_eq!(scope.open(&token), Ok(Some("1700000000:abc".to_owned())));
        assert_eq!(scope.open(""), Ok(None));
        let other_tenant = PageScope::new("globex", "state=Some(New)");
        assert_eq!(other_tenant.open(&token), Err(ForeignPageToken));
        let other_filters = PageScope::new("acme", "state=None");
        assert_eq!(other_filters.open(&token), Err(ForeignPageToken));
        // The tenant's length is hashed too: "ab"+"c…" is not "a"+"bc…".
        assert_ne!(PageScope::new("ab", "c"), PageScope::new("a", "bc"));
        assert_eq!(scope.open("not base64!"), Err(ForeignPageToken));
        assert_eq!(scope.open("bm9wZQ"), Err(ForeignPageToken));
    }

    #[test]
    fn a_filter_struct_binds_every_field() {
        // Read only through `Debug`, which is what the scope spells.
        #[allow(dead_code)]
        #[derive(Debug, Default)]
        struct Filter {
            team: Option<&'static str>,
            state: Option<i32>,
        }
        let by_team = Filter {
            team: Some("network-ops"),
            ..Filter::default()
        };
        let token = PageScope::of("acme", &by_team).seal("position");
        assert!(PageScope::of("acme", &by_team).open(&token).is_ok());
        assert!(PageScope::of("globex", &by_team).open(&token).is_err());
        assert!(PageScope::of("acme", &Filter::default()).open(&token).is_err());
        let also_by_state = Filter {
            state: Some(1),
            ..by_team
        };
        assert!(PageScope::of("acme", &also_by_state).open(&token).is_err());
    }

    #[test]
    fn page_size_defaults_and_clamps() {
        assert_eq!(page_size(0, 50, 500), 50);
        assert_eq!(page_size(-3, 50, 500), 50);
        assert_eq!(page_size(20, 50, 500), 20);
        assert_eq!(page_size(9000, 50, 500), 500);
    }

    async fn local_listener() -> (TcpListener, SocketAddr) {
        let listener = bind(([127, 0, 0, 1], 0).into()).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        (listener, addr)
    }

    #[tokio::test]
    async fn grpc_connections_are_accepted_with_nodelay() {
        use tokio_stream::StreamExt;
        let (listener, addr) = local_listener().await;
        let mut accepted = incoming(listener);
        let _client = TcpStream::connect(addr).await.expect("connect");
        let stream = accepted.next().await.expect("a connection").expect("accepted");
        assert!(stream.nodelay().expect("read TCP_NODELAY"));
    }

    #[tokio::test]
    async fn http_connections_are_accepted_with_nodelay() {
        use axum::serve::Listener;
        let (listener, addr) = local_listener().await;
        let mut accepted = http_listener(listener);
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = accepted.accept().await;
        assert!(stream.nodelay().expect("read TCP_NODELAY"));
    }
}
