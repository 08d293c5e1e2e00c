//! Connect's series: calls to each platform API by outcome, and deliveries by how they
//! ended.

use closedloop_runtime::metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    platform: &'static str,
    /// The API: `token`, `send` (custom), … (the last part of its path).
    api: String,
    /// `ok`, `errcode_<n>`, or `no_answer`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    platform: &'static str,
    /// `custom`, `template`, or empty when nothing went out.
    method: &'static str,
    /// `sent`, `later`, `refused`, `unknown`, `repeated` (a retry answered from the record).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    platform: &'static str,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FoundLabels {
    platform: &'static str,
    tenant: String,
    /// `mentions`, `comments` or `search`.
    feed: &'static str,
    /// `submitted`, `duplicate`, `noise` (search hits classify calls noise), `own` (the
    /// brand's own) or `rejected` (ingest refused it).
    outcome: &'static str,
}

struct ConnectMetrics {
    calls: Family<CallLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    budget: Family<TenantLabels, Gauge>,
    rate_limited: Family<TenantLabels, Counter>,
    found: Family<FoundLabels, Counter>,
}

static METRICS: std::sync::LazyLock<ConnectMetrics> = std::sync::LazyLock::new(|| ConnectMetrics {
    calls: metrics::register(
        "connect_api_calls",
        "Calls to the platforms' APIs by outcome",
        Family::default(),
    ),
    deliveries: metrics::register(
        "connect_deliveries",
        "Deliveries by how they went out and ended",
        Family::default(),
    ),
    budget: metrics::register(
        "connect_rate_budget",
        "Platform calls a tenant has left in this hour (per replica)",
        Family::default(),
    ),
    rate_limited: metrics::register(
        "connect_rate_limited",
        "Times the platform said a tenant's rate limit is reached",
        Family::default(),
    ),
    found: metrics::register(
        "connect_found",
        "Posts and comments the listener found, by feed and what became of them",
        Family::default(),
    ),
});

pub fn budget(platform: &'static str, tenant: &str, remaining: u32) {
    METRICS
        .budget
        .get_or_create(&TenantLabels {
            platform,
            tenant: tenant.to_owned(),
        })
        .set(i64::from(remaining));
}

pub fn rate_limited(platform: &'static str, tenant: &str) {
    METRICS
        .rate_limited
        .get_or_create(&TenantLabels {
            platform,
            tenant: tenant.to_owned(),
        })
        .inc();
}

pub fn found(platform: &'static str, tenant: &str, feed: &'static str, outcome: &'static str) {
    METRICS
        .found
        .get_or_create(&FoundLabels {
            platform,
            tenant: tenant.to_owned(),
            feed,
            outcome,
        })
        .inc();
}

pub fn api_call(platform: &'static str, api: &str, errcode: i64) {
    let outcome = if errcode == 0 {
        "ok".to_owned()
    } else {
        format!("errcode_{errcode}")
    };
    count_call(platform, api, outcome);
}

pub fn api_call_failed(platform: &'static str, api: &str) {
    count_call(platform, api, "no_answer".to_owned());
}

fn count_call(platform: &'static str, api: &str, outcome: String) {
    METRICS
        .calls
        .get_or_create(&CallLabels {
            platform,
            api: api.to_owned(),
            outcome,
        })
        .inc();
}

pub fn delivery(platform: &'static str, method: &'static str, outcome: &'static str) {
    METRICS
        .deliveries
        .get_or_create(&DeliveryLabels {
            platform,
            method,
            outcome,
        })
        .inc();
}
