//! `vit serve`: an HTTP inference service for one or more models, with a web page.
//!
//! axum on tokio (HTTP/1 only, the features trimmed to what is used). Requests are decoded and
//! preprocessed on tokio's blocking threads, then queued to the model's [`Batcher`] (one
//! compute thread per model: requests arriving within `--max-wait-ms` run as one forward
//! pass of up to `--max-batch` images). A full queue answers 503 with `Retry-After`; a request
//! not answered within `--timeout-s` gets 504; Ctrl-C or SIGTERM stop accepting, finish what is
//! in flight, drain the queues and exit.
//!
//! Endpoints: `GET /` (the page), `GET /v1/models`, `POST /v1/models/{name}/predict`, the Open
//! Inference Protocol's `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2/models/{name}`,
//! `POST /v2/models/{name}/infer`, and `GET /metrics` (Prometheus).

mod api;
mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vitrs::batcher::{Batcher, BatcherConfig};
use vitrs::model::ViT;
use vitrs::preprocess::Preprocess;

use metrics::Metrics;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// A model to serve: `PATH` (named after its file or directory) or `NAME=PATH`, any
    /// format `vit` reads (hub ids too); repeat for several.
    #[arg(long = "model", value_name = "[NAME=]PATH", required = true)]
    models: Vec<String>,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Images per forward pass at most (1 turns batching off).
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_batch: usize,
    /// How long the first request of a batch waits at most for others already being received.
    #[arg(long, default_value_t = 5, value_name = "MS")]
    max_wait_ms: u64,
    /// Requests waiting per model at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_queue: usize,
    /// Largest request body, in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 20 << 20, value_name = "BYTES")]
    max_body: usize,
    /// A request not answered in this many seconds gets 504.
    #[arg(long, default_value_t = 60, value_name = "S")]
    timeout_s: u64,
}

/// One served model.
pub(crate) struct Served {
    pub name: String,
    pub model: Arc<ViT>,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    pub batcher: Batcher,
}

/// What every handler sees.
pub(crate) struct AppState {
    pub models: Vec<Served>,
    pub metrics: Metrics,
    pub timeout: Duration,
    pub max_body: usize,
}

impl AppState {
    pub fn model(&self, name: &str) -> Option<&Served> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// `NAME=PATH`, or `PATH` named after its last component (without `.safetensors` or `.npz`).
fn name_and_path(spec: &str) -> Result<(String, PathBuf)> {
    let (name, path) = match spec.split_once('=') {
        Some((n, p)) => (n.trim().to_string(), PathBuf::from(p)),
        None => {
            let p = PathBuf::from(spec);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string());
            (stem, p)
        }
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "--model `{spec}`: a model name is letters, digits, `-`, `_` and `.` (give NAME=PATH)"
        );
    }
    Ok((name, path))
}

pub(crate) fn run(a: ServeArgs) -> Result<u8> {
    let cfg = BatcherConfig {
        max_batch: a.max_batch.max(1),
        max_wait: Duration::from_millis(a.max_wait_ms),
        max_queue: a.max_queue.max(1),
        // A batch waits for requests the server is reading or decoding, not for ones that may
        // never come: a lone request runs at once.
        wait_for_announced: true,
    };
    let mut models = vec![];
    for spec in &a.models {
        let (name, path) = name_and_path(spec)?;
        if models.iter().any(|m: &Served| m.name == name) {
            bail!("--model `{spec}`: a model named `{name}` is already served; give NAME=PATH");
        }
        let mut ck = crate::load(&path)?;
        // A server runs many forwards of the same weights: pack them once.
        ck.model.pack_weights();
        let labels = (0..ck.model.config().num_classes)
            .map(|i| ck.label(i))
            .collect();
        let model = Arc::new(ck.model);
        let batcher = Batcher::new(model.clone(), cfg);
        eprintln!(
            "serving `{name}` from {} ({} classes, input {}x{}x{})",
            path.display(),
            model.config().num_classes,
            model.config().channels,
            model.config().image_height,
            model.config().image_width
        );
        models.push(Served {
            name,
            model,
            preprocess: ck.preprocess,
            labels,
            batcher,
        });
    }
    let state = Arc::new(AppState {
        models,
        metrics: Metrics::default(),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
        max_body: a.max_body,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The compute runs on the batchers' threads and the kernels' pool: a few I/O workers
        // and a bounded set of decoding threads are enough.
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let addr = format!("{}:{}", a.host, a.port);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr().context("listening address")?;
        eprintln!(
            "listening on http://{local}/ (batches of up to {} images within {} ms; Ctrl-C stops)",
            cfg.max_batch, a.max_wait_ms
        );
        axum::serve(listener, api::router(state.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the server stopped")
    })?;
    eprintln!("stopping: finishing the queued requests");
    // Dropping the state closes each batcher, which runs what is queued first.
    drop(rt);
    drop(state);
    Ok(0)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("\nshutting down: no new requests, finishing the ones in flight");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_name_their_models() {
        assert_eq!(
            name_and_path("demo=assets/demo/model").unwrap(),
            ("demo".into(), PathBuf::from("assets/demo/model"))
        );
        assert_eq!(
            name_and_path("runs/a/model.safetensors").unwrap().0,
            "model"
        );
        assert!(name_and_path("a b=x").is_err());
    }
}
