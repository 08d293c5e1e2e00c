use super::*;

#[test]
fn ngrams_cover_one_and_two_characters() {
    let mut grams = Vec::new();
    for_each_ngram("断网了", |g, hash| {
        assert_eq!(hash, stable_hash(g));
        grams.push(g.to_owned());
    });
    assert_eq!(grams, vec!["断", "断网", "网", "网了", "了"]);
    let mut none = Vec::new();
    for_each_ngram("，！", |g, _| none.push(g.to_owned()));
    assert!(none.is_empty());
}

#[test]
fn a_walk_skips_the_longer_ngrams_of_an_unknown_one_but_counts_them() {
    let mut visited = Vec::new();
    let grams = walk_ngrams("断网了", |g, _| {
        visited.push(g.to_owned());
        g != "断"
    });
    assert_eq!(visited, vec!["断", "网", "网了", "了"]);
    assert_eq!(grams, 5);
}

/// Scoring stops at the first unknown n-gram of each start, which is sound only if every
/// vocabulary holds the prefixes of its n-grams (those a walk visits).
#[test]
fn the_shipped_vocabularies_hold_every_prefix_of_their_ngrams() {
    let models = TextModels::builtin().expect("shipped model");
    let risk = models.risk.as_ref().expect("a risk model");
    for model in [&models.intent, &models.category, risk] {
        for gram in model.grams() {
            let mut prefixes = Vec::new();
            walk_ngrams(gram, |prefix, _| {
                if prefix.len() < gram.len() && gram.starts_with(prefix) {
                    prefixes.push(prefix);
                }
                true
            });
            for prefix in prefixes {
                assert!(model.row(stable_hash(prefix)).is_some(), "{prefix:?} of {gram:?}");
            }
        }
    }
}

#[test]
fn evidence_from_one_scan_is_each_models_own() {
    let models = TextModels::builtin().expect("shipped model");
    for text in [
        "快递显示已签收，但我根本没收到货",
        "宽带断网三天了,打了五次电话没人管,再不修我就投诉到工信部",
        "请问怎么查话费",
    ] {
        let scan = models.scan(text, true, true, false);
        let (intent, category) = (
            scan.intent.as_ref().expect("asked for"),
            scan.category.as_ref().expect("asked for"),
        );
        assert_eq!(
            models.intent_evidence(&scan, intent),
            models.intent.evidence(text, intent),
            "{text}"
        );
        assert_eq!(
            models.category_evidence(&scan, category),
            models.category.evidence(text, category),
            "{text}"
        );
    }
    let text = "快递显示已签收，但我根本没收到货";
    let scan = models.scan(text, false, true, false);
    let category = scan.category.as_ref().expect("asked for");
    assert!(!models.category_evidence(&scan, category).is_empty());
}

#[test]
fn both_learners_learn_from_examples_and_explain() {
    for learner in [Learner::Bayes, Learner::Logistic] {
        let model = NgramModel::train(
            learner,
            [
                ("宽带断网了", "outage"),
                ("又停电了", "outage"),
                ("断网一整天", "outage"),
                ("话费多扣了", "billing"),
                ("账单不对多扣钱", "billing"),
            ],
        );
        let outage = model.predict("家里断网了");
        assert_eq!(outage.class, "outage", "{learner:?}");
        assert!(outage.confidence > 0.5 && outage.confidence <= 1.0, "{learner:?}");
        let evidence = model.evidence("家里断网了", &outage);
        assert!(
            evidence.iter().any(|g| g.contains("断网")),
            "{learner:?}: {evidence:?}"
        );
        assert!(evidence.len() <= 3);
        assert_eq!(model.predict("又多扣了话费").class, "billing", "{learner:?}");
    }
}

#[test]
fn logistic_confidence_does_not_grow_with_length_alone() {
    let model = NgramModel::train(
        Learner::Logistic,
        [("宽带断网了", "outage"), ("话费多扣了", "billing")],
    );
    let short = model.predict("断网了").confidence;
    let long = model.predict(&"断网了".repeat(20)).confidence;
    assert!((short - long).abs() < 0.05, "{short} vs {long}");
}

#[test]
fn one_pass_for_both_models_agrees_with_each_model_alone() {
    let models = TextModels::builtin().expect("shipped model");
    for text in [
        "快递显示已签收，但我根本没收到货",
        "请问怎么查话费",
        "谢谢师傅",
        "lol",
    ] {
        let (intent, category) = models.predict(text, true, true);
        assert_eq!(intent, Some(models.intent.predict(text)), "{text}");
        assert_eq!(category, Some(models.category.predict(text)), "{text}");
        let (no_intent, only_category) = models.predict(text, false, true);
        assert_eq!(no_intent, None);
        assert_eq!(only_category, category);
    }
    assert_eq!(models.predict("断网了", false, false), (None, None));
}

