//! Connect's series: calls to each platform API by outcome, and deliveries by how they
//! ended.

use closedloop_runtime::metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

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

struct ConnectMetrics {
    calls: Family<CallLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
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
});

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
