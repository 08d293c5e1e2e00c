//! A statistical text model beside the keyword rules: a linear model over character
//! n-grams (1..=2) and whole Latin-script words of folded text (Traditional→Simplified, lower case), fitted by
//! multinomial logistic regression or naive Bayes, one model for intent, one for category
//! and one for escalation risk. Character n-grams need no word segmentation and carry over
//! between scripts once folded. Trained from the team's labelled examples by
//! `classify-train`, shipped as `model/model.json`, loaded at start; `classify-eval`
//! measures it on the held-out part.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that already are hashes (`stable_hash` of an n-gram).
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are used; fold anything else in so the hasher stays correct.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

use serde::{Deserialize, Serialize};

/// Longest n-gram. Three-character n-grams tripled the table, slowed every text, and did
/// worse on the held-out examples than pairs alone (`classify-eval`).
pub const MAX_N: usize = 2;

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    pub intent: String,
    pub category: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("line {line}: expected `intent<TAB>category<TAB>text`")]
    Malformed { line: usize },
    #[error("model is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses the labelled examples (`#` lines are comments). Texts are normalised as ingest
/// normalises every contact (NFKC: full-width punctuation and digits become ASCII), so the
/// models learn from what they will be shown.
pub fn parse_examples(tsv: &str) -> Result<Vec<Example>, ModelError> {
    tsv.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|(i, line)| {
            let mut fields = line.splitn(3, '\t');
            match (fields.next(), fields.next(), fields.next()) {
                (Some(intent), Some(category), Some(text)) if !text.trim().is_empty() => Ok(Example {
                    intent: intent.trim().to_owned(),
                    category: category.trim().to_owned(),
                    text: closedloop_runtime::text::normalise(text),
                }),
                _ => Err(ModelError::Malformed { line: i + 1 }),
            }
        })
        .collect()
}

/// The kind the escalation-risk corpus gives an ordinary contact (see [`risk_corpus`]).
pub const ORDINARY_CONTACT: &str = "contact";

/// The escalation-risk corpus: `risk_examples` (texts written for it, labelled "risk" or
/// "none" with a kind) and every contact of `contacts` (the labelled examples) they do not
/// list, as "none" of kind [`ORDINARY_CONTACT`]. The written texts are mostly threats and
/// innocent uses of the lists' words; the ordinary contacts are what the detector mostly
/// sees, and without them it flagged one in six of them. A contact that does
/// carry risk is listed in `risk_examples` with its kind.
pub fn risk_corpus(mut risk_examples: Vec<Example>, contacts: &[Example]) -> Vec<Example> {
    let listed: std::collections::HashSet<String> = risk_examples.iter().map(|e| e.text.clone()).collect();
    risk_examples.extend(
        contacts
            .iter()
            .filter(|c| !listed.contains(&c.text))
            .map(|c| Example {
                intent: "none".to_owned(),
                category: ORDINARY_CONTACT.to_owned(),
                text: c.text.clone(),
            }),
    );
    risk_examples
}

/// FNV-1a of a text: stable across platforms and releases, unlike the std hasher, so
/// splits made with it never change as examples are added.
pub fn stable_hash(text: &str) -> u64 {
    fnv_extend(FNV_OFFSET, text.as_bytes())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv_extend(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether an example belongs to the held-out part: a fifth of them, chosen by a stable
/// hash of the text.
pub fn is_held_out(text: &str) -> bool {
    stable_hash(text).is_multiple_of(5)
}

/// A bar no confidence reaches (confidences are at most 1); JSON has no infinity.
pub const NEVER: f32 = 2.0;

/// How far the engine lets a model overrule the keyword rules: the model decides when it
/// is at least this sure, with one bar for when the rules found something and one for when
/// they found nothing. `classify-train` chooses both by cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Trust {
    pub over_rules: f32,
    pub without_rules: f32,
}

impl Trust {
    /// Never overrule the rules, and decide alone only when nearly certain: what the
    /// engine did before the bars were cross-validated (and model files without them get).
    pub const CAUTIOUS: Trust = Trust {
        over_rules: NEVER,
        without_rules: 0.99,
    };

    fn bar(&self, rules_found: bool) -> f32 {
        if rules_found {
            self.over_rules
        } else {
            self.without_rules
        }
    }

    /// Whether the model can decide at all here (otherwise it need not run).
    pub fn could_decide(&self, rules_found: bool) -> bool {
        self.bar(rules_found) <= 1.0
    }

    pub fn model_decides(&self, rules_found: bool, confidence: f32) -> bool {
        confidence >= self.bar(rules_found)
    }
}

fn cautious() -> Trust {
    Trust::CAUTIOUS
}

fn never() -> f32 {
    NEVER
}

mod ngram;
#[cfg(test)]
mod tests;

pub use ngram::*;

/// One pass of the models over a text: their predictions, and the text's known n-grams of
/// more than one character with their entries in the joint table.
#[derive(Debug, Default)]
pub struct Scan<'t> {
    pub intent: Option<Prediction>,
    pub category: Option<Prediction>,
    pub risk: Option<Prediction>,
    seen: Vec<(&'t str, u32)>,
}

/// How many times a correction counts in training: an agent's label outweighs a line of
/// the shipped corpus.
pub const CORRECTION_WEIGHT: usize = 3;

/// The intent and category agents gave a text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corrected {
    pub intent: String,
    pub category: String,
}

