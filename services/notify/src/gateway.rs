//! Channel-gateway webhooks ([`closedloop_runtime::webhook`]): where each channel's go, and
//! the client that posts them behind a circuit breaker per gateway and a rate limit per
//! channel.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use closedloop_proto::v1::Channel;

use closedloop_runtime::metrics;
pub use closedloop_runtime::webhook::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, WebhookMessage, sign};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::guard::{CircuitBreaker, RateLimiter};

/// Gateway-table name and webhook `channel` of staff alerts.
pub const STAFF: &str = "staff";

/// One gateway: where to POST and the secret to sign with.
#[derive(Clone)]
pub struct Gateway {
    pub url: String,
    /// Host, port and path without credentials or query: the gateway's metric label.
    label: String,
    /// `url` parsed once, not on every call.
    endpoint: reqwest::Url,
    secret: Vec<u8>,
}

/// Gateways by channel name (`wechat`, `weibo_post`, ...) with a `default` for the rest.
#[derive(Clone, Default)]
pub struct GatewayTable {
    by_channel: HashMap<String, Gateway>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayTableError {
    #[error("gateway entry for {0:?} is not `channel=url|secret`")]
    Malformed(String),
    #[error("gateway URL for {0:?} must be an http:// or https:// URL")]
    Url(String),
}

impl FromStr for GatewayTable {
    type Err = GatewayTableError;
    /// `default=https://gw/hook|secret;wechat=https://wx-gw/hook|other-secret`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut by_channel = HashMap::new();
        for entry in s.split([';', '\n']).map(str::trim).filter(|e| !e.is_empty()) {
            let (channel, rest) = entry
                .split_once('=')
                .ok_or_else(|| GatewayTableError::Malformed(entry.into()))?;
            let channel = channel.trim().to_ascii_lowercase();
            let (url, secret) = rest
                .split_once('|')
                .filter(|(_, secret)| !secret.is_empty())
                .ok_or_else(|| GatewayTableError::Malformed(channel.clone()))?;
            let url = url.trim();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(GatewayTableError::Url(channel));
            }
            let Ok(endpoint) = reqwest::Url::parse(url) else {
                return Err(GatewayTableError::Url(channel));
            };
            let label = format!(
                "{}{}",
                endpoint.host_str().unwrap_or_default(),
                endpoint.port().map(|port| format!(":{port}")).unwrap_or_default()
            ) + endpoint.path();
            by_channel.insert(
                channel,
                Gateway {
                    url: url.to_owned(),
                    label,
                    endpoint,
                    secret: secret.as_bytes().to_vec(),
                },
            );
        }
        Ok(Self { by_channel })
    }
}

impl GatewayTable {
    pub fn for_channel(&self, channel: Channel) -> Option<&Gateway> {
        self.by_channel
            .get(channel.key())
            .or_else(|| self.by_channel.get("default"))
    }

    /// The staff webhook (entry `staff`), for alerts to agents and supervisors. No fallback:
    /// internal alerts must never reach a customer gateway.
    pub fn staff(&self) -> Option<&Gateway> {
        self.by_channel.get(STAFF)
    }

