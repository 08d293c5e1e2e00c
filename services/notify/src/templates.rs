//! Message texts, from minijinja templates. Built-in defaults in Simplified Chinese and
//! English (`default_templates.json`); operators add or override templates with a JSON file
//! (`CLOSEDLOOP_TEMPLATES`) of the same shape.
//!
//! A template is named `tenant:kind:channel:category:locale`, where tenant, channel and
//! category may be `*`. Rendering tries the most specific name first — this tenant, this
//! channel and category, the full locale — and falls back step by step to `*` and to the
//! language alone, then to Chinese. Public replies are checked for personal data after
//! rendering and masked if any slipped in (from an agent's reply, say).

use std::collections::{BTreeMap, HashSet};

use closedloop_proto::v1::{Channel, NotificationKind};
use closedloop_runtime::pii;
use minijinja::{Environment, UndefinedBehavior, Value};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read templates file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("templates file is not a JSON object of name → template: {0}")]
    Json(#[from] serde_json::Error),
    #[error("template {name} is invalid: {source}")]
    Invalid {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("no template for {0}")]
    Missing(String),
    #[error("rendering {name} failed: {source}")]
    Render {
        name: String,
        #[source]
        source: minijinja::Error,
    },
}

/// What a message is, for choosing its template.
#[derive(Debug, Clone)]
pub struct TemplateKey<'a> {
    pub tenant: &'a str,
    pub kind: NotificationKind,
    pub channel: Channel,
    pub category: &'a str,
    /// BCP 47 tag, e.g. `zh-CN`, `en-GB`; empty means Chinese.
    pub locale: &'a str,
}

/// Template names in the order they are tried.
pub fn candidates(key: &TemplateKey<'_>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    visit_candidates(key, |name| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
        false
    });
    names
}

/// Calls `visit` with each template name in the order tried (repeats possible) until it
/// returns true, and says whether one did. Names are built in one buffer: this runs for
/// every message sent.
fn visit_candidates(key: &TemplateKey<'_>, mut visit: impl FnMut(&str) -> bool) -> bool {
    use std::fmt::Write as _;
    let kind = kind_key(key.kind);
    let channel = key.channel.key();
    let locale = key.locale.trim().to_ascii_lowercase();
    let mut locales = Vec::new();
    if !locale.is_empty() {
        locales.push(locale.clone());
        if let Some((language, _)) = locale.split_once('-') {
            locales.push(language.to_owned());
        }
    }
    if !locales.iter().any(|l| l == "zh") {
        locales.push("zh".to_owned());
    }
    let mut name = String::with_capacity(64);
    for locale in &locales {
        for tenant in [key.tenant, "*"] {
            for (channel, category) in [
                (channel, key.category),
                (channel, "*"),
                ("*", key.category),
                ("*", "*"),
            ] {
                name.clear();
                // Writing to a String cannot fail.
                let _ = write!(name, "{tenant}:{kind}:{channel}:{category}:{locale}");
                if visit(&name) {
                    return true;
                }
            }
        }
    }
    false
}

/// `NOTIFICATION_KIND_STATUS_UPDATE` → `status_update`.
pub fn kind_key(kind: NotificationKind) -> &'static str {
    match kind {
        NotificationKind::Unspecified => "unspecified",
        NotificationKind::Acknowledgement => "acknowledgement",
        NotificationKind::PrivateChannelInvitation => "private_channel_invitation",
        NotificationKind::StatusUpdate => "status_update",
        NotificationKind::AgentReply => "agent_reply",
        NotificationKind::Closure => "closure",
        NotificationKind::SatisfactionSurvey => "satisfaction_survey",
        NotificationKind::Reopened => "reopened",
        NotificationKind::StaffAlert => "staff_alert",
    }
}

pub struct Templates {
    env: Environment<'static>,
    /// The names `env` holds: asking minijinja for a missing one builds an error, and
    /// most names in a fallback chain are missing (rendering took 9% of notify's CPU in
    /// bench-loop before this check).
    names: HashSet<String>,
}

