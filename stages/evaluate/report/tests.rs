use super::*;

fn seed(seed: u64, auc: f64, low: f64, high: f64) -> SeedMetrics {
    SeedMetrics {
        seed,
        auc,
        auc_ci: Interval { low, high },
        average_precision: auc - 0.2,
        sensitivity_at_90_specificity: auc - 0.4,
        n_test: 600,
        n_test_malignant: 117,
        best_epoch: 10 + seed as usize,
        val_auc: auc + 0.01,
    }
}

fn arms() -> Vec<ArmSummary> {
    vec![
        ArmSummary {
            arm: "classical".into(),
            description: "Flips, rotations and colour jitter".into(),
            seeds: vec![seed(1, 0.8123, 0.7412, 0.8744)],
        },
        ArmSummary {
            arm: "cyclegan".into(),
            description: "Adds CycleGAN-synthesised malignant images".into(),
            seeds: vec![
                seed(1, 0.80, 0.7, 0.9),
                seed(2, 0.82, 0.7, 0.9),
                seed(3, 0.84, 0.7, 0.9),
            ],
        },
    ]
}

const PAPER: &[(&str, &str)] = &[("Classical augmentation", "0.81"), ("CycleGAN", "0.83")];

fn comparisons() -> Vec<Comparison> {
    use super::super::compare::{BootstrapRecord, DeLongRecord, SeedComparison};
    vec![Comparison {
        arm_a: "classical".into(),
        arm_b: "cyclegan".into(),
        seeds_a: 1,
        seeds_b: 3,
        auc_a: 0.8123,
        auc_b: 0.8301,
        difference: 0.8123 - 0.8301,
        delong: DeLongRecord {
            se: 0.012,
            z: Some(-1.48),
            p: 0.0004,
            p_holm: 0.0012,
            ci: Interval {
                low: -0.0413,
                high: 0.00002,
            },
        },
        bootstrap: BootstrapRecord {
            ci: Interval {
                low: -0.039,
                high: 0.0031,
            },
            p: 0.0567,
            resamples: 2000,
        },
        n_pos: 117,
        n_neg: 483,
        per_seed: vec![SeedComparison {
            seed: 1,
            auc_a: 0.8123,
            auc_b: 0.80,
            difference: 0.0123,
            p: 0.5,
        }],
    }]
}

fn provenance() -> Provenance {
    Provenance {
        stage: "evaluate".into(),
        fingerprint: "ab12".repeat(16),
        melanoflow: "0.1.0".into(),
    }
}

/// Runs `check` on a report over `arms()` and `comparisons()`.
fn with_report<T>(title: &str, check: impl FnOnce(&Report) -> T) -> T {
    let (arms, comparisons, provenance) = (arms(), comparisons(), provenance());
    let notes = vec!["Test split is patient-disjoint.".to_string()];
    check(&Report {
        title,
        arms: &arms,
        comparisons: &comparisons,
        paper: PAPER,
        paper_citation: "*The paper* (Someone 2020)",
        notes: &notes,
        provenance: &provenance,
    })
}

#[test]
fn tables_print_three_decimals_and_count_seeds() {
    let md = markdown_table(&summary_table(&arms()));
    assert!(
        md.contains("| classical | 0.812 [0.741, 0.874] | 0.612 | 0.412 | 600 (117) | 1 | 11 |"),
        "{md}"
    );
    // mean 0.82, sample std 0.02 over the 3 seeds.
    assert!(
        md.contains(
            "| cyclegan | 0.820 ± 0.020 | 0.620 ± 0.020 | 0.420 ± 0.020 | 600 (117) | 3 | 11, 12, 13 |"
        ),
        "{md}"
    );
    let paper = markdown_table(&paper_table(PAPER));
    assert!(
        paper.contains("| Classical augmentation | 0.81 |"),
        "{paper}"
    );
    assert!(paper.contains("| --- | ---: |"));
    let terminal = table_terminal(&arms());
    assert!(
        terminal.contains("0.812 [0.741, 0.874]") && terminal.contains("0.820 ± 0.020"),
        "{terminal}"
    );
    // Right-aligned numeric columns line up: every "ROC-AUC" cell ends at the same column.
    let lines: Vec<&str> = terminal.lines().collect();
    assert_eq!(lines.len(), 4);
    let end = |line: &str, needle: &str| {
        line.find(needle)
            .map(|i| line[..i + needle.len()].chars().count())
    };
    assert_eq!(end(lines[2], "0.874]"), end(lines[3], "0.020"));
}

