//! Zero-shot scoring of the real SmolLM2-135M-Instruct (fetched on first use): per-choice
//! log-likelihoods against an independent float64 implementation
//! (tools/fixtures/zeroshot_loglik.py), batching that changes nothing, and a hand-built task
//! whose answers are not in doubt.

use recoup_eval::zeroshot::{Choice, Instance, Loglik, Scorer, read_instances, task, task_metrics};
use recoup_model::{Loaded, load};
use std::io::Write;
use std::sync::OnceLock;

fn smollm2() -> &'static Loaded {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = recoup_assets::resolve("smollm2-135m", recoup_assets::AssetKind::Model)
            .expect("SmolLM2 fetches");
        load(&path).expect("SmolLM2 loads")
    })
}

#[derive(serde::Deserialize)]
struct Golden {
    task: String,
    doc_id: i64,
    idx: usize,
    context: String,
    continuation: String,
    continuation_tokens: Vec<u32>,
    logprob: f64,
    greedy: bool,
}

fn golden() -> Vec<Golden> {
    serde_json::from_str(include_str!("fixtures/zeroshot_golden.json")).unwrap()
}

/// The fixture's choices regrouped into instances, in fixture order.
fn golden_instances(golden: &[Golden]) -> Vec<Instance> {
    let mut out: Vec<(String, Instance)> = Vec::new();
    for g in golden {
        let choice = Choice {
            context: g.context.clone(),
            continuation: g.continuation.clone(),
        };
        match out.last_mut() {
            Some((task, inst)) if *task == g.task && inst.doc_id == g.doc_id => {
                assert_eq!(inst.choices.len(), g.idx, "fixture choices in order");
                inst.choices.push(choice);
            }
            _ => out.push((
                g.task.clone(),
                Instance {
                    doc_id: g.doc_id,
                    choices: vec![choice],
                    gold: 0,
                },
            )),
        }
    }
    out.into_iter().map(|(_, inst)| inst).collect()
}

#[test]
fn loglikelihoods_match_independent_implementation() {
    let golden = golden();
    let loaded = smollm2();
    let instances = golden_instances(&golden);
    // All of them in one packed pass: contexts of four tasks, WinoGrande's per-choice ones.
    let scores = Scorer::new(&loaded.model, &loaded.tokenizer)
        .score_all(&instances, |_| {})
        .unwrap();
    let flat: Vec<&Loglik> = scores.iter().flatten().collect();
    assert_eq!(flat.len(), golden.len());
    for (got, want) in flat.iter().zip(&golden) {
        let what = format!("{} doc {} choice {}", want.task, want.doc_id, want.idx);
        assert_eq!(got.tokens, want.continuation_tokens.len(), "{what}: tokens");
        assert!(
            (got.logprob - want.logprob).abs() <= 1e-3 + 1e-4 * want.logprob.abs(),
            "{what}: logprob {} vs {}",
            got.logprob,
            want.logprob
        );
        assert_eq!(got.greedy, want.greedy, "{what}: greedy");
    }
}

#[test]
fn packing_instances_together_changes_no_score() {
    let golden = golden();
    let loaded = smollm2();
    let instances = golden_instances(&golden);
    let mut scorer = Scorer::new(&loaded.model, &loaded.tokenizer);
    let packed = scorer.score_all(&instances, |_| {}).unwrap();
    for (inst, want) in instances.iter().zip(&packed) {
        let alone = scorer
            .score_all(std::slice::from_ref(inst), |_| {})
            .unwrap();
        for (a, b) in alone[0].iter().zip(want) {
            assert!(
                (a.logprob - b.logprob).abs() < 1e-3,
                "doc {}: alone {} vs packed {}",
                inst.doc_id,
                a.logprob,
                b.logprob
            );
            assert_eq!(a.greedy, b.greedy);
        }
    }
}

fn request(doc_id: usize, idx: usize, context: &str, cont: &str, label: usize) -> String {
    serde_json::json!({
        "request_type": "loglikelihood",
        "doc": {"query": context},
        "request": {"context": context, "continuation": cont},
        "idx": idx, "doc_id": doc_id, "label": label,
    })
    .to_string()
}

#[test]
fn a_hand_built_task_with_obvious_answers_scores_every_instance_right() {
    // (context, choices, gold): the gold answers are the only sensible continuations.
    let items: [(&str, [&str; 3], usize); 4] = [
        (
            "One, two, three, four,",
            [" purple", " five", " yesterday"],
            1,
        ),
        (
            "Monday, Tuesday, Wednesday,",
            [" Thursday", " banana", " seven"],
            0,
        ),
        (
            "The capital of France is",
            [" a spoon", " seventeen", " Paris"],
            2,
        ),
        ("A, B, C, D, E, F,", [" dog", " G", " Tuesday"], 1),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("obvious.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    for (doc, (context, choices, gold)) in items.iter().enumerate() {
        for (idx, c) in choices.iter().enumerate() {
            writeln!(gz, "{}", request(doc, idx, context, c, *gold)).unwrap();
        }
    }
    gz.finish().unwrap();
    let spec = task("arc_easy").unwrap();
    let instances = read_instances(&path, spec, None).unwrap();
    assert_eq!(instances.len(), 4);
    let loaded = smollm2();
    let scores = Scorer::new(&loaded.model, &loaded.tokenizer)
        .score_all(&instances, |_| {})
        .unwrap();
    let r = task_metrics(spec, &instances, &scores);
    assert_eq!((r.n, r.acc, r.acc_norm), (4, 1.0, Some(1.0)), "{scores:?}");
}
