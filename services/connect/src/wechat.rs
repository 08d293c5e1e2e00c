//! WeChat official accounts, outbound: the access token (`/cgi-bin/token`), the
//! customer-service message (`/cgi-bin/message/custom/send`) and the template message
//! (`/cgi-bin/message/template/send`), and what each `errcode` means for a delivery.
//!
//! WeChat answers HTTP 200 with `{"errcode": …, "errmsg": …}`; 0 is success.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

pub use crate::sent::{SendError, Sent};

/// One tenant's official account, as the outbound side uses it.
#[derive(Clone)]
pub struct WechatApp {
    pub app_id: String,
    pub app_secret: String,
    /// The template sent outside the 48-hour customer-service window, if any.
    pub template_id: Option<String>,
    /// The template's field that carries the message text (e.g. `thing1`).
    pub template_field: String,
}

impl std::fmt::Debug for WechatApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatApp")
            .field("app_id", &self.app_id)
            .field("template_id", &self.template_id)
            .finish_non_exhaustive()
    }
}

/// Each tenant's official account.
#[derive(Clone, Debug, Default)]
pub struct WechatApps(HashMap<String, WechatApp>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("WeChat app entry {0:?} is not `tenant=appid|appsecret[|template_id[|field]]`")]
pub struct MalformedApp(String);

/// The template field used when the entry names none.
pub const DEFAULT_TEMPLATE_FIELD: &str = "content";

impl FromStr for WechatApps {
    type Err = MalformedApp;
    /// `acme=wx0123|secret|tmpl-id|thing1;beta=wx4567|secret2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        closedloop_runtime::auth::tenant_map(s, MalformedApp, |tenant, value| {
            let malformed = || MalformedApp(tenant.to_owned());
            let fields: Vec<&str> = value.split('|').map(str::trim).collect();
            let (app_id, app_secret, template_id, template_field) = match fields[..] {
                [id, secret] => (id, secret, None, DEFAULT_TEMPLATE_FIELD),
                [id, secret, template] => (id, secret, Some(template), DEFAULT_TEMPLATE_FIELD),
                [id, secret, template, field] => (id, secret, Some(template), field),
                _ => return Err(malformed()),
            };
            if app_id.is_empty() || app_secret.is_empty() || template_field.is_empty() {
                return Err(malformed());
            }
            Ok(WechatApp {
                app_id: app_id.to_owned(),
                app_secret: app_secret.to_owned(),
                template_id: template_id.filter(|t| !t.is_empty()).map(str::to_owned),
                template_field: template_field.to_owned(),
            })
        })
        .map(Self)
    }
}

impl WechatApps {
    pub fn get(&self, tenant: &str) -> Option<&WechatApp> {
        self.0.get(tenant)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What an answer of the WeChat API means for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The access token expired or was replaced (40001, 40014, 42001): refresh and retry.
    TokenInvalid,
    /// The customer has not written within the customer-service window (45015), or the
    /// window's message allowance is spent (45047): only a template message may go.
    OutsideWindow,
    /// The API is busy or a quota is spent (-1, 45009, 45011): nothing was sent; try again
    /// after the wait.
    Busy(Duration),
    /// Anything else: the API refused this message, and sending it again cannot help.
    Refused(String),
}

/// The verdict on an answer's `errcode`.
pub fn verdict(errcode: i64, errmsg: &str) -> Verdict {
    match errcode {
        0 => Verdict::Ok,
        40001 | 40014 | 42001 => Verdict::TokenInvalid,
        45015 | 45047 => Verdict::OutsideWindow,
        -1 => Verdict::Busy(Duration::from_secs(2)),
        // The per-minute quota ("retry next minute").
        45011 => Verdict::Busy(Duration::from_secs(60)),
        // The daily quota: the operator must raise it or wait for the day to turn.
        45009 => Verdict::Busy(Duration::from_secs(600)),
        _ => Verdict::Refused(format!("WeChat errcode {errcode}: {errmsg}")),
    }
}

/// An answer of the WeChat API, as far as Closedloop reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// The template message's id.
    #[serde(default)]
    pub msgid: Option<serde_json::Value>,
}

impl Answer {
    pub fn verdict(&self) -> Verdict {
        verdict(self.errcode, &self.errmsg)
    }
}

/// The customer-service text message.
pub fn custom_text(openid: &str, text: &str) -> serde_json::Value {
    json!({"touser": openid, "msgtype": "text", "text": {"content": text}})
}

/// Longest value of a template field, in characters: WeChat's `thing` fields take 20, and
/// a longer one is refused, so the text is cut with an ellipsis.
pub const TEMPLATE_VALUE_CHARS: usize = 20;

