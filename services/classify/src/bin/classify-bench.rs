//! `classify-bench`: classifications per second on one core, for realistic texts of 20 to
//! 500 characters built from the labelled examples, beside the cost of folding the same
//! texts alone (the least any classification must do) measured in the same run.
//!
//! `cargo run --release -p closedloop-classify --bin classify-bench`

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use closedloop_classify::engine::{self, Contact};
use closedloop_classify::model::{TextModels, parse_examples};
use closedloop_classify::rules::{Rules, fold};
use closedloop_proto::v1::{Channel, Poster};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Texts from 20 to 500 characters: examples joined until each reaches its length.
fn texts() -> anyhow::Result<Vec<String>> {
    let examples = parse_examples(include_str!("../../data/labelled.tsv"))?;
    let mut texts = Vec::new();
    for (i, target) in (20..=500).step_by(16).enumerate() {
        let mut text = String::new();
        let mut j = i;
        while text.chars().count() < target {
            text.push_str(&examples[j % examples.len()].text);
            text.push('，');
            j += 7;
        }
        // As classify receives it: normalised by ingest, or by the Classify RPC.
        let text: String = text.chars().take(target).collect();
        texts.push(closedloop_runtime::text::normalise(&text));
    }
    Ok(texts)
}

/// Runs `work` over `texts` round-robin for about `seconds`; returns texts per second.
fn measure(texts: &[String], seconds: f64, mut work: impl FnMut(&str)) -> f64 {
    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < budget {
        for text in texts {
            work(text);
        }
        done += texts.len() as u64;
    }
    done as f64 / started.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rules = Rules::builtin()?;
    let models = TextModels::builtin()?;
    let texts = texts()?;
    let average = texts.iter().map(|t| t.chars().count()).sum::<usize>() / texts.len();
    let poster = Poster {
        followers: 1200,
        ..Default::default()
    };
    let contact = |text: &str| -> closedloop_proto::v1::Classification {
        let contact = Contact {
            text,
            channel: Channel::WeiboPost,
            poster: Some(&poster),
            region_hint: "",
        };
        engine::classify(&rules, None, &contact)
    };
    let contact_with_model = |text: &str| {
        let contact = Contact {
            text,
            channel: Channel::WeiboPost,
            poster: Some(&poster),
            region_hint: "",
        };
        engine::classify(&rules, Some(&models), &contact)
    };

    let folding = measure(&texts, args.seconds, |t| {
        black_box(fold(black_box(t)));
    });
    let rules_only = measure(&texts, args.seconds, |t| {
        black_box(contact(black_box(t)));
    });
    let with_model = measure(&texts, args.seconds, |t| {
        black_box(contact_with_model(black_box(t)));
    });
    // The models' share: both predictions on already folded text, and the explanation.
    let folded: Vec<String> = texts.iter().map(|t| fold(t)).collect();
    let predictions = measure(&folded, args.seconds, |t| {
        black_box(models.predict(black_box(t), true, true));
    });
    let explanations = measure(&folded, args.seconds, |t| {
        let scan = models.scan(black_box(t), true, false, false);
        if let Some(intent) = &scan.intent {
            black_box(models.intent_evidence(&scan, intent));
        }
    });
    println!(
        "{} texts of 20-500 characters (average {average}), one thread",
        texts.len()
    );
    println!("{:<40} {:>12} {:>8}", "work per text", "texts/s", "vs fold");
    println!(
        "{:<40} {:>12.0} {:>8}",
        "fold to Simplified, lower case (raw)", folding, "1.00"
    );
    println!(
        "{:<40} {:>12.0} {:>8.2}",
        "classify, rules only",
        rules_only,
        rules_only / folding
    );
    println!(
        "{:<40} {:>12.0} {:>8.2}",
        "classify, rules and model",
        with_model,
        with_model / folding
    );
    println!(
        "{:<40} {:>12.0} {:>8.2}",
        "  of which: both models' predictions",
        predictions,
        predictions / folding
    );
    println!(
        "{:<40} {:>12.0} {:>8.2}",
        "  of which: intent prediction + evidence",
        explanations,
        explanations / folding
    );
    Ok(())
}
