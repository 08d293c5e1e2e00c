//! Chooses how far the engine trusts each model over the keyword rules (`Trust`) by k-fold
//! cross-validation on the training examples alone, so the held-out part stays unseen
//! until `classify-eval`. The search itself is a plain function over recorded verdicts.

use closedloop_proto::v1::{Channel, Intent};

use crate::engine::{self, Contact, rule_signals};
use crate::model::{
    Example, Learner, NEVER, ORDINARY_CONTACT, RiskLists, RiskVetoes, TextModels, Trust, is_held_out,
    risk_label, risk_probability, stable_hash,
};
use crate::rules::{Rules, fold};

/// Folds of the cross-validation.
pub const FOLDS: u64 = 5;

/// The bars tried, from "the model always decides" to "never".
const BARS: [f32; 11] = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, NEVER];

/// One example's verdicts, from the rules and from a model that never saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdicts {
    pub truth: String,
    pub by_rules: String,
    pub rules_found: bool,
    pub by_model: String,
    pub confidence: f32,
}

impl Verdicts {
    fn decided(&self, trust: Trust) -> &str {
        if trust.model_decides(self.rules_found, self.confidence) {
            &self.by_model
        } else {
            &self.by_rules
        }
    }
}

/// The trust that gets the most verdicts right, and its accuracy. Ties go to the higher
/// bars: where the model adds nothing, the rules' reasons are easier to read.
pub fn best_trust(verdicts: &[Verdicts]) -> (Trust, f64) {
    let right = |trust: Trust| verdicts.iter().filter(|v| v.decided(trust) == v.truth).count();
    let rules_only = Trust {
        over_rules: NEVER,
        without_rules: NEVER,
    };
    let (mut best, mut best_right) = (rules_only, right(rules_only));
    // From the highest bars down, so a lower bar wins only by getting more right.
    for over_rules in BARS.iter().rev() {
        for without_rules in BARS.iter().rev() {
            let trust = Trust {
                over_rules: *over_rules,
                without_rules: *without_rules,
            };
            let right = right(trust);
            if right > best_right {
                (best, best_right) = (trust, right);
            }
        }
    }
    (best, best_right as f64 / verdicts.len().max(1) as f64)
}

/// What cross-validation found: the chosen trust per model, and the accuracy of the rules
/// alone and of the engine with that trust, over all folds.
#[derive(Debug, Clone)]
pub struct CrossValidation {
    pub intent: Trust,
    pub intent_accuracy: f64,
    pub rules_intent_accuracy: f64,
    pub category: Trust,
    pub category_accuracy: f64,
    pub rules_category_accuracy: f64,
    pub examples: usize,
}

fn rules_accuracy(verdicts: &[Verdicts]) -> f64 {
    let right = verdicts.iter().filter(|v| v.by_rules == v.truth).count();
    right as f64 / verdicts.len().max(1) as f64
}