/// The template message carrying `text` in the app's field.
pub fn template_message(app: &WechatApp, template_id: &str, openid: &str, text: &str) -> serde_json::Value {
    let value = crate::sent::cut(text, TEMPLATE_VALUE_CHARS);
    json!({
        "touser": openid,
        "template_id": template_id,
        "data": {app.template_field.as_str(): {"value": value}},
    })
}

/// The WeChat API, for the tenants in `apps`.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    /// Base URL, without a trailing slash.
    pub api: String,
    pub apps: WechatApps,
    pub store: crate::store::Store,
}

const TOKEN_PATH: &str = "/cgi-bin/token";
const CUSTOM_PATH: &str = "/cgi-bin/message/custom/send";
const TEMPLATE_PATH: &str = "/cgi-bin/message/template/send";

impl Client {
    /// Sends `text` to the customer `openid` of `tenant`'s account: as a customer-service
    /// message, or as the template message where WeChat says the window is closed.
    pub async fn deliver(&self, tenant: &str, openid: &str, text: &str) -> Result<Sent, SendError> {
        let app = self
            .apps
            .get(tenant)
            .ok_or_else(|| SendError::Refused(format!("no WeChat app configured for tenant {tenant}")))?;
        let answer = self
            .send_with_token(tenant, app, CUSTOM_PATH, &custom_text(openid, text))
            .await?;
        match answer.verdict() {
            Verdict::Ok => Ok(Sent {
                method: "custom",
                platform_message_id: String::new(),
            }),
            Verdict::OutsideWindow => {
                let Some(template_id) = &app.template_id else {
                    return Err(SendError::Refused(format!(
                        "outside the customer-service window ({}), and tenant {tenant} has no template",
                        answer.errmsg
                    )));
                };
                let message = template_message(app, template_id, openid, text);
                let answer = self.send_with_token(tenant, app, TEMPLATE_PATH, &message).await?;
                match answer.verdict() {
                    Verdict::Ok => Ok(Sent {
                        method: "template",
                        platform_message_id: answer
                            .msgid
                            .map(|id| id.to_string().trim_matches('"').to_owned())
                            .unwrap_or_default(),
                    }),
                    other => Err(not_sent(other, &answer)),
                }
            }
            other => Err(not_sent(other, &answer)),
        }
    }

    /// Calls `path` with the tenant's token; if WeChat says the token is no longer valid,
    /// once more with a fresh one.
    async fn send_with_token(
        &self,
        tenant: &str,
        app: &WechatApp,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, SendError> {
        let token = self.token(tenant, app, None).await?;
        let answer = self.call(path, &token, body).await?;
        if answer.verdict() != Verdict::TokenInvalid {
            return Ok(answer);
        }
        let token = self.token(tenant, app, Some(&token)).await?;
        self.call(path, &token, body).await
    }

    async fn token(&self, tenant: &str, app: &WechatApp, refused: Option<&str>) -> Result<String, SendError> {
        let key = crate::store::token_key("wechat", tenant);
        crate::tokens::token(&self.store, &key, refused, |_| self.fetch_token(app))
            .await
            .map_err(|error| match error {
                crate::tokens::TokenError::Refused(why) => SendError::Refused(why),
                other => SendError::Later(Duration::from_secs(1), other.to_string()),
            })
    }

    async fn fetch_token(&self, app: &WechatApp) -> Result<crate::tokens::Issued, crate::tokens::TokenError> {
        use crate::tokens::TokenError;
        let response = self
            .http
            .get(format!("{}{TOKEN_PATH}", self.api))
            .query(&[
                ("grant_type", "client_credential"),
                ("appid", app.app_id.as_str()),
                ("secret", app.app_secret.as_str()),
            ])
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(e.without_url().to_string()))?;
        let answer: Answer = read_answer(response)
            .await
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        crate::metrics::api_call("wechat", "token", answer.errcode);
        match (answer.verdict(), answer.access_token) {
            (Verdict::Ok, Some(access_token)) if !access_token.is_empty() => Ok(crate::tokens::Issued {
                access_token,
                expires_in: Duration::from_secs(answer.expires_in.unwrap_or(7200)),
                refresh_token: None,
            }),
            (Verdict::Busy(_), _) => Err(TokenError::Unavailable(answer.errmsg)),
            (Verdict::Refused(why), _) => Err(TokenError::Refused(why)),
            _ => Err(TokenError::Unavailable(format!(
                "no token in the answer ({})",
                answer.errmsg
            ))),
        }
    }

