//! Folding text to the form every detector reads: Unicode NFKC (full-width letters, digits
//! and punctuation become half-width; compatibility forms such as ① or ﷺ expand), with
//! format characters (category Cf: zero-width spaces and joiners, bidirectional controls,
//! soft hyphens) removed. Invisible characters would otherwise hide a phone number from the
//! personal-data detector or a keyword from the classifier, and full-width digits would
//! pass the masking of public replies.

use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Whether `c` is a format character (Unicode category Cf): invisible, and meaningless to
/// the words around it.
pub fn is_format(c: char) -> bool {
    // None lies below the soft hyphen or among CJK punctuation and ideographs, which is
    // what most texts are made of; the table lookup is for the rest.
    !(c < '\u{AD}' || matches!(c, '\u{3000}'..='\u{9FFF}')) && c.general_category() == GeneralCategory::Format
}

/// ASCII, CJK ideographs, and the CJK punctuation NFKC keeps (、。〈〉《》「」『』【】):
/// characters that are their own NFKC form, are not format characters, and compose with
/// none of each other, so a text of only these is folded already.
fn is_plainly_folded(c: char) -> bool {
    c.is_ascii() || matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3001}'..='\u{3002}' | '\u{3008}'..='\u{3011}')
}

/// `text` folded: format characters removed, then NFKC.
pub fn fold(text: &str) -> impl Iterator<Item = char> + '_ {
    text.chars().filter(|c| !is_format(*c)).nfkc()
}

/// A contact's text as every service reads it: folded, control characters dropped,
/// whitespace runs collapsed to one space, trimmed. The same words compare equal whatever
/// the channel or input method did to them.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in fold(text) {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else if !c.is_control() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// [`fold`] into a string, borrowing `text` when folding changes nothing.
pub fn folded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.is_ascii() {
        return std::borrow::Cow::Borrowed(text);
    }
    // Most texts arrive folded (ingest folds every contact), and confirming that costs a
    // fraction of folding again; for the characters most texts are made of it needs no
    // table at all.
    if text.chars().all(is_plainly_folded)
        || (is_nfkc_quick(text.chars()) == IsNormalized::Yes && !text.chars().any(is_format))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let folded: String = fold(text).collect();
    if folded == text {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(folded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_format_character_where_the_shortcut_skips_the_table() {
        let skipped = ('\0'..'\u{AD}').chain('\u{3000}'..='\u{9FFF}');
        for c in skipped {
            assert_ne!(c.general_category(), GeneralCategory::Format, "{c:?}");
        }
        assert!(is_format('\u{AD}') && is_format('\u{200B}') && is_format('\u{FEFF}'));
    }

    #[test]
    fn plainly_folded_characters_are_their_own_fold() {
        let plain = ('\0'..='\u{FFFF}').filter(|c| is_plainly_folded(*c));
        for c in plain {
            assert!(fold(c.encode_utf8(&mut [0; 4])).eq([c]), "{c:?}");
        }
    }

    #[test]
    fn folded_borrows_only_text_that_is_folded_already() {
        assert!(matches!(
            folded("宽带断网了, 已经3天"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(folded("宽带断网了，已经３天"), "宽带断网了,已经3天");
        assert_eq!(folded("宽带\u{200B}断网"), "宽带断网");
        // A combining accent after its letter composes.
        assert_eq!(folded("cafe\u{301}"), "caf\u{e9}");
    }

    #[test]
    fn folds_width_and_drops_invisible_characters() {
        assert_eq!(folded("１３８\u{200b}１２３４\u{2060}５６７８"), "13812345678");
        assert_eq!(folded("退\u{202e}款"), "退款");
        assert_eq!(folded("\u{feff}ＡＢＣ"), "ABC");
        assert_eq!(folded("\u{00ad}"), "");
        assert_eq!(folded("①号楼"), "1号楼");
        assert!(matches!(folded("plain ascii"), std::borrow::Cow::Borrowed(_)));
        assert!(matches!(folded("已经修好了"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn format_characters_are_category_cf() {
        for c in [
            '\u{200b}', '\u{200d}', '\u{2060}', '\u{202e}', '\u{2066}', '\u{feff}', '\u{00ad}',
        ] {
            assert!(is_format(c), "{:?}", c);
        }
        for c in ['a', '中', ' ', '\n', '😀'] {
            assert!(!is_format(c), "{:?}", c);
        }
    }
}