/// The shipped pair of models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "TextModelsFile")]
pub struct TextModels {
    /// Which examples (count and split) trained them.
    pub trained_on: String,
    pub intent: NgramModel,
    pub category: NgramModel,
    pub intent_trust: Trust,
    pub category_trust: Trust,
    /// Agents' corrections by folded (masked) text: the same text gets the same labels
    /// again, whatever the models say.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub corrected: BTreeMap<String, Corrected>,
    /// Escalation risk, a class per kind and one for none, trained on the risk corpus (see
    /// [`risk_corpus`]); where the rules' word lists found none, it flags a text when it is
    /// at least `risk_bar` sure of any kind.
    #[serde(default)]
    pub risk: Option<NgramModel>,
    #[serde(default = "never")]
    pub risk_bar: f32,
    /// Where the word lists find risk, a risk model less sure than these that there is
    /// any overrules them ("老人机" is a phone, not an elderly customer); 0 never does.
    pub risk_vetoes: RiskVetoes,
    /// Where the engine takes a text for praise or noise, a risk model at least this sure
    /// of risk makes it a complaint ("這件事我會投稿給新聞台" is no chatter).
    #[serde(default = "never")]
    pub risk_over_intent: f32,
    /// Every n-gram any of the three models knows, for one lookup per n-gram.
    #[serde(skip_serializing)]
    joint: Joint,
}

/// The three models' rows side by side: an n-gram's entry says which models know it (for
/// the evidence) and holds, in `weights`, its intent, category and risk weights in one
/// run, so that scoring a known n-gram reads one place. A model that does not know the
/// n-gram contributes zeros there.
#[derive(Debug, Clone, Default)]
struct Joint {
    entries: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    known: Vec<[bool; 3]>,
    weights: Vec<f32>,
    /// Where each model's weights start within a run, and the run's width.
    offsets: [usize; 4],
}

impl Joint {
    /// The n-grams of `scan` that model `at` (0 intent, 1 category, 2 risk) knows, with
    /// their weights in it.
    fn rows<'a>(&'a self, scan: &'a Scan<'a>, at: usize) -> impl Iterator<Item = (&'a str, &'a [f32])> + 'a {
        let width = self.offsets[3];
        scan.seen.iter().filter_map(move |(gram, entry)| {
            let entry = *entry as usize;
            if !self.known.get(entry)?[at] {
                return None;
            }
            let run = entry * width;
            Some((
                *gram,
                self.weights
                    .get(run + self.offsets[at]..run + self.offsets[at + 1])?,
            ))
        })
    }
}

#[derive(Deserialize)]
struct TextModelsFile {
    trained_on: String,
    intent: NgramModel,
    category: NgramModel,
    #[serde(default = "cautious")]
    intent_trust: Trust,
    #[serde(default = "cautious")]
    category_trust: Trust,
    #[serde(default)]
    corrected: BTreeMap<String, Corrected>,
    #[serde(default)]
    risk: Option<NgramModel>,
    #[serde(default = "never")]
    risk_bar: f32,
    #[serde(default)]
    risk_vetoes: Option<RiskVetoes>,
    /// One bar for every list, as model files had before [`RiskVetoes`].
    #[serde(default)]
    risk_veto_bar: f32,
    #[serde(default = "never")]
    risk_over_intent: f32,
}

