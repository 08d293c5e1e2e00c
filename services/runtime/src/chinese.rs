//! Simplified and Traditional Chinese: which script a text is written in, and folding
//! Traditional characters to Simplified so rules and models match both. Character pairs
//! come from fast2s (MIT, 2,700+ pairs derived from OpenCC).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use closedloop_proto::v1::Script;

/// Characters that only the Traditional script uses, and those only Simplified uses,
/// derived once from the Traditional→Simplified pairs.
struct ScriptTables {
    traditional: HashSet<char>,
    simplified: HashSet<char>,
}

static TABLES: LazyLock<ScriptTables> = LazyLock::new(|| {
    let mut traditional = HashSet::new();
    let mut targets = HashSet::new();
    let han = ('\u{3400}'..='\u{4DBF}')
        .chain('\u{4E00}'..='\u{9FFF}')
        .chain('\u{F900}'..='\u{FAFF}');
    let mut buffer = [0u8; 4];
    for c in han {
        let folded = fast2s::convert(c.encode_utf8(&mut buffer));
        let mut chars = folded.chars();
        if let (Some(s), None) = (chars.next(), chars.next())
            && s != c
        {
            traditional.insert(c);
            targets.insert(s);
        }
    }
    // Fold targets that Traditional text uses too (了 is the target of 瞭, 干 of 乾, ...)
    // say nothing about the script.
    let shared: HashSet<char> = SHARED_CHARACTERS.chars().collect();
    let simplified = targets
        .difference(&traditional)
        .filter(|c| !shared.contains(c))
        .copied()
        .collect();
    ScriptTables {
        traditional,
        simplified,
    }
});

/// Characters that are fold targets but also standard in Traditional text.
const SHARED_CHARACTERS: &str = "了干后里面只台云谷出范制系松板表丑斗几家卷克困曲舍沈千秋向须余占才万御致准征症借吁岳涂术胜咸蒙梁累蔑凄冲伙划";

fn is_han(c: char) -> bool {
    matches!(c, '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' | '\u{F900}'..='\u{FAFF}')
}

/// The script of `text`: `None` without Han characters. Otherwise the script whose
/// distinctive characters dominate; `Mixed` when the minority has at least two distinctive
/// characters and a quarter of them (a stray character, or a name, does not make a text
/// mixed). Han text without distinctive characters counts as Simplified, the common case
/// on the mainland channels this serves.
pub fn detect_script(text: &str) -> Script {
    let tables = &*TABLES;
    let (mut han, mut traditional, mut simplified) = (false, 0usize, 0usize);
    for c in text.chars().filter(|c| is_han(*c)) {
        han = true;
        traditional += usize::from(tables.traditional.contains(&c));
        simplified += usize::from(tables.simplified.contains(&c));
    }
    let minority = traditional.min(simplified);
    if !han {
        Script::None
    } else if minority >= 2 && minority * 4 >= traditional + simplified {
        Script::Mixed
    } else if traditional > simplified {
        Script::Traditional
    } else {
        Script::Simplified
    }
}

/// `text` with Traditional characters replaced by their Simplified forms, as fast2s
/// replaces them.
pub fn fold_to_simplified(text: &str) -> String {
    // fast2s looks every character up in three maps; here one bit says a character stays,
    // and one map lookup folds the rest, unless a character's fold depends on its
    // neighbours, which is left to fast2s.
    let folding = &*FOLDING;
    let mut folded = String::with_capacity(text.len());
    for c in text.chars() {
        let code = c as usize;
        let stays = code < 0x800
            || folding
                .unchanged
                .get(code / 64)
                .is_some_and(|bits| bits & (1 << (code % 64)) != 0);
        if stays {
            folded.push(c);
        } else if let Some(simplified) = folding.folds.get(&c) {
            folded.push(*simplified);
        } else {
            return fast2s::convert(text);
        }
    }
    folded
}

/// Characters whose fold in fast2s 0.3 depends on their neighbours (乾隆 keeps 乾, 看著
/// becomes 看着): its exception tables, which it does not export.
const FOLDED_IN_CONTEXT: &str = "兒覆夥藉瞭麽幺於乾著苧闔鍾讎畫";

/// What fast2s does to each character below U+10000 alone. (It folds only three-byte
/// characters: those below U+0800 always stay, and so do those beyond U+FFFF.)
struct Folding {
    /// One bit per character, set where the character stays as it is in any context.
    unchanged: Vec<u64>,
    /// The Simplified form of each character that folds the same in any context.
    folds: HashMap<char, char>,
}

static FOLDING: LazyLock<Folding> = LazyLock::new(|| {
    let mut unchanged = vec![0u64; 0x10000 / 64];
    let mut folds = HashMap::new();
    let mut buffer = [0u8; 4];
    for c in ('\u{800}'..='\u{FFFF}').filter(|c| !FOLDED_IN_CONTEXT.contains(*c)) {
        let folded = fast2s::convert(c.encode_utf8(&mut buffer));
        let mut chars = folded.chars();
        match (chars.next(), chars.next()) {
            (Some(s), None) if s == c => unchanged[c as usize / 64] |= 1 << (c as usize % 64),
            (Some(s), None) => {
                folds.insert(c, s);
            }
            _ => {}
        }
    }
    Folding { unchanged, folds }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_script() {
        assert_eq!(detect_script("宽带断网了，请尽快处理"), Script::Simplified);
        assert_eq!(detect_script("寬頻斷網了，請盡快處理"), Script::Traditional);
        assert_eq!(detect_script("宽带斷網了，还没修好"), Script::Mixed);
        assert_eq!(detect_script("這個網路，一直斷線，后来更糟"), Script::Traditional);
        assert_eq!(detect_script("my broadband is down"), Script::None);
        assert_eq!(detect_script("中文"), Script::Simplified);
    }

    #[test]
    fn every_character_alone_folds_as_fast2s_folds_it() {
        let mut buffer = [0u8; 4];
        for c in '\u{0}'..='\u{FFFF}' {
            let c = c.encode_utf8(&mut buffer);
            assert_eq!(fold_to_simplified(c), fast2s::convert(c), "{c}");
        }
    }

    #[test]
    fn folds_as_fast2s_does_whether_or_not_the_text_looks_simplified() {
        for text in [
            "宽带断网了,还没修好",
            "寬頻斷網了",
            "这是藉口",
            "看著办吧",
            "苧麻衬衫",
            "乾隆年间的乾货",
            "寬頻斷網，看著辦吧，乾隆",
            "計畫和企畫都要畫出來",
            "emoji 😀 and 𠀀",
        ] {
            assert_eq!(fold_to_simplified(text), fast2s::convert(text), "{text}");
        }
        assert_eq!(fold_to_simplified("看著办吧"), "看着办吧");
    }

    #[test]
    fn folds_traditional_to_simplified() {
        assert_eq!(fold_to_simplified("寬頻斷網了"), "宽频断网了");
        assert_eq!(fold_to_simplified("already simple 网"), "already simple 网");
    }
}
