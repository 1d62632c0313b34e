use super::*;
use crate::context::{StageContext, StageReport};
use crate::registry::{BoxError, Stage};
use serde::{Deserialize, Serialize};

struct Toy;
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToyParams {
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    rate: f64,
    #[serde(default)]
    path: Option<String>,
}
impl Stage for Toy {
    type Params = ToyParams;
    const KIND: &'static str = "toy";
    const CODE: &'static str = "test-code";
    const ABOUT: &'static str = "test kind";
    fn check(&self, p: &ToyParams, _inputs: &[String]) -> Result<(), String> {
        if p.rate > 1.0 {
            Err(format!("`rate` must be at most 1, not {}", p.rate))
        } else {
            Ok(())
        }
    }
    fn run(&self, _: &ToyParams, _: &StageContext) -> Result<StageReport, BoxError> {
        Ok(StageReport::default())
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Toy);
    r
}

fn parse_text(text: &str, overrides: &[&str]) -> Result<Pipeline, String> {
    let o: Vec<Override> = overrides.iter().map(|s| s.parse().unwrap()).collect();
    parse(Path::new("data/p.toml"), text, &registry(), &o).map_err(|e| e.to_string())
}

const GOOD: &str = "[store]\nurl = \"store\"\n\n[stages.b]\nkind = \"toy\"\ninputs = [\"a\"]\nseed = 2\n\n[stages.a]\nkind = \"toy\"\n";

#[test]
fn executor_and_resources() {
    let p = parse_text(GOOD, &[]).unwrap();
    assert_eq!(p.executor, ExecutorConfig::default());
    assert_eq!(p.stage("a").unwrap().resources, Resources::default());
    let text = format!(
        "[executor]\nkind = \"slurm\"\npartition = \"gpu\"\n\n{GOOD}\n[stages.a.resources]\ncpus = 4\nmem = \"8G\"\n"
    );
    let p = parse_text(&text, &[]).unwrap();
    assert_eq!(
        (p.executor.kind, p.executor.partition.as_deref()),
        (ExecutorKind::Slurm, Some("gpu"))
    );
    let r = &p.stage("a").unwrap().resources;
    assert_eq!(
        (r.cpus, r.mem.as_deref(), r.gpus),
        (Some(4), Some("8G"), None)
    );
    let fp_params = &p.stage("a").unwrap().params.canonical;
    assert_eq!(
        fp_params,
        &parse_text(GOOD, &[])
            .unwrap()
            .stage("a")
            .unwrap()
            .params
            .canonical,
        "resources are not parameters"
    );
    let e = parse_text(&format!("{GOOD}\n[stages.a.resources]\ngpu = 1\n"), &[]).unwrap_err();
    assert!(e.contains("stages.a.resources") && e.contains("gpu"), "{e}");
    let p = parse_text(&format!("[executor]\ngpus = true\n{GOOD}"), &[]).unwrap();
    assert!(p.executor.gpus && !ExecutorConfig::default().gpus);
    // Only the stage kind says whether a stage can use a GPU.
    let e = parse_text(
        &format!("{GOOD}\n[stages.a.resources]\ngpus_if_available = 1\n"),
        &[],
    )
    .unwrap_err();
    assert!(e.contains("gpus_if_available"), "{e}");
    let e = parse_text(&format!("[executor]\nkind = \"kubernetes\"\n{GOOD}"), &[]).unwrap_err();
    assert!(e.contains(":2:") && e.contains("kubernetes"), "{e}");
}

#[test]
fn remote_store_settings() {
    assert_eq!(parse_text(GOOD, &[]).unwrap().remote, None);
    let text = GOOD.replace("url = \"store\"\n", "url = \"store\"\nremote = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:9000\"\nremote_read_only = true\n");
    let remote = parse_text(&text, &[]).unwrap().remote.unwrap();
    let expected = RemoteConfig {
        url: "s3://b/p".into(),
        endpoint: Some("http://127.0.0.1:9000".into()),
        region: None,
        read_only: true,
    };
    assert_eq!(remote, expected);
    let e = parse_text(
        &GOOD.replace(
            "url = \"store\"\n",
            "url = \"store\"\nendpoint = \"http://x\"\n",
        ),
        &[],
    )
    .unwrap_err();
    assert!(e.contains("set `remote"), "{e}");
    let e = parse_text(
        &GOOD.replace(
            "url = \"store\"\n",
            "url = \"store\"\nremote = \"s3://b\"\nremote_read_only = \"yes\"\n",
        ),
        &[],
    )
    .unwrap_err();
    assert!(
        e.contains(":4:") && e.contains("expected true or false"),
        "{e}"
    );
}