impl From<TextModelsFile> for TextModels {
    fn from(file: TextModelsFile) -> Self {
        let mut models = Self {
            trained_on: file.trained_on,
            intent: file.intent,
            category: file.category,
            intent_trust: file.intent_trust,
            category_trust: file.category_trust,
            corrected: file.corrected,
            risk: file.risk,
            risk_bar: file.risk_bar,
            risk_vetoes: file.risk_vetoes.unwrap_or(RiskVetoes::all(file.risk_veto_bar)),
            risk_over_intent: file.risk_over_intent,
            joint: Joint::default(),
        };
        models.index();
        models
    }
}

impl TextModels {
    /// Trains both models with `learner` on the training part of `examples` (never the
    /// held-out part).
    pub fn train(learner: Learner, examples: &[Example]) -> Self {
        Self::train_with_corrections(learner, examples, &[])
    }

    /// As [`TextModels::train`], with agents' `corrections` too: each trains
    /// [`CORRECTION_WEIGHT`] times (none is held out: they are not the shipped corpus), and
    /// each text's last correction is kept as its labels.
    pub fn train_with_corrections(learner: Learner, examples: &[Example], corrections: &[Example]) -> Self {
        let weighted = corrections
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, CORRECTION_WEIGHT));
        let training: Vec<(String, &Example)> = examples
            .iter()
            .filter(|e| !is_held_out(&e.text))
            .chain(weighted)
            .map(|e| (crate::rules::fold(&e.text), e))
            .collect();
        let corrected = corrections
            .iter()
            .map(|e| {
                let labels = Corrected {
                    intent: e.intent.clone(),
                    category: e.category.clone(),
                };
                (crate::rules::fold(&e.text), labels)
            })
            .collect();
        let intent = NgramModel::train(
            learner,
            training.iter().map(|(t, e)| (t.as_str(), e.intent.as_str())),
        );
        // Category only where it means something: complaints and inquiries.
        let category = NgramModel::train(
            learner,
            training
                .iter()
                .filter(|(_, e)| e.intent == "complaint" || e.intent == "inquiry")
                .map(|(t, e)| (t.as_str(), e.category.as_str())),
        );
        let trained_on = if corrections.is_empty() {
            format!("{} of {} examples", training.len(), examples.len())
        } else {
            format!(
                "{} of {} examples and {} corrections",
                training.len() - corrections.len() * CORRECTION_WEIGHT,
                examples.len(),
                corrections.len()
            )
        };
        TextModelsFile {
            trained_on,
            intent,
            category,
            intent_trust: Trust::CAUTIOUS,
            category_trust: Trust::CAUTIOUS,
            corrected,
            risk: None,
            risk_bar: NEVER,
            risk_vetoes: None,
            risk_veto_bar: 0.0,
            risk_over_intent: NEVER,
        }
        .into()
    }

    /// Each n-gram's rows and weights in the intent, category and risk models, for one
    /// lookup per n-gram.
    fn index(&mut self) {
        let models = [Some(&self.intent), Some(&self.category), self.risk.as_ref()];
        let mut offsets = [0; 4];
        for (at, model) in models.iter().enumerate() {
            offsets[at + 1] = offsets[at] + model.map_or(0, |m| m.classes.len());
        }
        let mut joint = Joint {
            offsets,
            ..Joint::default()
        };
        for (at, model) in models.into_iter().enumerate() {
            for (hash, row) in model.into_iter().flat_map(|m| &m.rows) {
                let next = joint.known.len() as u32;
                let entry = *joint.entries.entry(*hash).or_insert(next);
                if entry == next {
                    joint.known.push([false; 3]);
                    joint.weights.resize(joint.weights.len() + offsets[3], 0.0);
                }
                joint.known[entry as usize][at] = true;
                if let Some(weights) = model.and_then(|m| m.row_at(*row)) {
                    let run = entry as usize * offsets[3];
                    joint.weights[run + offsets[at]..run + offsets[at + 1]].copy_from_slice(weights);
                }
            }
        }
        self.joint = joint;
    }

    /// Intent and category predictions for a folded text, each only if asked for, in one
    /// pass over its n-grams. Same results as each model's `predict`.
    pub fn predict(
        &self,
        text: &str,
        intent: bool,
        category: bool,
    ) -> (Option<Prediction>, Option<Prediction>) {
        let scan = self.scan(text, intent, category, false);
        (scan.intent, scan.category)
    }

    /// As [`TextModels::predict`], with the risk model's verdict too when asked for (and
    /// there is one that can flag), keeping the known n-grams of the text with their rows so
    /// that the evidence for a prediction needs no second pass over the text.
    pub fn scan<'t>(&self, text: &'t str, intent: bool, category: bool, risk: bool) -> Scan<'t> {
        let risk_model = self.risk.as_ref().filter(|_| {
            risk && (self.risk_bar <= 1.0 || self.risk_over_intent <= 1.0 || self.risk_vetoes.can_overrule())
        });
        if !intent && !category && risk_model.is_none() {
            return Scan::default();
        }
        let joint = &self.joint;
        let width = joint.offsets[3];
        let mut sums = vec![0.0; width];
        let mut seen = Vec::new();
        let grams = walk_ngrams(text, |gram, hash| {
            let Some(&entry) = joint.entries.get(&hash) else {
                return false;
            };
            let run = entry as usize * width;
            if let Some(weights) = joint.weights.get(run..run + width) {
                add_scaled(&mut sums, weights, 1.0);
            }
            if !is_one_char(gram) {
                seen.push((gram, entry));
            }
            true
        });
        let sums_of = |at: usize| sums[joint.offsets[at]..joint.offsets[at + 1]].to_vec();
        Scan {
            intent: intent.then(|| self.intent.verdict(sums_of(0), grams)),
            category: category.then(|| self.category.verdict(sums_of(1), grams)),
            risk: risk_model.map(|m| m.verdict(sums_of(2), grams)),
            seen,
        }
    }

    /// The n-grams that weighed most for the intent `scan` predicted.
    pub fn intent_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Vec<String> {
        self.intent.strongest(self.joint.rows(scan, 0), prediction)
    }

    /// The n-grams that weighed most for the category `scan` predicted.
    pub fn category_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Vec<String> {
        self.category.strongest(self.joint.rows(scan, 1), prediction)
    }

    /// The likeliest kind of escalation risk in a risk verdict, and the n-grams that
    /// weighed most for it against no risk.
    pub fn risk_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Option<(&str, Vec<String>)> {
        let model = self.risk.as_ref()?;
        let calm = model.class_index(NO_RISK)?;
        let kind = prediction.likeliest_except(calm)?;
        let evidence = model.strongest(self.joint.rows(scan, 2), &prediction.as_choice(kind, calm));
        Some((model.classes().get(kind)?.as_str(), evidence))
    }

    /// Adds the escalation-risk model, trained with `learner` on the training part of
    /// `examples` (each risky text labelled with its kind, see [`risk_label`]); `bar` is
    /// where it flags (see `calibrate::risk_bars`); where the lists flag risk, it overrules
    /// them below `vetoes`; where the engine takes a text for praise or noise, it makes it a
    /// complaint at `over_intent` or above.
    pub fn with_risk(
        mut self,
        learner: Learner,
        examples: &[Example],
        bar: f32,
        vetoes: RiskVetoes,
        over_intent: f32,
    ) -> Self {
        let training: Vec<(String, &str)> = examples
            .iter()
            .filter(|e| !is_held_out(&e.text))
            .map(|e| (crate::rules::fold(&e.text), risk_label(e)))
            .collect();
        self.risk = Some(NgramModel::train(
            learner,
            training.iter().map(|(t, l)| (t.as_str(), *l)),
        ));
        self.risk_bar = bar;
        self.risk_vetoes = vetoes;
        self.risk_over_intent = over_intent;
        self.index();
        self
    }

    /// Whether a risk verdict flags the text (where the lists found nothing).
    pub fn flags_risk(&self, prediction: &Prediction) -> bool {
        self.risk_of(prediction) >= self.risk_bar
    }

    /// Whether a risk verdict is sure enough of risk to make praise or noise a complaint.
    pub fn overrules_intent(&self, prediction: &Prediction) -> bool {
        self.risk_of(prediction) >= self.risk_over_intent
    }

    /// Whether a risk verdict overrules the risk that `lists` found.
    pub fn vetoes_risk(&self, prediction: &Prediction, lists: RiskLists) -> bool {
        self.risk_of(prediction) < self.risk_vetoes.bar(lists)
    }

    /// The probability of escalation risk in a risk verdict.
    pub fn risk_of(&self, prediction: &Prediction) -> f32 {
        self.risk
            .as_ref()
            .map_or(0.0, |m| risk_probability(m, prediction))
    }

    /// The labels agents gave `masked_text` (as classify masks a text), if they corrected it.
    pub fn corrected(&self, masked_text: &str) -> Option<&Corrected> {
        if self.corrected.is_empty() {
            return None;
        }
        self.corrected.get(&crate::rules::fold(masked_text))
    }

    pub fn builtin() -> Result<Self, ModelError> {
        Ok(serde_json::from_str(include_str!("../../model/model.json"))?)
    }

    pub fn load(path: Option<&str>) -> Result<Self, ModelError> {
        match path {
            None => Self::builtin(),
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(serde_json::from_str(&json)?)
            }
        }
    }
}