#[test]
fn a_model_survives_its_file_and_old_files_get_cautious_trust() {
    let mut models = TextModels::train(Learner::Logistic, &parse_examples(
        "complaint\toutage\t宽带断网了\ncomplaint\tbilling\t话费多扣了\ninquiry\tbilling\t请问怎么查账单\n",
    )
    .expect("examples"));
    models.category_trust = Trust {
        over_rules: 0.9,
        without_rules: 0.5,
    };
    let json = serde_json::to_string(&models).expect("serialise");
    let back: TextModels = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back.category_trust, models.category_trust);
    for text in ["断网", "多扣话费", "怎么查"] {
        assert_eq!(
            back.predict(text, true, true),
            models.predict(text, true, true),
            "{text}"
        );
    }
    assert_eq!(back.category.vocabulary(), models.category.vocabulary());

    let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
    let fields = old.as_object_mut().expect("object");
    fields.remove("intent_trust");
    fields.remove("category_trust");
    let old: TextModels = serde_json::from_value(old).expect("old file");
    assert_eq!(old.intent_trust, Trust::CAUTIOUS);
    assert!(!old.category_trust.could_decide(true));
    assert!(old.category_trust.model_decides(false, 0.995));
}

#[test]
fn risk_vetoes_survive_the_file_and_an_old_single_bar_covers_every_list() {
    let contacts = parse_examples("complaint\toutage\t宽带断网了\n").expect("examples");
    let risk =
        parse_examples("risk\trepeat\t打了五次电话\nrisk\tmedia\t找记者曝光\nnone\t-\t老人机怎么设置\n")
            .expect("risk texts");
    let vetoes = RiskVetoes {
        threat: 0.1,
        repeat: 0.2,
        vulnerable: 0.3,
    };
    let models =
        TextModels::train(Learner::Logistic, &contacts).with_risk(Learner::Logistic, &risk, 0.5, vetoes, 0.9);
    let json = serde_json::to_string(&models).expect("serialise");
    let back: TextModels = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back.risk_vetoes, vetoes);
    assert_eq!(back.risk_over_intent, 0.9);

    // A file from before the vetoes were per list, with a binary risk model.
    let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
    let fields = old.as_object_mut().expect("object");
    fields.remove("risk_vetoes");
    fields.remove("risk_over_intent");
    fields.insert("risk_veto_bar".into(), 0.25.into());
    fields.insert(
        "risk".into(),
        serde_json::json!({"classes": ["risk", "none"], "bias": [0.0, 0.0], "weights": {"记": [0.0, 0.0], "记者": [2.0, 0.0]}}),
    );
    let old: TextModels = serde_json::from_value(old).expect("old file");
    assert_eq!(old.risk_vetoes, RiskVetoes::all(0.25));
    let scan = old.scan("记者", false, false, true);
    let verdict = scan.risk.as_ref().expect("a risk verdict");
    assert!(
        (old.risk_of(verdict) - verdict.probability(0)).abs() < 1e-6,
        "risk is P(risk)"
    );
    assert!(old.risk_of(verdict) > 0.5);
    assert!(
        !old.overrules_intent(verdict),
        "old files never make praise or noise a complaint"
    );
}

#[test]
fn a_reload_replaces_the_models_and_a_bad_file_keeps_them() {
    let dir = tempfile::tempdir().expect("scratch");
    let path = dir.path().join("model.json");
    let train = |text: &str| {
        let tsv = format!("complaint\toutage\t{text}\ninquiry\tbilling\t请问怎么查账单\n");
        TextModels::train(Learner::Logistic, &parse_examples(&tsv).expect("examples"))
    };
    std::fs::write(&path, serde_json::to_string(&train("宽带断网了")).expect("json")).expect("write");
    let shared = SharedModels::load(Some(path.display().to_string())).expect("load");
    let first = shared.current();
    std::fs::write(&path, serde_json::to_string(&train("又停电了")).expect("json")).expect("write");
    shared.reload().expect("reload");
    assert_ne!(shared.current().intent.vocabulary(), first.intent.vocabulary());
    let second = shared.current();
    std::fs::write(&path, "not json").expect("write");
    assert!(shared.reload().is_err());
    assert_eq!(shared.current().intent.vocabulary(), second.intent.vocabulary());
}

#[test]
fn the_split_is_stable_and_about_a_fifth() {
    assert_eq!(is_held_out("宽带断网了"), is_held_out("宽带断网了"));
    let held = (0..1000).filter(|i| is_held_out(&format!("example {i}"))).count();
    assert!((150..250).contains(&held), "{held}");
}

#[test]
fn examples_parse_and_reject_malformed_lines() {
    let examples = parse_examples("# comment\ncomplaint\toutage\t断网了？ \n\n").expect("valid");
    assert_eq!(examples.len(), 1);
    assert_eq!(examples[0].text, "断网了?", "normalised as ingest normalises");
    assert!(matches!(
        parse_examples("complaint\toutage"),
        Err(ModelError::Malformed { line: 1 })
    ));
}

#[test]
fn the_risk_corpus_adds_the_contacts_it_does_not_list_as_ordinary() {
    let written =
        parse_examples("risk\trepeat\t打了五次电话\nnone\t-\t老人机怎么设置\n").expect("risk texts");
    let contacts =
        parse_examples("complaint\tbilling\t打了五次电话\ncomplaint\toutage\t停电了\npraise\tother\t谢谢\n")
            .expect("contacts");
    let corpus = risk_corpus(written, &contacts);
    let labels: Vec<(&str, &str, &str)> = corpus
        .iter()
        .map(|e| (e.intent.as_str(), e.category.as_str(), e.text.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("risk", "repeat", "打了五次电话"),
            ("none", "-", "老人机怎么设置"),
            ("none", ORDINARY_CONTACT, "停电了"),
            ("none", ORDINARY_CONTACT, "谢谢"),
        ],
        "a listed contact keeps its risk label and is not added twice"
    );
}
