//! The bad-input corpus (`tests/bad_inputs/`, made by `tools/make_bad_inputs.py`): every file
//! a stranger could hand `vit` gets the exit code and the message its row in `cases.tsv`
//! promises — never a panic, within a few seconds.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn every_bad_input_gets_its_promised_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let corpus = root.join("tests/bad_inputs");
    let model = root.join("tests/fixtures/hf_cls");
    let table = std::fs::read_to_string(corpus.join("cases.tsv")).unwrap();
    let mut failures = vec![];
    let mut n = 0;
    for line in table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let [name, rel, args, exit, expect] = cols[..] else {
            panic!("bad row: {line}");
        };
        let file = corpus.join(rel);
        let argv: Vec<String> = args
            .split(' ')
            .map(|a| a.replace("{case}", s(&file)).replace("{model}", s(&model)))
            .collect();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let t = Instant::now();
        let o = vit(&argv);
        let took = t.elapsed();
        let (out, err) = (stdout(&o), stderr(&o));
        let want: i32 = exit.parse().unwrap();
        let text = if want == 0 {
            format!("{out}{err}")
        } else {
            err.clone()
        };
        let ok = o.status.code() == Some(want)
            && text.contains(expect)
            && !err.contains("panicked")
            && took < Duration::from_secs(20);
        if !ok {
            failures.push(format!(
                "{name}: `vit {}` exited {:?} (want {want}) in {took:?}; wanted `{expect}` in:\n{text}",
                argv.join(" "),
                o.status.code()
            ));
        }
        n += 1;
    }
    assert!(n >= 30, "only {n} cases");
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