/// How sure a risk model is that a text carries risk of any kind: 1 − P([`NO_RISK`]).
/// Model files from before the kinds have one class, "risk", beside it.
pub fn risk_probability(model: &NgramModel, prediction: &Prediction) -> f32 {
    model
        .class_index(NO_RISK)
        .map_or(0.0, |calm| 1.0 - prediction.probability(calm))
}

/// Which of the rules' escalation-risk lists found words in a text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RiskLists {
    /// Threats to go to the media, a regulator or court.
    pub threat: bool,
    /// Repeated contact, in words or counted.
    pub repeat: bool,
    pub vulnerable: bool,
}

impl RiskLists {
    pub fn any(&self) -> bool {
        self.threat || self.repeat || self.vulnerable
    }
}

/// How sure of no risk the risk model must be to overrule each list: the lists differ in
/// how often their words are used innocently ("老人机" against "我要起诉"), so
/// `calibrate::risk_bars` chooses a bar for each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RiskVetoes {
    pub threat: f32,
    pub repeat: f32,
    pub vulnerable: f32,
}

impl RiskVetoes {
    /// The same bar for every list.
    pub const fn all(bar: f32) -> Self {
        Self {
            threat: bar,
            repeat: bar,
            vulnerable: bar,
        }
    }

    /// Whether the model overrules any list at all.
    pub fn can_overrule(&self) -> bool {
        [self.threat, self.repeat, self.vulnerable]
            .iter()
            .any(|bar| *bar > 0.0)
    }