/// `work` on every item, as many at a time as there are cores (folds train apart), with
/// the results in the items' order, so that what is chosen from them does not depend on
/// the machine.
fn side_by_side<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut results = Vec::with_capacity(items.len());
    for batch in items.chunks(cores) {
        std::thread::scope(|scope| {
            let running: Vec<_> = batch.iter().map(|item| scope.spawn(|| work(item))).collect();
            for done in running {
                results.push(
                    done.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
        });
    }
    results
}

/// Cross-validates on the training part of `examples` (the held-out part is skipped).
pub fn cross_validate(examples: &[Example], rules: &Rules, learner: Learner) -> CrossValidation {
    let training: Vec<&Example> = examples.iter().filter(|e| !is_held_out(&e.text)).collect();
    // The held-out split took hash % 5 == 0; the folds use the next digit of the hash.
    let fold_of = |e: &Example| (stable_hash(&e.text) / 5) % FOLDS;
    let parts: Vec<u64> = (0..FOLDS).collect();
    let fold_models = side_by_side(&parts, |part| {
        let train: Vec<Example> = training
            .iter()
            .filter(|e| fold_of(e) != *part)
            .map(|e| (*e).clone())
            .collect();
        TextModels::train(learner, &train)
    });
    let mut intents = Vec::new();
    let mut categories = Vec::new();
    for (part, models) in parts.iter().zip(&fold_models) {
        for example in training.iter().filter(|e| fold_of(e) == *part) {
            let folded = fold(&example.text);
            let signals = rule_signals(rules, &example.text);
            let by_rules = engine::classify(
                rules,
                None,
                &Contact {
                    text: &example.text,
                    channel: Channel::Wechat,
                    poster: None,
                    region_hint: "",
                },
            );
            let intent = models.intent.predict(&folded);
            intents.push(Verdicts {
                truth: example.intent.clone(),
                by_rules: by_rules.intent().label(),
                rules_found: signals.intent_signal,
                by_model: intent.class,
                confidence: intent.confidence,
            });
            if example.intent == "complaint" || example.intent == "inquiry" {
                let category = models.category.predict(&folded);
                categories.push(Verdicts {
                    truth: example.category.clone(),
                    by_rules: by_rules.category.clone(),
                    rules_found: signals.category_found,
                    by_model: category.class,
                    confidence: category.confidence,
                });
            }
        }
    }
    let (intent, intent_accuracy) = best_trust(&intents);
    let (category, category_accuracy) = best_trust(&categories);
    CrossValidation {
        intent,
        intent_accuracy,
        rules_intent_accuracy: rules_accuracy(&intents),
        category,
        category_accuracy,
        rules_category_accuracy: rules_accuracy(&categories),
        examples: training.len(),
    }
}

/// Highest share of texts without risk that the rules and the risk model should flag
/// together, among ordinary contacts and among the texts written with the lists' words
/// alike: a false alarm sends an agent hurrying to a customer who was never going to the
/// press, and an alarm that rings often is ignored.
pub const RISK_FALSE_ALARMS: f64 = 0.05;

/// Share of risky texts the rules and the risk model should catch together.
pub const RISK_RECALL: f64 = 0.9;

/// Recall and false alarms of a risk detector over labelled texts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskFigures {
    pub recall: f64,
    pub false_alarms: f64,
}

/// Recall and false-alarm share of `(truly risky, flagged)` pairs.
pub fn risk_figures(pairs: impl IntoIterator<Item = (bool, bool)>) -> RiskFigures {
    let (mut risky, mut caught, mut calm, mut alarms) = (0, 0, 0, 0);
    for (truth, flagged) in pairs {
        if truth {
            risky += 1;
            caught += usize::from(flagged);
        } else {
            calm += 1;
            alarms += usize::from(flagged);
        }
    }
    RiskFigures {
        recall: caught as f64 / f64::from(risky.max(1)),
        false_alarms: alarms as f64 / f64::from(calm.max(1)),
    }
}

/// What a text of the risk corpus is, for its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RiskTruth {
    Risky,
    /// A contact of the labelled examples without risk.
    Ordinary,
    /// A text written for the risk corpus without risk: mostly innocent uses of the lists'
    /// words, the hardest to tell apart.
    Written,
}

impl RiskTruth {
    pub fn of(example: &Example) -> Self {
        if example.intent == "risk" {
            RiskTruth::Risky
        } else if example.category == ORDINARY_CONTACT {
            RiskTruth::Ordinary
        } else {
            RiskTruth::Written
        }
    }
}

/// How many texts of each truth there were, and how many of each were flagged: what a
/// [`RiskScore`] is made from, and what can be added up over parts of a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RiskTally {
    /// Texts and flagged texts, by [`RiskTruth`] (risky, ordinary, written).
    texts: [u32; 3],
    flagged: [u32; 3],
}

impl RiskTally {
    fn of(verdicts: impl IntoIterator<Item = (RiskTruth, bool)>) -> Self {
        let mut tally = Self::default();
        for (truth, flagged) in verdicts {
            let at = match truth {
                RiskTruth::Risky => 0,
                RiskTruth::Ordinary => 1,
                RiskTruth::Written => 2,
            };
            tally.texts[at] += 1;
            tally.flagged[at] += u32::from(flagged);
        }
        tally
    }

    fn plus(mut self, other: Self) -> Self {
        for at in 0..3 {
            self.texts[at] += other.texts[at];
            self.flagged[at] += other.flagged[at];
        }
        self
    }

    fn score(&self) -> RiskScore {
        let share = |at: usize| f64::from(self.flagged[at]) / f64::from(self.texts[at].max(1));
        RiskScore {
            recall: share(0),
            ordinary_false_alarms: share(1),
            written_false_alarms: share(2),
        }
    }
}

/// A risk detector's figures over the risk corpus: false alarms among ordinary contacts
/// and among written texts are kept apart, since a pooled share would be mostly the
/// ordinary contacts' and hide the written ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskScore {
    pub recall: f64,
    pub ordinary_false_alarms: f64,
    pub written_false_alarms: f64,
}

