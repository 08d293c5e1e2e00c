//! Chooses how far the engine trusts each model over the keyword rules (`Trust`) by k-fold
//! cross-validation on the training examples alone, so the held-out part stays unseen
//! until `classify-eval`. The search itself is a plain function over recorded verdicts.

use closedloop_proto::v1::Channel;

use crate::engine::{self, Contact, rule_signals};
use crate::model::{Example, Learner, NEVER, TextModels, Trust, is_held_out, risk_probability, stable_hash};
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

/// Cross-validates on the training part of `examples` (the held-out part is skipped).
pub fn cross_validate(examples: &[Example], rules: &Rules, learner: Learner) -> CrossValidation {
    let training: Vec<&Example> = examples.iter().filter(|e| !is_held_out(&e.text)).collect();
    // The held-out split took hash % 5 == 0; the folds use the next digit of the hash.
    let fold_of = |e: &Example| (stable_hash(&e.text) / 5) % FOLDS;
    let mut intents = Vec::new();
    let mut categories = Vec::new();
    for part in 0..FOLDS {
        let train: Vec<Example> = training
            .iter()
            .filter(|e| fold_of(e) != part)
            .map(|e| (*e).clone())
            .collect();
        let models = TextModels::train(learner, &train);
        for example in training.iter().filter(|e| fold_of(e) == part) {
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
/// together: a false alarm sends an agent hurrying to a customer who was never going to
/// the press.
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

/// Whether the rules' word lists find escalation risk in `text`.
pub fn rules_flag_risk(rules: &Rules, text: &str) -> bool {
    engine::classify(
        rules,
        None,
        &Contact {
            text,
            channel: Channel::Wechat,
            poster: None,
            region_hint: "",
        },
    )
    .escalation_risk
}

/// The risk model's bars, chosen by cross-validation on the training part of `examples`
/// (labels "risk" and "none"), and their cross-validated figures. Where the lists found
/// nothing the model flags a text at `flag` or above; where they found risk it overrules
/// them below `veto`. The pair chosen has the highest recall among those with at least
/// [`RISK_RECALL`] and at most [`RISK_FALSE_ALARMS`] false alarms; if none gets there, the
/// most recall net of false alarms. Ties go to the more cautious pair.
pub fn risk_bars(examples: &[Example], rules: &Rules, learner: Learner) -> RiskBars {
    let training: Vec<&Example> = examples.iter().filter(|e| !is_held_out(&e.text)).collect();
    let fold_of = |e: &Example| (stable_hash(&e.text) / 5) % FOLDS;
    // (truly risky, rules flag, model's probability of risk)
    let mut verdicts: Vec<(bool, bool, f32)> = Vec::new();
    for part in 0..FOLDS {
        let train: Vec<(String, &str)> = training
            .iter()
            .filter(|e| fold_of(e) != part)
            .map(|e| (fold(&e.text), e.intent.as_str()))
            .collect();
        let model = crate::model::NgramModel::train(learner, train.iter().map(|(t, l)| (t.as_str(), *l)));
        for example in training.iter().filter(|e| fold_of(e) == part) {
            verdicts.push((
                example.intent == "risk",
                rules_flag_risk(rules, &example.text),
                risk_probability(&model.predict(&fold(&example.text))),
            ));
        }
    }
    choose_risk_bars(&verdicts)
}

/// The bars for a risk model, and what they gave in cross-validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RiskBars {
    pub flag: f32,
    pub veto: f32,
    pub figures: RiskFigures,
}

/// Vetoes tried: 0 never overrules the lists.
const VETO_BARS: [f32; 11] = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];

/// [`risk_bars`]' choice over `(truly risky, rules flag, model's probability of risk)`.
fn choose_risk_bars(verdicts: &[(bool, bool, f32)]) -> RiskBars {
    let figures = |flag: f32, veto: f32| {
        risk_figures(
            verdicts
                .iter()
                .map(|(t, r, p)| (*t, if *r { *p >= veto } else { *p >= flag })),
        )
    };
    let lists_alone = RiskBars {
        flag: NEVER,
        veto: 0.0,
        figures: figures(NEVER, 0.0),
    };
    let candidates: Vec<RiskBars> = BARS
        .iter()
        .rev()
        .flat_map(|flag| VETO_BARS.iter().map(move |veto| (*flag, *veto)))
        .map(|(flag, veto)| RiskBars {
            flag,
            veto,
            figures: figures(flag, veto),
        })
        .collect();
    let best_by = |score: &dyn Fn(&RiskFigures) -> f64, limit: f64| {
        candidates
            .iter()
            .filter(|c| c.figures.false_alarms <= limit)
            .fold(None::<RiskBars>, |best, c| match best {
                Some(b) if score(&b.figures) >= score(&c.figures) => Some(b),
                _ => Some(*c),
            })
    };
    best_by(&|f| f.recall, RISK_FALSE_ALARMS)
        .filter(|b| b.figures.recall >= RISK_RECALL)
        .or_else(|| best_by(&|f| f.recall - f.false_alarms, 1.0))
        .unwrap_or(lists_alone)
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
    use closedloop_proto::v1::Intent;

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

    #[test]
    fn risk_bars_veto_the_lists_where_the_model_tells_their_false_alarms_apart() {
        // (truly risky, lists flag, model's probability of risk)
        let mut verdicts = vec![(true, true, 0.9), (true, false, 0.95), (false, false, 0.05)];
        verdicts.extend([(false, true, 0.1), (false, true, 0.15)]);
        verdicts.extend(std::iter::repeat_n((false, false, 0.02), 20));
        let bars = choose_risk_bars(&verdicts);
        assert!(bars.veto > 0.15 && bars.veto <= 0.9, "{bars:?}");
        assert!(bars.flag > 0.05 && bars.flag <= 0.95, "{bars:?}");
        assert_eq!(bars.figures.recall, 1.0);
        assert_eq!(bars.figures.false_alarms, 0.0);
    }

    #[test]
    fn without_a_pair_that_meets_both_aims_the_bars_trade_recall_against_false_alarms() {
        // The model cannot tell the risky from the calm: vetoing or flagging only costs.
        let verdicts = [
            (true, true, 0.5),
            (false, true, 0.5),
            (true, false, 0.5),
            (false, false, 0.5),
        ];
        let bars = choose_risk_bars(&verdicts);
        assert_eq!((bars.flag, bars.veto), (NEVER, 0.0), "{bars:?}");
        assert_eq!(bars.figures.recall, 0.5);
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
