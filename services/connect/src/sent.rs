//! How a delivery to a platform ended, whatever the platform.

use std::time::Duration;

/// How a message went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// `custom` or `template` (WeChat); `comment`, `comment_reply` or `private_message`
    /// (Weibo).
    pub method: &'static str,
    /// The platform's id of the message, where it gives one.
    pub platform_message_id: String,
}

/// Why a message did not go out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Not sent: try again after the wait.
    #[error("not sent now: {1}")]
    Later(Duration, String),
    /// Refused for good.
    #[error("{0}")]
    Refused(String),
    /// The platform may or may not have it: a call was cut off after it was made.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// `text` cut to `limit` characters, the last an ellipsis when cut.
pub fn cut(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    text.chars()
        .take(limit.saturating_sub(1))
        .chain(std::iter::once('…'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_by_characters_with_an_ellipsis() {
        assert_eq!(cut("已修复", 20), "已修复");
        assert_eq!(cut("一二三四五", 3), "一二…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