    pub fn len(&self) -> usize {
        self.by_channel.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_channel.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no gateway configured for {0}")]
    NoGateway(String),
    #[error("gateway unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("gateway answered HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("cannot encode the message: {0}")]
    Encode(#[from] serde_json::Error),
    /// The gateway failed repeatedly; calls are paused for a while.
    #[error("circuit open for {url}; next try in {retry_after:?}")]
    CircuitOpen { url: String, retry_after: Duration },
    /// The channel's rate limit would be exceeded for longer than is worth waiting.
    #[error("rate limit of channel {channel}; next slot in {retry_after:?}")]
    RateLimited { channel: String, retry_after: Duration },
}

impl DeliveryError {
    /// Whether trying again can never help: the gateway refused the message with a 4xx
    /// that means "never" (not 408 Request Timeout, 425 Too Early or 429 Too Many
    /// Requests), or there is no gateway to send it to, or it cannot be encoded. Everything
    /// else (timeouts, refused connections, 5xx, an open circuit) is the gateway's state
    /// and passes.
    pub fn is_permanent(&self) -> bool {
        match self {
            DeliveryError::Rejected { status, .. } => {
                (400..500).contains(status) && !matches!(status, 408 | 425 | 429)
            }
            DeliveryError::NoGateway(_) | DeliveryError::Encode(_) => true,
            DeliveryError::Transport(_)
            | DeliveryError::CircuitOpen { .. }
            | DeliveryError::RateLimited { .. } => false,
        }
    }

    /// Whether the gateway was called at all (not held back by its circuit or rate limit).
    pub fn called_gateway(&self) -> bool {
        !matches!(
            self,
            DeliveryError::CircuitOpen { .. }
                | DeliveryError::RateLimited { .. }
                | DeliveryError::NoGateway(_)
        )
    }

    /// When a retry makes sense, if the error knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::CircuitOpen { retry_after, .. }
            | DeliveryError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub enum Destination {
    /// The customer, through the gateway of this channel.
    Customer(Channel),
    /// Staff, through the `staff` webhook.
    Staff,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    gateway: String,
    /// `delivered`, `failed` (the call was made and did not succeed) or `circuit_open`
    /// (held back by the breaker).
    outcome: &'static str,
}

struct GatewayMetrics {
    calls: Family<CallLabels, Counter>,
    circuit_open: Family<GatewayLabels, Gauge>,
}

static GATEWAY_METRICS: std::sync::LazyLock<GatewayMetrics> = std::sync::LazyLock::new(|| GatewayMetrics {
    calls: metrics::register(
        "gateway_calls",
        "Calls to each gateway by outcome",
        Family::default(),
    ),
    circuit_open: metrics::register(
        "gateway_circuit_open",
        "1 while the gateway's circuit breaker holds calls back",
        Family::default(),
    ),
});

fn count_call(gateway: &Gateway, outcome: &'static str) {
    GATEWAY_METRICS
        .calls
        .get_or_create(&CallLabels {
            gateway: gateway.label.clone(),
            outcome,
        })
        .inc();
}

fn show_circuit(gateway: &Gateway, breaker: &CircuitBreaker) {
    GATEWAY_METRICS
        .circuit_open
        .get_or_create(&GatewayLabels {
            gateway: gateway.label.clone(),
        })
        .set(i64::from(breaker.is_open()));
}

/// Longest a delivery waits in line for its channel's rate limit before handing the event
/// back for redelivery (well inside the consumer's ack wait).
const MAX_RATE_WAIT: Duration = Duration::from_secs(5);

/// Posts signed messages to gateways, behind a circuit breaker per gateway and a rate
/// limit per channel.
#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    gateways: GatewayTable,
    breakers: Arc<HashMap<String, CircuitBreaker>>,
    limits: Arc<HashMap<String, RateLimiter>>,
}

/// Guard settings.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Calls per second by channel key (`wechat`, `weibo_post`, ...).
    pub rate_limits: HashMap<String, f64>,
}

impl WebhookClient {
    pub fn new(gateways: GatewayTable, settings: &GuardSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent("closedloop-notify")
            .build()?;
        let breakers = gateways
            .by_channel
            .values()
            .map(|g| {
                let breaker = CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown);
                // Every gateway's series exists from the start, at zero.
                show_circuit(g, &breaker);
                for outcome in ["delivered", "failed", "circuit_open"] {
                    drop(GATEWAY_METRICS.calls.get_or_create(&CallLabels {
                        gateway: g.label.clone(),
                        outcome,
                    }));
                }
                (g.url.clone(), breaker)
            })
            .collect();
        let now = Instant::now();
        let limits = settings
            .rate_limits
            .iter()
            .map(|(channel, rate)| (channel.clone(), RateLimiter::new(*rate, now)))
            .collect();
        Ok(Self {
            http,
            gateways,
            breakers: Arc::new(breakers),
            limits: Arc::new(limits),
        })
    }

    pub fn has_staff_gateway(&self) -> bool {
        self.gateways.staff().is_some()
    }

    /// Waits for the channel's rate limit, up to [`MAX_RATE_WAIT`].
    async fn pace(&self, channel: &str) -> Result<(), DeliveryError> {
        let Some(limiter) = self.limits.get(channel) else {
            return Ok(());
        };
        loop {
            match limiter.try_acquire(Instant::now()) {
                Ok(()) => return Ok(()),
                Err(wait) if wait <= MAX_RATE_WAIT => tokio::time::sleep(wait).await,
                Err(wait) => {
                    return Err(DeliveryError::RateLimited {
                        channel: channel.to_owned(),
                        retry_after: wait,
                    });
                }
            }
        }
    }

