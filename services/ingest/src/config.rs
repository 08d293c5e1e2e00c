//! Ingest configuration: flags and `CLOSEDLOOP_*` environment variables.

use std::net::SocketAddr;

use closedloop_runtime::Secret;

use crate::validate::Limits;
use crate::wechat::WechatAccounts;
use crate::weibo::WeiboApps;

closedloop_runtime::service_config! {
    /// Closedloop ingest: the front door for channel gateways
    name = "closedloop-ingest", listen = ("CLOSEDLOOP_INGEST_LISTEN", "0.0.0.0:50051");
    /// HTTP listen address: JSON submissions and the WeChat and Weibo callbacks.
    #[arg(long, env = "CLOSEDLOOP_INGEST_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// Longest text on post and message channels, in characters.
    #[arg(long, env = "CLOSEDLOOP_MAX_TEXT_CHARS", default_value_t = 5_000)]
    pub max_text_chars: usize,
    /// Longest text on transcript channels (hotline, e-mail), in characters.
    #[arg(long, env = "CLOSEDLOOP_MAX_TRANSCRIPT_CHARS", default_value_t = 100_000)]
    pub max_transcript_chars: usize,
    /// Most complaints in one SubmitComplaints call.
    #[arg(long, env = "CLOSEDLOOP_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,
    /// WeChat official accounts: `tenant=callback-token` entries separated by `;`.
    #[arg(long, env = "CLOSEDLOOP_WECHAT_ACCOUNTS", default_value = "")]
    pub wechat_accounts: Secret<WechatAccounts>,
    /// Weibo fan-service pushes: `tenant=app-secret` entries separated by `;`, the secret
    /// of the app each brand account authorised.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_APPS", default_value = "")]
    pub weibo_apps: Secret<WeiboApps>,
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_text_chars: self.max_text_chars,
            max_transcript_chars: self.max_transcript_chars,
            max_batch: self.max_batch,
            ..Limits::default()
        }
    }
}