impl RiskScore {
    /// From `(truth, flagged)` pairs.
    pub fn of(verdicts: impl IntoIterator<Item = (RiskTruth, bool)>) -> Self {
        RiskTally::of(verdicts).score()
    }

    /// The worse of the two false-alarm shares.
    pub fn false_alarms(&self) -> f64 {
        self.ordinary_false_alarms.max(self.written_false_alarms)
    }
}

/// One text's verdicts for choosing the risk bars.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RiskVerdict {
    truth: RiskTruth,
    /// Whether the engine's intent (complaint or inquiry) lets it carry risk at all.
    possible: bool,
    /// Which of the rules' lists flag it.
    lists: RiskLists,
    /// The probability of risk from a model that never saw it.
    probability: f32,
}

/// The risk model's bars, chosen by cross-validation on the training part of `corpus`
/// (see [`crate::model::risk_corpus`]), and their cross-validated figures. Where the lists
/// found nothing the model flags a text at `flag` or above; where they found risk it
/// overrules each list below its veto; praise or noise it makes a complaint at
/// `over_intent`. The engine decides intent as it will with the shipped models
/// (`intent_trust`), from intent models that never saw the fold. The bars chosen have the
/// most recall among those within [`RISK_FALSE_ALARMS`] on both kinds of calm text; if
/// none are, the most recall net of the worse false alarms. Ties go to the more cautious.
///
/// The cross-validation is repeated [`RISK_REPEATS`] times with the texts dealt into
/// folds differently, and the bars are chosen over every repeat's verdicts. With one
/// dealing the bars (five of them, each at the edge of the aim) followed the dealing:
/// held-out recall was 0.85 to 0.92 over four dealings; over two sets of three, 0.89 and
/// 0.91.
pub fn risk_bars(
    corpus: &[Example],
    labelled: &[Example],
    rules: &Rules,
    learner: Learner,
    intent_trust: Trust,
) -> RiskBars {
    let training: Vec<&Example> = corpus.iter().filter(|e| !is_held_out(&e.text)).collect();
    let fold_verdicts = |repeat: u32, part: u64| {
        // The held-out split took hash % 5; each repeat deals by a further base-5 digit.
        let fold_of = |e: &Example| (stable_hash(&e.text) / 5 / FOLDS.pow(repeat)) % FOLDS;
        let train: Vec<(String, &str)> = training
            .iter()
            .filter(|e| fold_of(e) != part)
            .map(|e| (fold(&e.text), risk_label(e)))
            .collect();
        let model = crate::model::NgramModel::train(learner, train.iter().map(|(t, l)| (t.as_str(), *l)));
        // The ordinary contacts are labelled examples too: the same fold is kept from the
        // intent model.
        let others: Vec<Example> = labelled.iter().filter(|e| fold_of(e) != part).cloned().collect();
        let mut intents = TextModels::train(learner, &others);
        intents.intent_trust = intent_trust;
        let verdict = |example: &&Example| {
            let by_lists = engine::classify(
                rules,
                Some(&intents),
                &Contact {
                    text: &example.text,
                    channel: Channel::Wechat,
                    poster: None,
                    region_hint: "",
                },
            );
            RiskVerdict {
                truth: RiskTruth::of(example),
                possible: matches!(by_lists.intent(), Intent::Complaint | Intent::Inquiry),
                lists: engine::risk_lists(rules, &example.text, by_lists.intent()),
                probability: risk_probability(&model, &model.predict(&fold(&example.text))),
            }
        };
        training
            .iter()
            .filter(|e| fold_of(e) == part)
            .map(verdict)
            .collect::<Vec<_>>()
    };
    let folds: Vec<(u32, u64)> = (0..RISK_REPEATS)
        .flat_map(|r| (0..FOLDS).map(move |p| (r, p)))
        .collect();
    let verdicts: Vec<RiskVerdict> = side_by_side(&folds, |(repeat, part)| fold_verdicts(*repeat, *part))
        .into_iter()
        .flatten()
        .collect();
    choose_risk_bars(&verdicts)
}

/// How many times [`risk_bars`] repeats its cross-validation, dealing the folds anew.
pub const RISK_REPEATS: u32 = 3;

/// The bars for a risk model, and what they gave in cross-validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskBars {
    pub flag: f32,
    pub vetoes: RiskVetoes,
    /// How sure the model must be to make praise or noise a complaint with risk.
    pub over_intent: f32,
    pub score: RiskScore,
}

