//! Message texts. Rendering is a plain function of what the message is about; public
//! replies never quote the customer or carry personal data.

use closedloop_proto::v1::NotificationKind;

/// What a message may mention.
pub struct MessageContext<'a> {
    /// Short reference the customer can quote (first 8 characters of the complaint id).
    pub reference: &'a str,
    pub locale: &'a str,
    /// The agent's resolution note; shown only on private channels.
    pub resolution_note: &'a str,
    pub private_channel: bool,
}

fn english(locale: &str) -> bool {
    locale.to_ascii_lowercase().starts_with("en")
}

pub fn render(kind: NotificationKind, ctx: &MessageContext<'_>) -> String {
    let r = ctx.reference;
    let note = if ctx.private_channel {
        ctx.resolution_note.trim()
    } else {
        ""
    };
    match (kind, english(ctx.locale)) {
        (NotificationKind::PrivateChannelInvitation, false) => {
            format!(
                "您好，我们已收到您的反馈（编号 {r}）。为保护您的隐私，请通过私信联系我们，我们会尽快为您处理。"
            )
        }
        (NotificationKind::PrivateChannelInvitation, true) => format!(
            "Thanks for reaching out (ref {r}). To protect your privacy, please send us a direct message and we will take it from there."
        ),
        (NotificationKind::Closure, false) if !note.is_empty() => {
            format!("您好，您反馈的问题（编号 {r}）已处理完毕：{note}。如仍有问题，欢迎随时联系我们。")
        }
        (NotificationKind::Closure, false) => {
            format!("您好，您反馈的问题（编号 {r}）已处理完毕。如仍有问题，欢迎随时联系我们。")
        }
        (NotificationKind::Closure, true) if !note.is_empty() => {
            format!(
                "Your issue (ref {r}) has been resolved: {note}. If anything is still wrong, just reply here."
            )
        }
        (NotificationKind::Closure, true) => {
            format!("Your issue (ref {r}) has been resolved. If anything is still wrong, just reply here.")
        }
        (_, false) => format!("您好，我们已收到您的反馈（编号 {r}），正在为您处理，请留意后续消息。"),
        (_, true) => {
            format!("Thanks for reaching out. We have received your message (ref {r}) and are on it.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(locale: &'a str, note: &'a str, private_channel: bool) -> MessageContext<'a> {
        MessageContext {
            reference: "ab12cd34",
            locale,
            resolution_note: note,
            private_channel,
        }
    }

    #[test]
    fn acknowledges_in_the_customers_language() {
        assert!(render(NotificationKind::Acknowledgement, &ctx("zh-CN", "", false)).contains("已收到"));
        assert!(render(NotificationKind::Acknowledgement, &ctx("en-GB", "", false)).contains("ab12cd34"));
        assert!(render(NotificationKind::Acknowledgement, &ctx("", "", false)).starts_with("您好"));
    }

    #[test]
    fn public_closures_do_not_repeat_the_note() {
        let note = "已为手机 13812345678 退还话费";
        assert!(!render(NotificationKind::Closure, &ctx("zh", note, false)).contains("138"));
        assert!(render(NotificationKind::Closure, &ctx("zh", note, true)).contains(note));
    }

    #[test]
    fn invitation_asks_for_a_direct_message() {
        assert!(
            render(NotificationKind::PrivateChannelInvitation, &ctx("en", "", false))
                .contains("direct message")
        );
    }
}