    /// One call. A call that fails before it is made (no connection) was not sent; one cut
    /// off after it was made may have been.
    async fn call(&self, path: &str, token: &str, body: &serde_json::Value) -> Result<Answer, SendError> {
        let api = path.rsplit('/').next().unwrap_or(path);
        let response = self
            .http
            .post(format!("{}{path}", self.api))
            .query(&[("access_token", token)])
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                crate::metrics::api_call_failed("wechat", api);
                let e = e.without_url();
                if e.is_connect() {
                    SendError::Later(Duration::from_secs(2), e.to_string())
                } else {
                    SendError::Unknown(e.to_string())
                }
            })?;
        let answer = read_answer(response)
            .await
            .inspect_err(|_| crate::metrics::api_call_failed("wechat", api))?;
        crate::metrics::api_call("wechat", api, answer.errcode);
        Ok(answer)
    }
}

/// The JSON answer of a call. WeChat answers its errors with HTTP 200 and an errcode; any
/// other status is taken to come from in front of the API (a proxy, an overload) and the
/// message as not taken.
async fn read_answer(response: reqwest::Response) -> Result<Answer, SendError> {
    let status = response.status();
    if !status.is_success() {
        return Err(SendError::Later(
            Duration::from_secs(2),
            format!("WeChat API answered HTTP {status}"),
        ));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| SendError::Unknown(format!("WeChat answer cut off: {}", e.without_url())))?;
    serde_json::from_slice(&bytes).map_err(|e| SendError::Unknown(format!("unreadable WeChat answer: {e}")))
}

/// The error of an answer that did not send the message.
fn not_sent(verdict: Verdict, answer: &Answer) -> SendError {
    match verdict {
        Verdict::Busy(wait) => SendError::Later(
            wait,
            format!("WeChat errcode {}: {}", answer.errcode, answer.errmsg),
        ),
        // Refused twice in a row, fresh token or not: the token store will sort it out.
        Verdict::TokenInvalid => {
            SendError::Later(Duration::from_secs(1), "WeChat refused a fresh token".into())
        }
        Verdict::Refused(why) => SendError::Refused(why),
        Verdict::OutsideWindow => SendError::Refused(format!(
            "outside the customer-service window: WeChat errcode {}: {}",
            answer.errcode, answer.errmsg
        )),
        Verdict::Ok => SendError::Unknown("an answer of success taken for a failure".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_parse() {
        let apps: WechatApps = "acme=wxA|sA|tmpl-1|thing1; beta=wxB|sB".parse().expect("valid");
        let acme = apps.get("acme").expect("acme");
        assert_eq!(acme.template_id.as_deref(), Some("tmpl-1"));
        assert_eq!(acme.template_field, "thing1");
        let beta = apps.get("beta").expect("beta");
        assert_eq!(
            (beta.template_id.as_deref(), beta.template_field.as_str()),
            (None, "content")
        );
        assert!("acme=wxA".parse::<WechatApps>().is_err());
        assert!("acme=|s".parse::<WechatApps>().is_err());
        assert!("Bad Tenant=wxA|s".parse::<WechatApps>().is_err());
        assert!(!format!("{acme:?}").contains("sA"), "the secret is not printed");
    }

    #[test]
    fn errcodes_decide_what_happens_next() {
        assert_eq!(verdict(0, "ok"), Verdict::Ok);
        for code in [40001, 40014, 42001] {
            assert_eq!(verdict(code, ""), Verdict::TokenInvalid, "{code}");
        }
        assert_eq!(verdict(45015, ""), Verdict::OutsideWindow);
        assert_eq!(verdict(45047, ""), Verdict::OutsideWindow);
        for code in [-1, 45009, 45011] {
            assert!(matches!(verdict(code, ""), Verdict::Busy(_)), "{code}");
        }
        for code in [40003, 43004, 40037, 47001] {
            assert!(matches!(verdict(code, ""), Verdict::Refused(_)), "{code}");
        }
    }

    #[test]
    fn template_values_are_cut_to_the_field_limit() {
        let app: WechatApps = "acme=wxA|sA|tmpl|thing2".parse().expect("valid");
        let app = app.get("acme").expect("acme");
        let long = "您反映的宽带故障已经修复完毕，请您确认网络是否恢复正常";
        let message = template_message(app, "tmpl", "oUser", long);
        let value = message["data"]["thing2"]["value"].as_str().unwrap_or_default();
        assert_eq!(value.chars().count(), TEMPLATE_VALUE_CHARS);
        assert!(value.ends_with('…'));
        let short = template_message(app, "tmpl", "oUser", "已修复");
        assert_eq!(short["data"]["thing2"]["value"], "已修复");
    }
}
