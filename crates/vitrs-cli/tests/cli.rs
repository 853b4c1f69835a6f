//! Runs the built `vit` binary as a user would: outputs, formats, and errors on bad input.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_npy(p: &Path) -> Vec<f32> {
    vitrs::npy::read_npy(p).unwrap().into_data()
}

/// Asserts a failed run: the given exit code, a one-line `error:` naming `needle`, no panic.
fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("error: ") && first.contains(needle),
        "expected `{needle}` in: {err}"
    );
}

#[test]
fn predict_json_lines_match_pytorch_logits() {
    let dir = fixtures().join("hf_cls");
    let input = dir.join("ref/input.npy");
    let o = vit(&[
        "predict",
        "--model",
        s(&dir),
        "--json",
        "--logits",
        "--top-k",
        "3",
        s(&input),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = read_npy(&dir.join("ref/logits.npy"));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per item of the (2, C, H, W) batch"
    );
    for (i, v) in lines.iter().enumerate() {
        assert!(v["input"]
            .as_str()
            .unwrap()
            .ends_with(&format!("input.npy[{i}]")));
        let top = v["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let logits: Vec<f32> = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        for (a, b) in logits.iter().zip(&want[i * 5..(i + 1) * 5]) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // The best class is the arg-max of PyTorch's logits, with its label and a probability.
        let best = (0..5)
            .max_by(|&a, &b| want[i * 5 + a].total_cmp(&want[i * 5 + b]))
            .unwrap();
        assert_eq!(top[0]["index"].as_u64().unwrap() as usize, best);
        assert!(["cat", "dog", "bird", "fish", "frog"].contains(&top[0]["label"].as_str().unwrap()));
        let p = top[0]["prob"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0);
    }
    // Without --logits the field is absent.
    let o = vit(&[
        "predict",
        "--model",
        s(&dir),
        "--json",
        s(&dir.join("ref/image.png")),
    ]);
    let v: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert!(v.get("logits").is_none());
    assert_eq!(v["top"].as_array().unwrap().len(), 5);
}

#[test]
fn predict_a_directory_skips_other_files() {
    let dir = fixtures().join("timm_tiny_named");
    let d = tmp("dir");
    for f in ["image.png", "image_large.png", "input.npy"] {
        std::fs::copy(dir.join("ref").join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("notes.txt"), "not an image").unwrap();
    let o = vit(&["predict", "--model", s(&dir), "--batch-size", "2", s(&d)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let names: Vec<&str> = out.lines().map(|l| l.split(": ").next().unwrap()).collect();
    let want: Vec<String> = [
        "image.png",
        "image_large.png",
        "input.npy[0]",
        "input.npy[1]",
    ]
    .iter()
    .map(|f| d.join(f).display().to_string())
    .collect();
    assert_eq!(names, want, "sorted, one line per input: {out}");
    assert!(stderr(&o).contains("skipped 1 file"), "{}", stderr(&o));
}

/// A NaN survives conversion to the native format, and loading the native file (its direct,
/// chunked read) still names the tensor that holds it.
#[test]
fn native_file_with_nan_is_loaded_with_a_warning_naming_the_tensor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bad_inputs/st_nan_weights");
    let t = tmp("native-nan");
    let native = t.join("m.safetensors");
    let o = vit(&["convert", "--model", s(&src), "--out", s(&native)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vit(&["info", "--model", s(&native)]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{all}");
    assert!(all.contains("tensor `head.bias` holds NaN or Inf"), "{all}");
    assert_eq!(all.matches("holds NaN or Inf").count(), 1, "{all}");
}

#[test]
fn info_and_convert_round_trip() {
    let dir = fixtures().join("timm_mean_nonsquare");
    let o = vit(&["info", "--model", s(&dir), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "timm");
    assert_eq!(v["config"]["pool"], "mean");
    assert!(v["parameters"].as_u64().unwrap() > 1000);
    let text = stdout(&vit(&["info", "--model", s(&dir)]));
    assert!(
        text.contains("format:        timm") && text.contains("GFLOP per image"),
        "{text}"
    );

    let t = tmp("convert");
    let native = t.join("m.safetensors");
    let o = vit(&["convert", "--model", s(&dir), "--out", s(&native)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let input = dir.join("ref/input.npy");
    let a = stdout(&vit(&[
        "predict",
        "--model",
        s(&dir),
        "--json",
        "--logits",
        s(&input),
    ]));
    let b = stdout(&vit(&[
        "predict",
        "--model",
        s(&native),
        "--json",
        "--logits",
        s(&input),
    ]));
    assert_eq!(
        a.replace(s(&dir), ""),
        b.replace(s(&native), "").replace(s(&dir), "")
    );
    // Half precision halves the file and still loads.
    let half = t.join("h.safetensors");
    assert!(vit(&[
        "convert",
        "--model",
        s(&dir),
        "--out",
        s(&half),
        "--dtype",
        "f16"
    ])
    .status
    .success());
    let info = stdout(&vit(&["info", "--model", s(&half)]));
    assert!(info.contains("converted") && info.contains("F16"), "{info}");
    assert!(
        std::fs::metadata(&half).unwrap().len()
            < std::fs::metadata(&native).unwrap().len() * 6 / 10
    );
}

#[test]
fn missing_model_is_a_clear_error() {
    let o = vit(&["predict", "--model", "/no/such/model", "x.png"]);
    assert_clean_failure(&o, 3, "/no/such/model");
    assert!(stderr(&o).contains("HINT:"));
}

#[test]
fn truncated_and_foreign_weights_are_rejected() {
    let src = fixtures().join("hf_cls");
    for (tag, bytes) in [
        (
            "truncated",
            std::fs::read(src.join("model.safetensors")).unwrap()[..5000].to_vec(),
        ),
        ("text", b"this is not a checkpoint".to_vec()),
        ("empty", vec![]),
    ] {
        let d = tmp(tag);
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        let o = vit(&["predict", "--model", s(&d), s(&src.join("ref/image.png"))]);
        assert_clean_failure(&o, 3, "model.safetensors");
    }
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor() {
    let d = tmp("mismatch");
    std::fs::copy(fixtures().join("hf_cls/config.json"), d.join("config.json")).unwrap();
    std::fs::copy(
        fixtures().join("hf_nonsquare/model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let o = vit(&["info", "--model", s(&d)]);
    assert_clean_failure(&o, 3, "wrong shape");
    let err = stderr(&o);
    assert!(
        err.contains("expects") && err.contains("weights have"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_an_image_fails_alone() {
    let d = tmp("notimage");
    let bad = d.join("photo.png");
    std::fs::write(&bad, b"GIF? no, just text").unwrap();
    let good = fixtures().join("hf_cls/ref/image.png");
    let o = vit(&[
        "predict",
        "--model",
        s(&fixtures().join("hf_cls")),
        s(&bad),
        s(&good),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("photo.png") && !stderr(&o).contains("panicked"));
    assert!(
        stdout(&o).contains("image.png: "),
        "the good image is still predicted"
    );
}

#[test]
fn npy_of_the_wrong_shape_is_refused() {
    let d = tmp("npyshape");
    let p = d.join("x.npy");
    let t = vitrs::Tensor::new(vec![3, 5, 5], vec![0.0; 75]).unwrap();
    vitrs::npy::write_npy(&p, &t).unwrap();
    let o = vit(&["predict", "--model", s(&fixtures().join("hf_cls")), s(&p)]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("[3, 5, 5]") && stderr(&o).contains("x.npy"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_reports_json() {
    let o = vit(&[
        "bench",
        "--model",
        s(&fixtures().join("hf_cls")),
        "--iters",
        "2",
        "--json",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["batch_size"], 1);

    // A product against the peaks: the running rung's FMA peak (none on the portable rung),
    // and the tile unit's exactly where the products run on it.
    let args = [
        "bench",
        "--gemm",
        "128x128x128",
        "--peak",
        "--iters",
        "2",
        "--json",
    ];
    let o = vit(&[&args[..], &["--threads", "1"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let gflops = v["gflops_per_sec"].as_f64().unwrap();
    let share = |peak: &str, eff: &str| match (v[peak].as_f64(), v[eff].as_f64()) {
        (Some(p), Some(e)) if p > 0.0 && (e - gflops / p).abs() < 1e-9 => true,
        (None, None) => false,
        _ => panic!("{peak} and {eff} disagree: {v}"),
    };
    assert_eq!(
        share("peak_gflops_per_sec", "efficiency"),
        v["kernels"] != "portable",
        "{v}"
    );
    // "amx-bf16x6", or "amx-bf16x6+fma" where the engine moved between repetitions.
    assert_eq!(
        share("tile_peak_gflops_per_sec", "tile_efficiency"),
        v["gemm"].as_str().unwrap().starts_with("amx"),
        "{v}"
    );

    // The ResNet baseline by preset, a training step; a depth that is no ResNet's refused.
    let o = vit(&[
        "bench",
        "--model",
        "resnet8@12x1",
        "--train",
        "--batch-size",
        "4",
        "--iters",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["gflops_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(v["train"], true);
    // The fastest repetition beside the median: one of the two timed, so no slower.
    let (best, median) = (
        v["best_batch_seconds"].as_f64(),
        v["median_batch_seconds"].as_f64(),
    );
    assert!(
        matches!((best, median), (Some(b), Some(m)) if b > 0.0 && b <= m),
        "{v}"
    );
    let o = vit(&["bench", "--model", "resnet21"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("6n + 2"), "{}", stderr(&o));

    // The matrix products alone: a JSON object per product, in the order given.
    let o = vit(&[
        "bench",
        "--gemm",
        "13x37x33,dx:13x37x33,dw:13x37x33",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<&str> = rows.iter().map(|v| v["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["fwd", "dx", "dw"], "{out}");
    for v in &rows {
        assert_eq!(
            (v["m"].as_u64(), v["k"].as_u64(), v["n"].as_u64()),
            (Some(13), Some(37), Some(33))
        );
        assert!(v["gflops_per_sec"].as_f64().unwrap() > 0.0, "{v}");
        let (best, median) = (v["best_seconds"].as_f64(), v["median_seconds"].as_f64());
        assert!(
            matches!((best, median), (Some(b), Some(m)) if b > 0.0 && b <= m),
            "{v}"
        );
    }
    // Malformed and oversized shapes are refused with the expected form, not a panic: a bad
    // command line (exit code 2).
    for bad in [
        "13x37",
        "up:13x37x33",
        "0x37x33",
        "99999999999x99999999999x99999999999",
    ] {
        let o = vit(&["bench", "--gemm", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--gemm"), "{bad}: {}", stderr(&o));
    }
}

/// Peak resident memory (kB) of `vit` run with `args`, polled from /proc while it runs;
/// also returns its stdout line count.
fn peak_rss_kb(args: &[&str]) -> (u64, usize) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .current_dir(workdir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s.lines().count()
    });
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(st) = std::fs::read_to_string(&status) {
            if let Some(kb) = st
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (peak, reader.join().unwrap())
}

/// `vit predict` over a directory streams: 10 000 images take no more memory than 1 000
/// (`VITRS_STREAM_IMAGES=a,b` changes the two counts).
#[test]
fn predicting_a_large_directory_streams_in_flat_memory() {
    if !Path::new("/proc/self/status").exists() {
        return; // the measurement needs Linux's /proc
    }
    let root = tmp("stream");
    let model = fixtures().join("hf_cls");
    let img = vitrs::preprocess::load_image(&model.join("ref/image.png")).unwrap();
    let small = img.resize_exact(8, 8, image::imageops::FilterType::Nearest);
    let mut buf = std::io::Cursor::new(vec![]);
    small.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let png = buf.into_inner();
    let mut peaks = vec![];
    let counts: Vec<usize> = std::env::var("VITRS_STREAM_IMAGES")
        .ok()
        .and_then(|v| v.split(',').map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    for &n in &counts {
        let dir = root.join(format!("imgs{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            std::fs::write(dir.join(format!("{i:05}.png")), &png).unwrap();
        }
        let (kb, lines) = peak_rss_kb(&["predict", "--model", s(&model), "--json", s(&dir)]);
        assert_eq!(lines, n, "one JSON line per image");
        peaks.push(kb);
    }
    eprintln!("peak RSS (kB) for {counts:?} images: {peaks:?}");
    // Ten times the images; the growth allowed is the list of paths and some allocator slack.
    assert!(
        peaks[1] < peaks[0] + 8 * 1024,
        "peak RSS grew from {} kB ({} images) to {} kB ({} images)",
        peaks[0],
        counts[0],
        peaks[1],
        counts[1]
    );
    std::fs::remove_dir_all(root).ok();
}

/// A Fortran-ordered `.npy` input (what NumPy writes for a transposed array) is read into C
/// order: the same logits as its C-ordered twin.
#[test]
fn fortran_ordered_npy_inputs_predict_like_their_c_twins() {
    let dir = fixtures().join("hf_cls");
    let fortran = fixtures().join("fortran/input_f.npy");
    let o = vit(&[
        "predict",
        "--model",
        s(&dir),
        "--json",
        "--logits",
        s(&fortran),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = read_npy(&dir.join("ref/logits.npy"));
    let got: Vec<f32> = stdout(&o)
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

/// A hub id that the local Hugging Face cache does not hold: exit 3, where it looked, and the
/// command that fetches it.
#[test]
fn an_uncached_hub_id_says_where_it_looked_and_how_to_fetch_it() {
    let cache = tmp("empty-hub");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["info", "--model", "acme/no-such-vit@v2"])
        .env("HF_HUB_CACHE", &cache)
        .current_dir(workdir())
        .output()
        .unwrap();
    assert_clean_failure(&o, 3, "acme/no-such-vit@v2");
    let err = stderr(&o);
    assert!(err.contains("models--acme--no-such-vit"), "{err}");
    assert!(
        err.contains("huggingface-cli download acme/no-such-vit --revision v2"),
        "{err}"
    );
}

/// `vit export --format onnx`: a file that decodes to the model's graph, its weights and
/// its preprocessing in the metadata; a bad opset is a clear error.
#[test]
fn export_writes_an_onnx_model() {
    let dir = tmp("onnx");
    let out = dir.join("m.onnx");
    let model = fixtures().join("timm_deit_distilled");
    let o = vit(&[
        "export",
        "--model",
        s(&model),
        "--format",
        "onnx",
        "--out",
        s(&out),
        "--dynamic-batch",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("output logits (batch, 5)"),
        "{}",
        stdout(&o)
    );
    let bytes = std::fs::read(&out).unwrap();
    let sum = vitrs::checkpoint::onnx::summarize(&out, &bytes).unwrap();
    assert_eq!(
        sum.inputs,
        vec![("pixel_values".to_string(), vec![-1, 3, 32, 32])]
    );
    assert!(sum.metadata.contains(&"vitrs.preprocess".to_string()));
    assert!(sum.nodes.iter().any(|n| n == "LayerNormalization"));
    let o = vit(&[
        "export",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--opset",
        "13",
    ]);
    assert_clean_failure(&o, 3, "opset 13");
}

/// A reader that stops early (`vit info --model DIR | head -1`) ends `vit` quietly, as it
/// ends other tools: no panic, no backtrace.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_run_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = fixtures().join("timm_mean_nonsquare");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(["info", "--model", s(&dir)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before `vit` has parsed its arguments, let alone printed.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        o.status
    );
}
