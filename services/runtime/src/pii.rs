//! Personal data in free text: finding and masking it, so it never reaches logs or public
//! replies. Classify masks complaint texts; notify guards every public reply with it.

/// Masks digit runs that look like phone, id or card numbers (7+ digits), keeping at most
/// the first 3 and last 4 digits, and the local part of e-mail addresses.
/// Returns the masked text and whether anything was masked.
pub fn mask(text: &str) -> (String, bool) {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut masked = false;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == 'X' || chars[i] == 'x') {
                i += 1;
            }
            let run = &chars[start..i];
            if run.len() >= 7 {
                masked = true;
                let keep_head = if run.len() >= 11 { 3 } else { 0 };
                for (k, c) in run.iter().enumerate() {
                    out.push(if k < keep_head || k + 4 >= run.len() {
                        *c
                    } else {
                        '*'
                    });
                }
            } else {
                out.extend(run);
            }
        } else if chars[i] == '@' && i > 0 && chars[i - 1].is_ascii_alphanumeric() {
            // Replace the local part already written with asterisks.
            let mut local = 0;
            while out.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-') {
                out.pop();
                local += 1;
            }
            out.extend(std::iter::repeat_n('*', local.max(1)));
            out.push('@');
            masked = true;
            i += 1;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    (out, masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_numbers_and_email_local_parts() {
        assert_eq!(mask("电话13812345678").0, "电话138****5678");
        assert_eq!(mask("mail zhang.san@example.com").0, "mail *********@example.com");
        assert_eq!(mask("订单 12345 已收到"), ("订单 12345 已收到".to_owned(), false));
    }
}