#[test]
fn parses_and_orders_upstreams_first() {
    let p = parse_text(GOOD, &[]).unwrap();
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(p.stage("b").unwrap().params.canonical["seed"], 2);
    assert_eq!(p.stage("b").unwrap().line, 4);
    assert_eq!(p.lock_path(), Path::new("data/p.lock"));
}

#[test]
fn unknown_parameter_names_file_line_and_key() {
    let e = parse_text("[stages.a]\nkind = \"toy\"\nsed = 3\n", &[]).unwrap_err();
    assert!(e.starts_with("data/p.toml:3:1:"), "{e}");
    assert!(e.contains("unknown field `sed`"), "{e}");
}

#[test]
fn wrong_type_names_line() {
    let e = parse_text("[stages.a]\nkind = \"toy\"\n\nseed = \"many\"\n", &[]).unwrap_err();
    assert!(e.starts_with("data/p.toml:4:"), "{e}");
    assert!(
        e.contains("stages.a.seed (kind `toy`): invalid type: string \"many\""),
        "{e}"
    );
}

#[test]
fn unknown_top_level_key_and_store_key() {
    let e = parse_text("[stor]\nurl = \"x\"\n", &[]).unwrap_err();
    assert!(e.contains("data/p.toml:1:2: unknown key `stor`"), "{e}");
    let e = parse_text("[store]\nurl = \"x\"\nuri = 1\n", &[]).unwrap_err();
    assert!(e.contains(":3:1: store: unknown key `uri`"), "{e}");
}

#[test]
fn missing_upstream_and_cycle_and_self_loop() {
    let e = parse_text("[stages.a]\nkind = \"toy\"\ninputs = [\"nope\"]\n", &[]).unwrap_err();
    assert!(
        e.contains("data/p.toml:1: stages.a.inputs: no stage named `nope`"),
        "{e}"
    );
    let e = parse_text("[stages.a]\nkind = \"toy\"\ninputs = [\"b\"]\n[stages.b]\nkind = \"toy\"\ninputs = [\"a\"]\n", &[]).unwrap_err();
    assert!(
        e.contains("stages form a cycle: a -> b -> a") || e.contains("b -> a -> b"),
        "{e}"
    );
    let e = parse_text("[stages.a]\nkind = \"toy\"\ninputs = [\"a\"]\n", &[]).unwrap_err();
    assert!(e.contains("cannot read its own output"), "{e}");
}

#[test]
fn unknown_kind_and_missing_kind() {
    let e = parse_text("[stages.a]\nkind = \"tyo\"\n", &[]).unwrap_err();
    assert!(
        e.contains("unknown kind `tyo`, expected one of `toy`"),
        "{e}"
    );
    let e = parse_text("[stages.a]\nseed = 1\n", &[]).unwrap_err();
    assert!(e.contains("has no `kind`"), "{e}");
}

#[test]
fn stage_check_is_reported_at_the_stage() {
    let e = parse_text("[stages.a]\nkind = \"toy\"\nrate = 2.0\n", &[]).unwrap_err();
    assert!(
        e.contains("data/p.toml:1:") && e.contains("`rate` must be at most 1"),
        "{e}"
    );
}

#[test]
fn overrides_apply_and_bad_ones_name_the_flag() {
    let p = parse_text(GOOD, &["b.seed=9", "a.path=some/file.csv"]).unwrap();
    assert_eq!(p.stage("b").unwrap().params.canonical["seed"], 9);
    assert_eq!(
        p.stage("a").unwrap().params.canonical["path"],
        "some/file.csv"
    );
    let e = parse_text(GOOD, &["b.seed=many"]).unwrap_err();
    assert!(e.contains("--set b.seed=many"), "{e}");
    let e = parse_text(GOOD, &["zz.seed=1"]).unwrap_err();
    assert!(e.contains("no stage `zz`"), "{e}");
    let e = parse_text(GOOD, &["b.sede=1"]).unwrap_err();
    assert!(
        e.contains("--set b.sede=1") && e.contains("unknown field"),
        "{e}"
    );
}