    /// Sends one message; success means the gateway answered 2xx, and gives what it said
    /// (its receipt, cut to 200 characters).
    pub async fn send(
        &self,
        destination: Destination,
        message: &WebhookMessage<'_>,
    ) -> Result<String, DeliveryError> {
        let (gateway, limit_key) = match destination {
            Destination::Customer(channel) => (self.gateways.for_channel(channel), channel.key()),
            Destination::Staff => (self.gateways.staff(), STAFF),
        };
        let gateway = gateway.ok_or_else(|| DeliveryError::NoGateway(limit_key.to_owned()))?;
        let breaker = self.breakers.get(&gateway.url);
        if let Some(breaker) = breaker {
            breaker.allow(Instant::now()).map_err(|retry_after| {
                count_call(gateway, "circuit_open");
                DeliveryError::CircuitOpen {
                    url: gateway.url.clone(),
                    retry_after,
                }
            })?;
        }
        self.pace(limit_key).await?;
        let result = self.post(gateway, message).await;
        count_call(gateway, if result.is_ok() { "delivered" } else { "failed" });
        if let Some(breaker) = breaker {
            breaker.record(result.is_ok(), Instant::now());
            show_circuit(gateway, breaker);
        }
        result
    }

    async fn post(&self, gateway: &Gateway, message: &WebhookMessage<'_>) -> Result<String, DeliveryError> {
        let body = serde_json::to_vec(message)?;
        let signature = sign(&gateway.secret, &body);
        let response = self
            .http
            .post(gateway.endpoint.clone())
            .header("content-type", "application/json")
            .header(IDEMPOTENCY_HEADER, message.delivery_id.as_ref())
            .header(SIGNATURE_HEADER, format!("sha256={signature}"))
            .body(body)
            .send()
            .await?;
        let status = response.status();
        // Taken or refused, the gateway's answer is only read so far: it is a receipt or a
        // reason, never a document.
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        if status.is_success() {
            return Ok(body);
        }
        Err(DeliveryError::Rejected {
            status: status.as_u16(),
            body,
        })
    }
}

/// Parses `wechat=10;weibo_post=5` (calls per second by channel).
pub fn parse_rate_limits(text: &str) -> Result<HashMap<String, f64>, String> {
    text.split([';', ','])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (channel, rate) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not channel=rate"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: rate is not a number"))?;
            if rate <= 0.0 {
                return Err(format!("{entry:?}: rate must be positive"));
            }
            Ok((channel.trim().to_ascii_lowercase(), rate))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_table_picks_channel_then_default() {
        let table: GatewayTable = "default=http://gw/hook|s1; wechat=https://wx/hook|s2"
            .parse()
            .expect("valid");
        assert_eq!(
            table.for_channel(Channel::Wechat).map(|g| g.url.as_str()),
            Some("https://wx/hook")
        );
        assert_eq!(
            table.for_channel(Channel::WeiboPost).map(|g| g.url.as_str()),
            Some("http://gw/hook")
        );
        assert!(GatewayTable::default().for_channel(Channel::Wechat).is_none());
        assert!(matches!(
            "wechat=ftp://x|s".parse::<GatewayTable>(),
            Err(GatewayTableError::Url(_))
        ));
        assert!(matches!(
            "wechat=http://x".parse::<GatewayTable>(),
            Err(GatewayTableError::Malformed(_))
        ));
        assert!(matches!(
            "wechat=http://[bad|s".parse::<GatewayTable>(),
            Err(GatewayTableError::Url(_))
        ));
    }

    #[test]
    fn rate_limits_parse() {
        let limits = parse_rate_limits("wechat=10; weibo_post=2.5").expect("valid");
        assert_eq!(limits.get("weibo_post"), Some(&2.5));
        assert!(parse_rate_limits("wechat").is_err());
        assert!(parse_rate_limits("wechat=-1").is_err());
        assert!(parse_rate_limits("").expect("empty is fine").is_empty());
    }

    #[test]
    fn staff_alerts_never_fall_back_to_a_customer_gateway() {
        let table: GatewayTable = "default=http://gw/hook|s1".parse().expect("valid");
        assert!(table.staff().is_none());
        let table: GatewayTable = "default=http://gw/hook|s1;staff=http://desk/hook|s2"
            .parse()
            .expect("valid");
        assert_eq!(table.staff().map(|g| g.url.as_str()), Some("http://desk/hook"));
    }

    #[test]
    fn only_a_refusal_for_good_is_permanent() {
        let rejected = |status| DeliveryError::Rejected {
            status,
            body: String::new(),
        };
        for status in [400, 401, 403, 404, 410, 413, 422] {
            assert!(rejected(status).is_permanent(), "{status}");
        }
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(!rejected(status).is_permanent(), "{status}");
        }
        assert!(DeliveryError::NoGateway("wechat".into()).is_permanent());
        assert!(
            !DeliveryError::CircuitOpen {
                url: "http://gw".into(),
                retry_after: Duration::from_secs(1)
            }
            .is_permanent()
        );
    }
}