    /// The bar below which the model overrules `lists`: the lowest of theirs, since the
    /// risk stands if any list's bar is met. 0 (never) where no list found anything.
    pub fn bar(&self, lists: RiskLists) -> f32 {
        [
            (lists.threat, self.threat),
            (lists.repeat, self.repeat),
            (lists.vulnerable, self.vulnerable),
        ]
        .into_iter()
        .filter(|(found, _)| *found)
        .map(|(_, bar)| bar)
        .reduce(f32::min)
        .unwrap_or(0.0)
    }
}

/// The risk model's label for texts without escalation risk.
pub const NO_RISK: &str = "none";

/// What the risk model learns of an example: its kind of risk, or [`NO_RISK`].
pub fn risk_label(example: &Example) -> &str {
    if example.intent == "risk" {
        example.category.as_str()
    } else {
        NO_RISK
    }
}

/// The models classify runs with, from the shipped file or `file`, replaced whole when the
/// file is read again (on SIGHUP): a classification in progress keeps the models it began
/// with.
#[derive(Debug, Clone)]
pub struct SharedModels {
    current: std::sync::Arc<std::sync::RwLock<std::sync::Arc<TextModels>>>,
    file: Option<String>,
}

impl SharedModels {
    pub fn load(file: Option<String>) -> Result<Self, ModelError> {
        let models = TextModels::load(file.as_deref())?;
        Ok(Self {
            current: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(models))),
            file,
        })
    }

    pub fn current(&self) -> std::sync::Arc<TextModels> {
        // A poisoned lock still holds whole models: replacing them is one assignment.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the file again; if it cannot be read or parsed, the models in use stay and the
    /// error says why. Returns what the new models were trained on.
    pub fn reload(&self) -> Result<String, ModelError> {
        let models = TextModels::load(self.file.as_deref())?;
        let trained_on = models.trained_on.clone();
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = std::sync::Arc::new(models);
        Ok(trained_on)
    }
}
