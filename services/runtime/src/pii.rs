//! Personal data in free text: finding it (by kind, with checksums where the format has
//! one) and masking it, so it never reaches logs or public replies. Classify masks complaint
//! texts and flags what it found; notify guards every public reply with [`mask`].
//!
//! Kinds: mainland mobile numbers (also written with +86 or separators), landline numbers
//! with an area code, 18-digit resident ID numbers (ISO 7064 MOD 11-2 check digit), bank
//! card numbers (13–19 digits passing the Luhn check) and e-mail addresses. A number that
//! fails its check is not personal data of that kind (order and tracking numbers stay).

use std::ops::Range;

/// Whether messages on a channel are public (visible to anyone, not just the customer):
/// personal data must never appear there, and customers are moved to a private channel.
pub fn is_public_channel(channel: closedloop_proto::v1::Channel) -> bool {
    use closedloop_proto::v1::Channel;
    matches!(
        channel,
        Channel::WeiboPost | Channel::WeiboComment | Channel::ComplaintPlatform
    )
}

/// What kind of personal data was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiKind {
    Mobile,
    Landline,
    IdNumber,
    BankCard,
    Email,
}

/// One piece of personal data: its kind and byte range in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub span: Range<usize>,
}

/// ISO 7064 MOD 11-2, the check of 18-digit resident ID numbers.
pub fn valid_id_number(id: &[u8]) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    if id.len() != 18 || !id[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = id[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == id[17].to_ascii_uppercase()
}

/// The Luhn check of card numbers.
pub fn luhn(digits: &[u8]) -> bool {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn is_mobile(digits: &[u8]) -> bool {
    digits.len() == 11 && digits[0] == b'1' && (b'3'..=b'9').contains(&digits[1])
}

/// What a run of digits (separators removed) is, if personal data.
fn classify_number(digits: &[u8], had_separator: bool) -> Option<PiiKind> {
    if digits.is_empty() {
        return None;
    }
    let national = digits
        .strip_prefix(b"86")
        .filter(|rest| rest.len() == 11)
        .unwrap_or(digits);
    if is_mobile(national) {
        return Some(PiiKind::Mobile);
    }
    if valid_id_number(digits) {
        return Some(PiiKind::IdNumber);
    }
    if (13..=19).contains(&digits.len()) && luhn(digits) {
        return Some(PiiKind::BankCard);
    }
    // Area code (0 + 2-3 digits) and a 7-8 digit number; written with a separator or as one
    // 10-12 digit run starting with 0.
    if digits[0] == b'0' && (10..=12).contains(&digits.len()) && (had_separator || digits.len() >= 11) {
        return Some(PiiKind::Landline);
    }
    None
}

/// One group of a run of digits: its digits (and a final X) and where it lies in the text.
struct Group {
    digits: Vec<u8>,
    span: Range<usize>,
}

fn number_findings(text: &str, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A run of digit groups joined by single separators (space, hyphen), and a final X.
        let plus = i > 0 && bytes[i - 1] == b'+';
        let mut groups: Vec<Group> = Vec::new();
        let mut current = Group {
            digits: Vec::with_capacity(20),
            span: i..i,
        };
        let mut total = 0;
        let mut j = i;
        while j < bytes.len() {
            match bytes[j] {
                b'0'..=b'9' => {
                    current.digits.push(bytes[j]);
                    current.span.end = j + 1;
                    total += 1;
                    j += 1;
                }
                b'X' | b'x' if total == 17 => {
                    current.digits.push(b'X');
                    current.span.end = j + 1;
                    break;
                }
                b' ' | b'-'
                    if j + 1 < bytes.len() && bytes[j + 1].is_ascii_digit() && !current.digits.is_empty() =>
                {
                    let next = Group {
                        digits: Vec::with_capacity(20),
                        span: j + 1..j + 1,
                    };
                    groups.push(std::mem::replace(&mut current, next));
                    j += 1;
                }
                _ => break,
            }
        }
        let end = current.span.end;
        groups.push(current);
        run_findings(&groups, plus, out);
        i = end.max(i + 1);
    }
}

/// Personal data in one run of digit groups: the whole run if it is one number, else the
/// longest joins of neighbouring groups that are, from the left (two phone numbers written
/// one after the other with a space are two numbers, not one run of 22 digits).
fn run_findings(groups: &[Group], plus: bool, out: &mut Vec<Finding>) {
    let joined = |from: usize, to: usize| -> Vec<u8> {
        groups[from..=to]
            .iter()
            .flat_map(|g| g.digits.iter().copied())
            .collect()
    };
    let mut from = 0;
    while from < groups.len() {
        let found = (from..groups.len())
            .rev()
            .find_map(|to| classify_number(&joined(from, to), to > from).map(|kind| (to, kind)));
        match found {
            Some((to, kind)) => {
                // A leading + belongs to the number it starts.
                let start = groups[from].span.start - usize::from(plus && from == 0);
                out.push(Finding {
                    kind,
                    span: start..groups[to].span.end,
                });
                from = to + 1;
            }
            None => from += 1,
        }
    }
}

fn email_findings(text: &str, out: &mut Vec<Finding>) {
    let bytes = text.as_bytes();
    let local_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let domain_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-');
    for (at, _) in text.match_indices('@') {
        let mut start = at;
        while start > 0 && local_char(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && domain_char(bytes[end]) {
            end += 1;
        }
        while end > at + 1 && bytes[end - 1] == b'.' {
            end -= 1;
        }
        let domain = &text[at + 1..end];
        if start < at && domain.contains('.') && !domain.starts_with('.') {
            out.push(Finding {
                kind: PiiKind::Email,
                span: start..end,
            });
        }
    }
}

/// Every piece of personal data in `text`, in order. `text` should be folded
/// ([`crate::text::fold`]); [`mask_all`] folds it.
pub fn find(text: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    number_findings(text, &mut findings);
    email_findings(text, &mut findings);
    findings.sort_by_key(|f| f.span.start);
    // Overlapping findings become one: an e-mail's local part may look like a number, and
    // two addresses may share characters (`a@b.c@d.e`). The e-mail wins, and is masked up
    // to its last `@`.
    let mut merged: Vec<Finding> = Vec::with_capacity(findings.len());
    for finding in findings {
        match merged.last_mut() {
            Some(earlier) if finding.span.start < earlier.span.end => {
                earlier.span.end = earlier.span.end.max(finding.span.end);
                if finding.kind == PiiKind::Email {
                    earlier.kind = PiiKind::Email;
                }
            }
            _ => merged.push(finding),
        }
    }
    merged
}

/// `text` with personal data masked — numbers keep their first 3 and last 4 digits, e-mail
/// addresses their domain (after the last `@`) — and the kinds found (each once, in order of kind). Detection
/// reads the text folded, so full-width digits and invisible characters hide nothing; a
/// text with personal data comes back folded, one without it unchanged.
pub fn mask_all(text: &str) -> (String, Vec<PiiKind>) {
    let folded = crate::text::folded(text);
    let findings = find(&folded);
    if findings.is_empty() {
        return (text.to_owned(), Vec::new());
    }
    let text = folded.as_ref();
    let mut out = String::with_capacity(text.len());
    let mut kinds: Vec<PiiKind> = Vec::new();
    let mut last = 0;
    for finding in &findings {
        out.push_str(&text[last..finding.span.start]);
        let found = &text[finding.span.clone()];
        match finding.kind {
            PiiKind::Email => {
                let at = found.rfind('@').unwrap_or(0);
                out.extend(std::iter::repeat_n('*', at));
                out.push_str(&found[at..]);
            }
            _ => {
                let significant = found.chars().filter(|c| c.is_ascii_alphanumeric()).count();
                let mut seen = 0;
                for c in found.chars() {
                    if c.is_ascii_alphanumeric() {
                        seen += 1;
                        out.push(if seen <= 3 || seen + 4 > significant {
                            c
                        } else {
                            '*'
                        });
                    } else {
                        out.push(c);
                    }
                }
            }
        }
        last = finding.span.end;
        if !kinds.contains(&finding.kind) {
            kinds.push(finding.kind);
        }
    }
    out.push_str(&text[last..]);
    kinds.sort();
    (out, kinds)
}

/// `text` with personal data masked, and whether there was any.
pub fn mask(text: &str) -> (String, bool) {
    let (masked, kinds) = mask_all(text);
    (masked, !kinds.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<PiiKind> {
        find(text).into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn mobile_numbers_in_any_common_form() {
        assert_eq!(kinds("电话13812345678"), vec![PiiKind::Mobile]);
        assert_eq!(kinds("call +86 138 1234 5678 now"), vec![PiiKind::Mobile]);
        assert_eq!(kinds("138-1234-5678"), vec![PiiKind::Mobile]);
        assert_eq!(kinds("12812345678"), vec![], "no mobile prefix 12");
        assert_eq!(mask("电话13812345678").0, "电话138****5678");
    }

    #[test]
    fn landlines_need_an_area_code() {
        assert_eq!(kinds("座机 010-62345678"), vec![PiiKind::Landline]);
        assert_eq!(kinds("0755 88889999"), vec![PiiKind::Landline]);
        assert_eq!(
            kinds("房间 62345678"),
            vec![],
            "no area code: not enough to be sure"
        );
    }

    #[test]
    fn id_numbers_must_pass_their_check_digit() {
        // 11010519491231002X: the classic example number, valid check digit X.
        assert_eq!(kinds("身份证11010519491231002X"), vec![PiiKind::IdNumber]);
        assert_eq!(kinds("身份证110105194912310021"), vec![], "wrong check digit");
        assert!(valid_id_number(b"11010519491231002x"));
        assert_eq!(mask("11010519491231002X").0, "110***********002X");
    }

    #[test]
    fn bank_cards_must_pass_luhn() {
        assert_eq!(kinds("卡号 4111 1111 1111 1111"), vec![PiiKind::BankCard]);
        assert_eq!(kinds("卡号 6222020200001234560"), vec![], "fails Luhn");
        assert!(luhn(b"79927398713"));
        assert!(!luhn(b"79927398710"));
    }

    #[test]
    fn emails_keep_their_domain() {
        assert_eq!(
            mask("mail zhang.san@example.com.").0,
            "mail *********@example.com."
        );
        assert_eq!(kinds("a@b"), vec![], "needs a dotted domain");
        assert_eq!(kinds("@example.com"), vec![], "needs a local part");
    }

    #[test]
    fn ordinary_numbers_stay() {
        let text = "订单 12345 已收到，快递单号 SF1234567890，金额 99.50 元";
        assert_eq!(mask(text), (text.to_owned(), false));
    }

    #[test]
    fn full_width_and_invisible_characters_hide_nothing() {
        assert_eq!(mask("电话１３８１２３４５６７８").0, "电话138****5678");
        assert_eq!(
            mask("138\u{200b}1234\u{2060}5678").0,
            "138****5678",
            "zero-width characters between the digits"
        );
        let plain = "已修复，谢谢您的耐心ＯＫ";
        assert_eq!(
            mask(plain),
            (plain.to_owned(), false),
            "nothing found, nothing changed"
        );
    }

    #[test]
    fn addresses_sharing_characters_are_masked_as_one() {
        assert_eq!(mask("a@0.0@a.a").0, "*****@a.a");
        assert_eq!(mask("13812345678@qq.com").0, "***********@qq.com");
    }

    #[test]
    fn numbers_written_one_after_another_are_each_found() {
        assert_eq!(
            kinds("13812345678 13912345678"),
            vec![PiiKind::Mobile, PiiKind::Mobile]
        );
        assert_eq!(mask("13000000000 00").0, "130****0000 00");
        assert_eq!(
            kinds("+86 138 1234 5678"),
            vec![PiiKind::Mobile],
            "one number in groups"
        );
    }

    #[test]
    fn several_kinds_are_reported_once_each() {
        let (masked, found) = mask_all("13812345678 或 13912345678，邮箱 li@qq.com");
        assert_eq!(found, vec![PiiKind::Mobile, PiiKind::Email]);
        assert!(!masked.contains("12345678") && !masked.contains("li@"));
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// Text made of what personal data is written with: digits (also full-width),
        /// separators, `+`, `@`, letters, dots, and invisible characters between them.
        fn digits_and_separators() -> impl Strategy<Value = String> {
            "[0-9０-９ +@a-zX.\\-\u{200b}\u{2060}中]{0,48}"
        }

        fn mobile() -> impl Strategy<Value = String> {
            "1[3-9][0-9]{9}"
        }

        proptest! {
            /// Whatever is masked leaves nothing a second look would find.
            #[test]
            fn masking_leaves_nothing_to_find(text in digits_and_separators()) {
                let (masked, _) = mask_all(&text);
                let again = find(&crate::text::folded(&masked));
                prop_assert!(again.is_empty(), "{text:?} masked to {masked:?} still holds {again:?}");
            }

            /// A mobile number never leaves whole, whatever surrounds it.
            #[test]
            fn a_mobile_number_is_always_masked(
                before in digits_and_separators(),
                number in mobile(),
                after in digits_and_separators(),
            ) {
                // Digits glued to it make another, longer number; a separator does not.
                let text = format!("{before}中{number} {after}");
                let (masked, _) = mask_all(&text);
                prop_assert!(!masked.contains(&number), "{text:?} masked to {masked:?}");
            }
        }
    }
}