#[test]
fn comparison_table_signs_differences_and_floors_p() {
    let md = markdown_table(&comparison_table(&comparisons()));
    // 0.8123 - 0.8301 = -0.0178; the CI's upper end rounds to zero;
    // p 0.0004 < 0.001; Holm 0.0012.
    assert!(
        md.contains(
            "| classical vs cyclegan | 0.812 / 0.830 | -0.018 [-0.041, 0.000] | < 0.001 | 0.001 | [-0.039, +0.003] | 0.057 |"
        ),
        "{md}"
    );
    let per_seed = markdown_table(&per_seed_comparison_table(&comparisons()));
    assert!(
        per_seed.contains("| classical vs cyclegan | 1 | 0.812 / 0.800 | +0.012 | 0.500 |"),
        "{per_seed}"
    );
    let terminal = comparisons_terminal(&comparisons());
    for part in [
        "classical vs cyclegan",
        "-0.018 [-0.041, 0.000]",
        "on the same 600 test images (117 malignant)",
        "seed-ensemble",
        "2000 times",
        "not corrected for multiple comparisons",
        "Holm's method over the 1 comparison(s)",
        "p < 0.05 means",
    ] {
        assert!(terminal.contains(part), "missing {part:?} in\n{terminal}");
    }
    assert_eq!(comparisons_terminal(&[]), "");
}

#[test]
fn seedless_arm_and_pipes() {
    let arm = ArmSummary {
        arm: "a|b".into(),
        description: String::new(),
        seeds: vec![],
    };
    let md = markdown_table(&summary_table(&[arm]));
    assert!(md.contains("| a\\|b | n/a | n/a | n/a |  | 0 |  |"), "{md}");
}

#[test]
fn reports_have_every_part() {
    let md = with_report("Melanoma", |r| {
        report_markdown(r, &[("ROC curves", "roc.png")])
    });
    let fingerprint = "ab12".repeat(16);
    for part in [
        "# Melanoma",
        "Reported in *The paper* (Someone 2020):",
        "![ROC curves](roc.png)",
        "- **cyclegan**: Adds",
        "| cyclegan | 3 | 0.840 [0.700, 0.900] |",
        "## Paired comparisons",
        "| classical vs cyclegan | 0.812 / 0.830 |",
        "### Per-seed comparisons",
        "- Test split",
        "## Reproducing this report",
        &format!("stage `evaluate` with fingerprint `{fingerprint}` (melanoflow 0.1.0)"),
        "`melanoflow verify --rerun evaluate`",
    ] {
        assert!(md.contains(part), "missing {part:?} in\n{md}");
    }
    let png: &[u8] = b"\x89PNG";
    let html = with_report("Melanoma", |r| report_html(r, &[("ROC curves", png)]));
    for part in [
        "src=\"data:image/png;base64,iVBORw==\"",
        "<td class=\"num\">0.812 [0.741, 0.874]</td>",
        "<figcaption>ROC curves</figcaption>",
        "<caption>Reported in the paper</caption>",
        "<p>Reported in <em>The paper</em> (Someone 2020).</p>",
        "<h2>Paired comparisons</h2>",
        "<td class=\"num\">-0.018 [-0.041, 0.000]</td>",
        &format!("<code>{fingerprint}</code>"),
    ] {
        assert!(html.contains(part), "missing {part:?} in\n{html}");
    }
    // Without comparisons (one arm) the section is left out.
    let (arms, provenance) = (arms(), provenance());
    let md = report_markdown(
        &Report {
            title: "t",
            arms: &arms[..1],
            comparisons: &[],
            paper: &[],
            paper_citation: "",
            notes: &[],
            provenance: &provenance,
        },
        &[],
    );
    assert!(
        !md.contains("Paired comparisons") && !md.contains("Reported in"),
        "{md}"
    );
}

#[test]
fn html_escapes_caller_text() {
    let mut evil = arms();
    evil[0].arm = "<script>alert('x')</script>".into();
    evil[0].description = "a & b".into();
    let provenance = provenance();
    let notes = vec!["<i>note</i>".to_string()];
    let html = report_html(
        &Report {
            title: "1 < 2",
            arms: &evil,
            comparisons: &[],
            paper: &[("<b>", "\"0.8\"")],
            paper_citation: "*<u>* & co",
            notes: &notes,
            provenance: &provenance,
        },
        &[("<img>", &[])],
    );
    assert!(
        !html.contains("<script>")
            && !html.contains("<b>")
            && !html.contains("<i>")
            && !html.contains("<u>")
    );
    for escaped in [
        "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;",
        "a &amp; b",
        "<title>1 &lt; 2</title>",
        "&quot;0.8&quot;",
        "&lt;i&gt;note",
        "<em>&lt;u&gt;</em> &amp; co",
    ] {
        assert!(html.contains(escaped), "missing {escaped}");
    }
    assert_eq!(emphasis_html("a *b* c *d"), "a <em>b</em> c *d");
}

#[test]
fn summaries_round_trip_through_json() {
    let json = serde_json::to_string(&arms()).unwrap();
    assert!(
        json.contains("\"auc_ci\":{\"low\":0.7412,\"high\":0.8744}"),
        "{json}"
    );
    let back: Vec<ArmSummary> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, arms());
}
