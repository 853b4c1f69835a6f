//! `vit demo`: the two-minute tour. A small ViT (`configs/demo.toml`) trains on Fashion-MNIST —
//! one epoch of the full training set when the Debian package is installed, otherwise eight
//! epochs of a sample bundled in the repository — then is evaluated, classifies the first test
//! image of each class, and draws where it looked (attention rollout). Everything lands in one
//! folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::attnmap::{HeadFusion, Method};
use crate::data::{Dataset, Split, Subset};
use crate::error::{Error, Result};
use crate::train::trainer::{Outcome, CHECKPOINT, CONFUSION, CURVE, METRICS, MODEL};
use crate::train::{EvalResult, Hooks, RunConfig, Trainer};

/// The demo's run config (embedded, so the demo runs from anywhere).
pub const CONFIG: &str = include_str!("../../../configs/demo.toml");
/// Fashion-MNIST's official test split (MIT licence, Zalando SE), bundled so the demo runs on
/// a fresh clone with nothing installed.
const SAMPLE_IMAGES: &[u8] =
    include_bytes!("../../../assets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
const SAMPLE_LABELS: &[u8] =
    include_bytes!("../../../assets/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz");

/// Files the demo writes, as (what, file name in the output folder).
pub const OUTPUTS: [(&str, &str); 6] = [
    ("training curve", CURVE),
    ("confusion matrix", CONFUSION),
    ("model", MODEL),
    ("predictions", "predictions.json"),
    ("attention maps", "attention.png"),
    ("metrics", METRICS),
];

/// The demo's data: the full Fashion-MNIST when installed, else the bundled sample split
/// 8 000 / 2 000, with the epochs that make either about two minutes.
pub struct DemoData {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
    /// What the data is, for the user.
    pub source: String,
    pub epochs: u64,
}

/// The full Fashion-MNIST if it is installed, otherwise the bundled sample.
pub fn data() -> Result<DemoData> {
    let size = (1, 28, 28);
    let full = crate::data::open("fashion-mnist", Split::Train, size)
        .and_then(|tr| Ok((tr, crate::data::open("fashion-mnist", Split::Test, size)?)));
    if let Ok((train, test)) = full {
        return Ok(DemoData {
            train,
            test,
            source: "the full Fashion-MNIST (60,000 training images), 1 epoch".into(),
            epochs: 1,
        });
    }
    let (ip, lp) = (
        Path::new("t10k-images (bundled)"),
        Path::new("t10k-labels (bundled)"),
    );
    let all = crate::data::idx::pair(
        ip,
        &crate::data::idx::gunzip(ip, SAMPLE_IMAGES)?,
        lp,
        &crate::data::idx::gunzip(lp, SAMPLE_LABELS)?,
        true,
    )?;
    let all: Arc<dyn Dataset> = Arc::new(all);
    Ok(DemoData {
        train: Arc::new(Subset::new(all.clone(), (0..8000).collect())),
        test: Arc::new(Subset::new(all, (8000..10_000).collect())),
        source: "the bundled sample (8,000 training / 2,000 test images of the official test \
                 split), 8 epochs; `apt-get install dataset-fashion-mnist` for the full set"
            .into(),
        epochs: 8,
    })
}

/// One example image and what the trained model said about it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Example {
    pub image: PathBuf,
    #[serde(rename = "true")]
    pub truth: String,
    pub predicted: String,
    pub prob: f32,
}

/// What the demo did.
pub struct DemoReport {
    pub result: EvalResult,
    pub examples: Vec<Example>,
    /// Where the example images are.
    pub images: PathBuf,
}

/// A demo ready to run in its output folder.
pub struct Demo {
    trainer: Trainer,
    test: Arc<dyn Dataset>,
    out: PathBuf,
    /// What the data is, for the user.
    pub source: String,
}

impl Demo {
    /// Picks the data and sets up the run in `out` (a previous demo there is replaced).
    pub fn new(out: &Path) -> Result<Self> {
        let mut run = RunConfig::from_toml(CONFIG, "configs/demo.toml")?;
        let d = data()?;
        run.train.epochs = d.epochs;
        if out.join(CHECKPOINT).exists() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        let trainer = Trainer::with_data(run, out, d.train, d.test.clone(), "test split".into())?;
        Ok(Demo {
            trainer,
            test: d.test,
            out: out.to_path_buf(),
            source: d.source,
        })
    }

    /// Trains and evaluates (progress through `hooks`), classifies the first test image of
    /// each class, and writes the files of [`OUTPUTS`] and the example images.
    pub fn run(mut self, hooks: &mut dyn Hooks) -> Result<DemoReport> {
        let stop = AtomicBool::new(false);
        let Outcome::Finished(result) = self.trainer.run(hooks, &stop, None)? else {
            return Err(Error::BadInput(
                "the demo run stopped before its end".into(),
            ));
        };
        let t = &self.trainer;
        let images = self.out.join("images");
        std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
        // The weights the run evaluated (their moving average, when the config keeps one).
        let trained = t.result_model();
        let model = trained.vit("the demo")?;
        let mut examples = vec![];
        let mut seen = vec![false; self.test.classes().len()];
        let mut px = vec![0u8; 28 * 28];
        for i in 0..self.test.len() {
            let y = self.test.label(i);
            if std::mem::replace(&mut seen[y], true) {
                continue;
            }
            self.test.image(i, &mut px)?;
            let name = t.labels[y].replace(['/', ' '], "-").to_lowercase();
            let file = images.join(format!("{y:02}_{name}.png"));
            crate::preprocess::save_gray_png(&file, &px, 28, 28)?;
            let logits = model.logits(&t.preprocess.load(&file)?)?;
            let (best, prob) = crate::infer::top_k(logits.data(), 1)[0];
            examples.push(Example {
                image: file,
                truth: t.labels[y].clone(),
                predicted: t.labels[best].clone(),
                prob,
            });
        }
        // Where the model looked: attention rollout over the same images.
        let rollout = [(
            "rollout".to_string(),
            Method::Rollout {
                fusion: HeadFusion::Mean,
                discard_ratio: 0.0,
            },
        )];
        let files: Vec<PathBuf> = examples.iter().map(|e| e.image.clone()).collect();
        let label_of = |i: usize| {
            t.labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("class_{i}"))
        };
        let explained =
            crate::viz::attention::explain(model, &t.preprocess, &label_of, &files, &rollout, 0.5)?;
        let rows: Vec<_> = explained.into_iter().map(|e| e.row).collect();
        crate::viz::heatmap::plot_rows(
            &self.out.join("attention.png"),
            "attention rollout: where the class token looks",
            &rows,
        )?;
        let pj = self.out.join("predictions.json");
        let json = serde_json::to_string_pretty(&examples)
            .map_err(|e| Error::serialize("the predictions", e))?;
        std::fs::write(&pj, json).map_err(|e| Error::io(&pj, e))?;
        Ok(DemoReport {
            result,
            examples,
            images,
        })
    }
}