impl Templates {
    /// The built-in templates, overridden and extended by the JSON file at `path`.
    pub fn load(path: Option<&str>) -> Result<Self, TemplateError> {
        let mut sources: BTreeMap<String, String> =
            serde_json::from_str(include_str!("default_templates.json"))?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
                path: path.to_owned(),
                source,
            })?;
            sources.extend(serde_json::from_str::<BTreeMap<String, String>>(&text)?);
        }
        Self::from_sources(sources)
    }

    pub fn from_sources(sources: BTreeMap<String, String>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // A variable a template names but the message does not have is a bug to surface,
        // not an empty string to send to a customer.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let names = sources.keys().cloned().collect();
        for (name, source) in sources {
            env.add_template_owned(name.clone(), source)
                .map_err(|source| TemplateError::Invalid { name, source })?;
        }
        Ok(Self { env, names })
    }

    /// Renders the most specific template for `key` with `values`. On public channels the
    /// result never carries personal data.
    pub fn render(&self, key: &TemplateKey<'_>, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        let mut found = None;
        visit_candidates(key, |name| {
            let known = self.names.contains(name);
            if known {
                found = Some(name.to_owned());
            }
            known
        });
        let name = found
            .ok_or_else(|| TemplateError::Missing(candidates(key).into_iter().next().unwrap_or_default()))?;
        let template = self
            .env
            .get_template(&name)
            .map_err(|source| TemplateError::Render {
                name: name.clone(),
                source,
            })?;
        let context: BTreeMap<String, Value> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let text = template
            .render(Value::from(context))
            .map_err(|source| TemplateError::Render {
                name: name.clone(),
                source,
            })?;
        if closedloop_runtime::pii::is_public_channel(key.channel) {
            let (masked, found) = pii::mask(&text);
            if found {
                tracing::warn!(template = %name, "personal data masked out of a public reply");
                return Ok(masked);
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivery ids are derived from these keys, so they must stay the proto names.
    #[test]
    fn channel_and_kind_keys_are_the_proto_names_in_lower_case() {
        let lower = |name: &str, prefix: &str| name.trim_start_matches(prefix).to_ascii_lowercase();
        for value in 0..=i32::from(u8::MAX) {
            if let Ok(channel) = Channel::try_from(value) {
                assert_eq!(channel.key(), lower(channel.as_str_name(), "CHANNEL_"));
            }
            if let Ok(kind) = NotificationKind::try_from(value) {
                assert_eq!(kind_key(kind), lower(kind.as_str_name(), "NOTIFICATION_KIND_"));
            }
        }
    }

    fn key(kind: NotificationKind, channel: Channel, locale: &'static str) -> TemplateKey<'static> {
        TemplateKey {
            tenant: "acme",
            kind,
            channel,
            category: "billing",
            locale,
        }
    }

    #[test]
    fn the_fallback_chain_goes_from_specific_to_general() {
        let names = candidates(&key(NotificationKind::Closure, Channel::Wechat, "en-GB"));
        assert_eq!(names[0], "acme:closure:wechat:billing:en-gb");
        assert_eq!(names[3], "acme:closure:*:*:en-gb");
        assert_eq!(names[4], "*:closure:wechat:billing:en-gb");
        assert!(names.contains(&"*:closure:*:*:en".to_owned()));
        assert_eq!(names.last().map(String::as_str), Some("*:closure:*:*:zh"));
        let position = |n: &str| names.iter().position(|x| x == n);
        assert!(position("*:closure:*:*:en-gb") < position("acme:closure:wechat:billing:en"));
    }

    #[test]
    fn overrides_win_and_defaults_fill_in() -> Result<(), TemplateError> {
        let mut sources: BTreeMap<String, String> =
            serde_json::from_str(include_str!("default_templates.json"))?;
        sources.insert(
            "acme:acknowledgement:wechat:*:zh".into(),
            "微信专属：{{ reference }}".into(),
        );
        let templates = Templates::from_sources(sources)?;
        let values = [("reference", "ab12cd34")];
        let wechat = templates.render(
            &key(NotificationKind::Acknowledgement, Channel::Wechat, "zh-CN"),
            &values,
        )?;
        assert_eq!(wechat, "微信专属：ab12cd34");
        let weibo = templates.render(
            &key(NotificationKind::Acknowledgement, Channel::WeiboPost, "zh-CN"),
            &values,
        )?;
        assert!(weibo.starts_with("您好，我们已收到"), "{weibo}");
        Ok(())
    }

    #[test]
    fn both_locales_have_every_customer_message() -> Result<(), TemplateError> {
        let templates = Templates::load(None)?;
        let values = [
            ("reference", "ab12cd34"),
            ("note", ""),
            ("reply", "我们已为您重置线路"),
            ("status", "assigned"),
            ("event", "assigned"),
            ("work_order", "wo-1"),
            ("priority", "P2"),
            ("category", "billing"),
            ("team", "billing"),
            ("assignee", ""),
            ("region", ""),
            ("detail", ""),
        ];
        for kind in [
            NotificationKind::Acknowledgement,
            NotificationKind::PrivateChannelInvitation,
            NotificationKind::StatusUpdate,
            NotificationKind::AgentReply,
            NotificationKind::Closure,
            NotificationKind::SatisfactionSurvey,
            NotificationKind::Reopened,
            NotificationKind::StaffAlert,
        ] {
            let zh = templates.render(&key(kind, Channel::Wechat, "zh-CN"), &values)?;
            let en = templates.render(&key(kind, Channel::Wechat, "en-US"), &values)?;
            assert!(
                zh.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
                "{kind:?}: {zh}"
            );
            assert!(
                en.is_ascii() || kind == NotificationKind::AgentReply,
                "{kind:?}: {en}"
            );
        }
        Ok(())
    }

    #[test]
    fn public_replies_never_carry_personal_data() -> Result<(), TemplateError> {
        let templates = Templates::load(None)?;
        let reply = [
            ("reference", "ab12cd34"),
            (
                "reply",
                "已为手机 13812345678 退还话费，详情发至 li.si@example.com",
            ),
        ];
        let public = templates.render(
            &key(NotificationKind::AgentReply, Channel::WeiboPost, "zh"),
            &reply,
        )?;
        assert!(
            !public.contains("13812345678") && !public.contains("li.si"),
            "{public}"
        );
        let private = templates.render(&key(NotificationKind::AgentReply, Channel::Wechat, "zh"), &reply)?;
        assert!(
            private.contains("13812345678"),
            "private channels may carry it: {private}"
        );
        Ok(())
    }

    #[test]
    fn a_missing_variable_is_an_error_not_a_blank() -> Result<(), TemplateError> {
        let templates = Templates::load(None)?;
        let result = templates.render(
            &key(NotificationKind::Acknowledgement, Channel::Wechat, "zh"),
            &[],
        );
        assert!(matches!(result, Err(TemplateError::Render { .. })));
        Ok(())
    }
}