/// Flag bars tried: the corpus is mostly calm, so a text is risky well below even odds.
const RISK_FLAG_BARS: [f32; 13] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, NEVER,
];

/// Bars tried for making praise or noise a complaint: the model must be sure.
const OVER_INTENT_BARS: [f32; 6] = [0.5, 0.6, 0.7, 0.8, 0.9, NEVER];

/// Vetoes tried: 0 never overrules the lists.
const VETO_BARS: [f32; 12] = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];

/// [`risk_bars`]' choice over recorded verdicts.
fn choose_risk_bars(verdicts: &[RiskVerdict]) -> RiskBars {
    // Praise or noise carries risk only where the model makes it a complaint, so those
    // texts depend on that bar alone and the rest on the others: each part is tallied
    // apart, once per bar, and the tallies added.
    let (possible, chatter): (Vec<&RiskVerdict>, Vec<&RiskVerdict>) =
        verdicts.iter().partition(|v| v.possible);
    let chatter: Vec<(f32, RiskTally)> = OVER_INTENT_BARS
        .iter()
        .rev()
        .map(|over| {
            let tally = RiskTally::of(chatter.iter().map(|v| (v.truth, v.probability >= *over)));
            (*over, tally)
        })
        .collect();
    let complaints = |flag: f32, vetoes: RiskVetoes| {
        RiskTally::of(possible.iter().map(|v| {
            let bar = if v.lists.any() { vetoes.bar(v.lists) } else { flag };
            (v.truth, v.probability >= bar)
        }))
    };
    let vetoes = VETO_BARS.iter().flat_map(|threat| {
        VETO_BARS.iter().flat_map(move |repeat| {
            VETO_BARS.iter().map(move |vulnerable| RiskVetoes {
                threat: *threat,
                repeat: *repeat,
                vulnerable: *vulnerable,
            })
        })
    });
    // From the most cautious: the highest flag bar, then the lowest vetoes, then the highest
    // bar for making praise or noise a complaint.
    let candidates: Vec<RiskBars> = RISK_FLAG_BARS
        .iter()
        .rev()
        .flat_map(|flag| vetoes.clone().map(move |v| (*flag, v)))
        .flat_map(|(flag, vetoes)| {
            let base = complaints(flag, vetoes);
            chatter.iter().map(move |(over_intent, tally)| RiskBars {
                flag,
                vetoes,
                over_intent: *over_intent,
                score: base.plus(*tally).score(),
            })
        })
        .collect();
    let best_by = |value: &dyn Fn(&RiskScore) -> f64, limit: f64| {
        candidates
            .iter()
            .filter(|c| c.score.false_alarms() <= limit)
            .fold(None::<RiskBars>, |best, c| match best {
                Some(b) if value(&b.score) >= value(&c.score) => Some(b),
                _ => Some(*c),
            })
    };
    best_by(&|s| s.recall, RISK_FALSE_ALARMS)
        .or_else(|| best_by(&|s| s.recall - s.false_alarms(), 1.0))
        .unwrap_or(RiskBars {
            flag: NEVER,
            vetoes: RiskVetoes::all(0.0),
            over_intent: NEVER,
            score: RiskTally::of(verdicts.iter().map(|v| (v.truth, false))).score(),
        })
}