#[test]
fn syntax_error_has_a_line() {
    let e = parse_text("[stages.a\nkind = 1\n", &[]).unwrap_err();
    assert!(e.starts_with("data/p.toml:1:"), "{e}");
}

#[test]
fn key_order_in_the_file_does_not_change_canonical_params() {
    let a = parse_text("[stages.a]\nkind = \"toy\"\nseed = 1\nrate = 0.5\n", &[]).unwrap();
    let b = parse_text("[stages.a]\nrate = 0.5\nseed = 1\nkind = \"toy\"\n", &[]).unwrap();
    assert_eq!(a.stages[0].params.canonical, b.stages[0].params.canonical);
}

const FOREACH: &str = r#"
[stages.a]
kind = "toy"
foreach = [0, 1, 2]
seed = "${item}"
path = "fold-${item}.csv"

[stages.b]
kind = "toy"
foreach = [0, 1, 2]
inputs = ["a@${item}"]

[stages.all]
kind = "toy"
inputs = ["b@0", "b@1", "b@2"]
"#;

#[test]
fn foreach_declares_one_stage_per_item_with_the_item_substituted() {
    let p = parse_text(FOREACH, &[]).unwrap();
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a@0", "a@1", "a@2", "b@0", "b@1", "b@2", "all"]);
    for k in 0..3 {
        let a = p.stage(&format!("a@{k}")).unwrap();
        // A whole-string placeholder keeps the item's type; inside a string, its text.
        assert_eq!(a.params.canonical["seed"], k);
        assert_eq!(a.params.canonical["path"], format!("fold-{k}.csv"));
        assert_eq!(a.line, 2, "errors point at the table that declared it");
        assert_eq!(
            p.stage(&format!("b@{k}")).unwrap().inputs,
            [format!("a@{k}")]
        );
    }
    // Written out by hand, the same stage parses to the same parameters.
    let by_hand = parse_text(
        "[stages.a]\nkind = \"toy\"\nseed = 2\npath = \"fold-2.csv\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        by_hand.stages[0].params.canonical,
        p.stage("a@2").unwrap().params.canonical
    );
}

#[test]
fn overrides_reach_every_item_or_one() {
    let p = parse_text(FOREACH, &["a.rate=0.5", "a@1.path=x.csv"]).unwrap();
    for k in 0..3 {
        assert_eq!(
            p.stage(&format!("a@{k}")).unwrap().params.canonical["rate"],
            0.5
        );
    }
    assert_eq!(p.stage("a@1").unwrap().params.canonical["path"], "x.csv");
    assert_eq!(
        p.stage("a@2").unwrap().params.canonical["path"],
        "fold-2.csv"
    );
    let e = parse_text(FOREACH, &["a.foreach=[1]"]).unwrap_err();
    assert!(e.contains("cannot be overridden"), "{e}");
}

#[test]
fn bad_foreach_lists_name_the_line_and_the_problem() {
    let bad = |list: &str| {
        parse_text(
            &format!("\n[stages.a]\nkind = \"toy\"\nforeach = {list}\n"),
            &[],
        )
        .unwrap_err()
    };
    let e = bad("[]");
    assert!(
        e.starts_with("data/p.toml:4:") && e.contains("is empty"),
        "{e}"
    );
    let e = bad("[1, 1]");
    assert!(e.contains("lists `1` twice"), "{e}");
    let e = bad("[\"a b\"]");
    assert!(
        e.contains("an integer or a name") && e.contains("\"a b\""),
        "{e}"
    );
    let e = bad("[1.5]");
    assert!(
        e.contains("an integer or a name") && e.contains("float"),
        "{e}"
    );
    let e = bad("3");
    assert!(e.contains("must be a list"), "{e}");
    // An input that names an item the list lacks is a missing upstream.
    let e = parse_text(
        "[stages.a]\nkind = \"toy\"\nforeach = [0]\n\n[stages.b]\nkind = \"toy\"\ninputs = [\"a@1\"]\n",
        &[],
    )
    .unwrap_err();
    assert!(e.contains("a@1"), "{e}");
}