/// The engine's accuracy with `models` on the held-out part of `examples`: intent, and
/// category over the complaints and inquiries.
pub fn held_out_accuracy(examples: &[Example], rules: &Rules, models: &TextModels) -> (f64, f64) {
    let (mut intents, mut intents_right, mut categories, mut categories_right) = (0, 0, 0, 0);
    for example in examples.iter().filter(|e| is_held_out(&e.text)) {
        let verdict = engine::classify(
            rules,
            Some(models),
            &Contact {
                text: &example.text,
                channel: Channel::Wechat,
                poster: None,
                region_hint: "",
            },
        );
        intents += 1;
        intents_right += usize::from(verdict.intent().label() == example.intent);
        if example.intent == "complaint" || example.intent == "inquiry" {
            categories += 1;
            categories_right += usize::from(verdict.category == example.category);
        }
    }
    let share = |right: usize, all: usize| right as f64 / all.max(1) as f64;
    (share(intents_right, intents), share(categories_right, categories))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_figures_count_recall_over_the_risky_and_false_alarms_over_the_rest() {
        let figures = risk_figures([
            (true, true),
            (true, false),
            (false, false),
            (false, true),
            (false, false),
            (false, false),
        ]);
        assert_eq!(figures.recall, 0.5);
        assert_eq!(figures.false_alarms, 0.25);
        assert_eq!(
            risk_figures([]).recall,
            0.0,
            "nothing risky: nothing recalled, no division by zero"
        );
    }

    /// A verdict on a text the vulnerable-people list flags (`listed`) or no list does.
    fn risk(truth: RiskTruth, listed: bool, probability: f32) -> RiskVerdict {
        RiskVerdict {
            truth,
            possible: true,
            lists: RiskLists {
                vulnerable: listed,
                ..RiskLists::default()
            },
            probability,
        }
    }

    #[test]
    fn risk_scores_keep_ordinary_and_written_false_alarms_apart() {
        let score = RiskScore::of([
            (RiskTruth::Risky, true),
            (RiskTruth::Risky, false),
            (RiskTruth::Ordinary, false),
            (RiskTruth::Ordinary, false),
            (RiskTruth::Ordinary, false),
            (RiskTruth::Ordinary, true),
            (RiskTruth::Written, true),
            (RiskTruth::Written, false),
        ]);
        assert_eq!(score.recall, 0.5);
        assert_eq!(score.ordinary_false_alarms, 0.25);
        assert_eq!(score.written_false_alarms, 0.5);
        assert_eq!(score.false_alarms(), 0.5, "the worse of the two");
    }

    #[test]
    fn risk_bars_veto_the_lists_where_the_model_tells_their_false_alarms_apart() {
        let mut verdicts = vec![
            risk(RiskTruth::Risky, true, 0.9),
            risk(RiskTruth::Risky, false, 0.95),
            risk(RiskTruth::Written, false, 0.05),
            risk(RiskTruth::Written, true, 0.1),
            risk(RiskTruth::Written, true, 0.15),
        ];
        verdicts.extend(std::iter::repeat_n(risk(RiskTruth::Ordinary, false, 0.02), 20));
        let bars = choose_risk_bars(&verdicts);
        assert!(
            bars.vetoes.vulnerable > 0.15 && bars.vetoes.vulnerable <= 0.9,
            "{bars:?}"
        );
        assert!(bars.flag > 0.05 && bars.flag <= 0.95, "{bars:?}");
        assert_eq!(bars.score.recall, 1.0);
        assert_eq!(bars.score.false_alarms(), 0.0);
    }

    #[test]
    fn each_list_gets_its_own_veto() {
        // The model is as unsure of a real threat as of an innocent use of the vulnerable
        // list: one bar for both would silence the threat or keep the false alarm.
        let threat = RiskVerdict {
            lists: RiskLists {
                threat: true,
                ..RiskLists::default()
            },
            ..risk(RiskTruth::Risky, false, 0.05)
        };
        let mut verdicts = vec![threat, risk(RiskTruth::Written, true, 0.05)];
        verdicts.extend(std::iter::repeat_n(risk(RiskTruth::Ordinary, false, 0.01), 20));
        let bars = choose_risk_bars(&verdicts);
        assert!(
            bars.vetoes.threat <= 0.05 && bars.vetoes.vulnerable > 0.05,
            "{bars:?}"
        );
        assert_eq!(bars.score.recall, 1.0);
        assert_eq!(bars.score.false_alarms(), 0.0);
        let both = RiskLists {
            threat: true,
            vulnerable: true,
            ..RiskLists::default()
        };
        assert_eq!(
            bars.vetoes.bar(both),
            bars.vetoes.threat,
            "a text stands if either list's bar is met"
        );
    }

    #[test]
    fn a_sure_model_makes_praise_or_noise_a_complaint_with_risk() {
        // A threat the intent model took for noise, and praise the risk model half
        // suspects: only the sure one should become a complaint.
        let chatter = |truth, probability| RiskVerdict {
            possible: false,
            ..risk(truth, false, probability)
        };
        let mut verdicts = vec![chatter(RiskTruth::Risky, 0.95), chatter(RiskTruth::Written, 0.6)];
        verdicts.extend(std::iter::repeat_n(risk(RiskTruth::Ordinary, false, 0.01), 20));
        let bars = choose_risk_bars(&verdicts);
        assert!(bars.over_intent > 0.6 && bars.over_intent <= 0.95, "{bars:?}");
        assert_eq!(bars.score.recall, 1.0);
        assert_eq!(bars.score.false_alarms(), 0.0);
    }

    #[test]
    fn written_false_alarms_count_even_when_ordinary_contacts_outnumber_them() {
        // Flagging every listed text catches the risky one, but alarms on both written
        // texts; pooled with a hundred calm contacts that would look like 2%.
        let mut verdicts = vec![
            risk(RiskTruth::Risky, true, 0.3),
            risk(RiskTruth::Written, true, 0.3),
            risk(RiskTruth::Written, true, 0.3),
        ];
        verdicts.extend(std::iter::repeat_n(risk(RiskTruth::Ordinary, false, 0.01), 100));
        let bars = choose_risk_bars(&verdicts);
        assert!(bars.vetoes.vulnerable > 0.3, "the lists are overruled: {bars:?}");
        assert_eq!(bars.score.written_false_alarms, 0.0);
        assert_eq!(bars.score.recall, 0.0);
    }

    #[test]
    fn a_model_that_cannot_tell_risk_apart_silences_lists_that_ring_falsely() {
        // The lists flag a calm text for every risky one and the model is no help: within
        // the false-alarm aim, only vetoing them all is left.
        let verdicts = [
            risk(RiskTruth::Risky, true, 0.5),
            risk(RiskTruth::Written, true, 0.5),
            risk(RiskTruth::Risky, false, 0.5),
            risk(RiskTruth::Ordinary, false, 0.5),
        ];
        let bars = choose_risk_bars(&verdicts);
        assert!(bars.flag > 0.5 && bars.vetoes.vulnerable > 0.5, "{bars:?}");
        assert_eq!(bars.score.false_alarms(), 0.0);
    }

    #[test]
    fn without_a_pair_within_the_false_alarm_aim_the_bars_trade_recall_against_false_alarms() {
        // The model is sure of a calm listed text: no veto bar overrules it, so every pair
        // has false alarms, and catching the risky texts is what is left to gain.
        let verdicts = [
            risk(RiskTruth::Written, true, 0.95),
            risk(RiskTruth::Risky, true, 0.9),
            risk(RiskTruth::Risky, false, 0.6),
            risk(RiskTruth::Ordinary, false, 0.1),
        ];
        let bars = choose_risk_bars(&verdicts);
        assert_eq!(bars.score.recall, 1.0, "{bars:?}");
        assert_eq!(bars.score.ordinary_false_alarms, 0.0, "{bars:?}");
        assert!(bars.flag > 0.1 && bars.flag <= 0.6, "{bars:?}");
    }

    fn verdict(truth: &str, by_rules: &str, rules_found: bool, by_model: &str, confidence: f32) -> Verdicts {
        Verdicts {
            truth: truth.into(),
            by_rules: by_rules.into(),
            rules_found,
            by_model: by_model.into(),
            confidence,
        }
    }

    #[test]
    fn a_model_that_is_right_when_sure_gets_to_overrule() {
        let verdicts = [
            // Sure and right against the rules.
            verdict("outage", "billing", true, "outage", 0.97),
            verdict("refund", "payment", true, "refund", 0.96),
            // Unsure and wrong: the rules should keep these.
            verdict("billing", "billing", true, "payment", 0.6),
            verdict("fraud", "fraud", true, "other", 0.7),
        ];
        let (trust, accuracy) = best_trust(&verdicts);
        assert!(trust.model_decides(true, 0.96), "{trust:?}");
        assert!(!trust.model_decides(true, 0.7), "{trust:?}");
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn a_useless_model_never_decides() {
        let verdicts = [
            verdict("outage", "outage", true, "billing", 0.99),
            verdict("other", "other", false, "billing", 0.99),
        ];
        let (trust, accuracy) = best_trust(&verdicts);
        assert!(
            !trust.could_decide(true) && !trust.could_decide(false),
            "{trust:?}"
        );
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn where_the_rules_found_nothing_the_model_fills_in() {
        let verdicts = [
            verdict("delivery", "other", false, "delivery", 0.55),
            verdict("billing", "billing", true, "payment", 0.99),
        ];
        let (trust, _) = best_trust(&verdicts);
        assert!(trust.model_decides(false, 0.55), "{trust:?}");
        assert!(!trust.model_decides(true, 0.99), "{trust:?}");
    }

    #[test]
    fn intent_labels_match_the_examples() {
        assert_eq!(Intent::Complaint.label(), "complaint");
        assert_eq!(Intent::Noise.label(), "noise");
    }
}
