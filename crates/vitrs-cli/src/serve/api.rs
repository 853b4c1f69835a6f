//! The HTTP endpoints of `vit serve`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Path as UrlPath, Query, Request, State,
};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use vitrs::attnmap::{attention_map, HeadFusion, Method};
use vitrs::batcher::{Arrival, Rejected, Request as Job};
use vitrs::Tensor;

use super::{AppState, Served};

/// The web page: one file, no network.
const PAGE: &str = include_str!("page.html");

type Shared = Arc<AppState>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}/predict", post(predict))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.max_body))
        .with_state(state)
}

/// Counts every request by endpoint and status and times it. A body announced larger than
/// `--max-body` is refused (413) before any of it is read; one sent without a length is cut
/// off at the limit by [`DefaultBodyLimit`].
async fn observe(
    State(s): State<Shared>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let endpoint = path.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let start = Instant::now();
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let resp = match announced {
        Some(n) if n > s.max_body as u64 => too_large(n, s.max_body),
        _ => next.run(req).await,
    };
    s.metrics
        .request(&endpoint, resp.status().as_u16(), start.elapsed());
    resp
}

/// A JSON error: `{"error": message}`.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn too_large(n: u64, limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body of {n} bytes is over this server's limit of {limit} bytes (--max-body)"),
    )
}

fn not_found(name: &str, s: &AppState) -> Response {
    let names: Vec<&str> = s.models.iter().map(|m| m.name.as_str()).collect();
    error(
        StatusCode::NOT_FOUND,
        format!("no model named `{name}`; this server has {names:?}"),
    )
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

async fn ready(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"ready": !s.models.is_empty()}))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let depths: Vec<(String, usize)> = s
        .models
        .iter()
        .map(|m| (m.name.clone(), m.batcher.queue_depth()))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&depths),
    )
}

async fn list_models(State(s): State<Shared>) -> Json<Value> {
    let models: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            let c = m.model.config();
            json!({
                "name": m.name,
                "classes": c.num_classes,
                "labels": m.labels,
                "input": {"channels": c.channels, "height": c.image_height, "width": c.image_width},
            })
        })
        .collect();
    Json(json!({"models": models}))
}

/// Open Inference Protocol model metadata.
async fn model_metadata(State(s): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    let Some(m) = s.model(&name) else {
        return not_found(&name, &s);
    };
    let c = m.model.config();
    let (out, width) = output_of(m);
    Json(json!({
        "name": m.name,
        "versions": ["1"],
        "platform": "vitrs",
        "inputs": [{"name": "pixel_values", "datatype": "FP32",
                    "shape": [-1, c.channels, c.image_height, c.image_width]}],
        "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, width]}],
    }))
    .into_response()
}

/// The output's name and width: logits, or the features of a model without a classifier.
fn output_of(m: &Served) -> (&'static str, usize) {
    let c = m.model.config();
    match c.num_classes {
        0 => ("features", c.feature_dim()),
        k => ("logits", k),
    }
}

/// Runs `images` through the model's batcher and waits for the answer (or the timeout).
async fn run_batched(
    s: &AppState,
    m: &Served,
    images: Tensor,
    attention: bool,
    arrival: Arrival,
) -> Result<vitrs::batcher::Response, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        images,
        attention,
        reply: Box::new(move |r| {
            let _ = tx.send(r);
        }),
    };
    // No longer on its way once queued: dropped first, or the batch this request starts
    // would wait for the request itself.
    drop(arrival);
    let submitted = m.batcher.submit(job);
    if let Err(rej) = submitted {
        let why = match rej {
            Rejected::QueueFull(_) => "the queue is full; retry in a moment",
            Rejected::Closed(_) => "the server is shutting down",
        };
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, why);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(resp);
    }
    match tokio::time::timeout(s.timeout, rx).await {
        Ok(Ok(Ok(r))) => {
            s.metrics.batch(r.batch_images);
            Ok(r)
        }
        Ok(Ok(Err(e))) => Err(error(StatusCode::BAD_REQUEST, e.to_string())),
        Ok(Err(_)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the compute thread dropped the request",
        )),
        Err(_) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {} s", s.timeout.as_secs()),
        )),
    }
}

#[derive(Deserialize)]
struct PredictQuery {
    top_k: Option<usize>,
    attention: Option<String>,
}

/// The request's body, read within the request timeout (408 for a client that stalls).
async fn read_body(s: &Shared, req: Request) -> Result<Bytes, Response> {
    match tokio::time::timeout(s.timeout, body_bytes(s, req)).await {
        Ok(r) => r,
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                s.timeout.as_secs()
            ),
        )),
    }
}

/// The request's image: the raw body, or the first file of a `multipart/form-data` body.
async fn body_bytes(s: &Shared, req: Request) -> Result<Bytes, Response> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if multipart {
        let mut mp = Multipart::from_request(req, s)
            .await
            .map_err(|e| error(e.status(), e.body_text()))?;
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| error(e.status(), e.body_text()))?
        {
            if field.file_name().is_some() || field.name() == Some("image") {
                return field
                    .bytes()
                    .await
                    .map_err(|e| error(e.status(), e.body_text()));
            }
        }
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the multipart body has no file field (send the image as a file, or as the raw body)",
        ));
    }
    Bytes::from_request(req, s)
        .await
        .map_err(|e| error(e.status(), e.body_text()))
}

/// `POST /v1/models/{name}/predict?top_k=K&attention=rollout|mean`, the image as the body.
async fn predict(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<PredictQuery>,
    req: Request,
) -> Response {
    let start = Instant::now();
    let Some(m) = s.model(&name) else {
        return not_found(&name, &s);
    };
    let method = match q.attention.as_deref() {
        None | Some("") | Some("none") => None,
        Some("rollout") => Some(Method::Rollout {
            fusion: HeadFusion::Mean,
            discard_ratio: 0.0,
        }),
        Some("mean") => Some(Method::Mean {
            layer: m.model.config().depth - 1,
            fusion: HeadFusion::Mean,
        }),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("attention `{other}`: choose rollout or mean"),
            )
        }
    };
    // Announced before the body is read: a batch being gathered waits for this request.
    let arrival = m.batcher.announce();
    let bytes = match read_body(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Decoding and preprocessing off the compute threads.
    let pre = m.preprocess.clone();
    let decoded =
        tokio::task::spawn_blocking(move || pre.load_bytes(Path::new("request body"), &bytes))
            .await;
    let x = match decoded {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return image_error(e),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed"),
    };
    let r = match run_batched(&s, m, x.clone(), method.is_some(), arrival).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let cfg = m.model.config();
    let k = q.top_k.unwrap_or(5).min(cfg.num_classes.max(1));
    let top: Vec<Value> = vitrs::infer::top_k(r.outputs.data(), k)
        .into_iter()
        .map(|(i, p)| json!({"index": i, "label": m.labels.get(i).cloned().unwrap_or_else(|| format!("class_{i}")), "prob": p}))
        .collect();
    let mut out = json!({
        "model": m.name,
        "top": top,
        "batch": r.batch_images,
        "queued_ms": r.queued.as_secs_f64() * 1e3,
        "compute_ms": r.compute.as_secs_f64() * 1e3,
    });
    if let (Some(method), Some(att)) = (method, r.attentions) {
        let model = m.model.clone();
        let pre = m.preprocess.clone();
        let drawn =
            tokio::task::spawn_blocking(move || attention_json(&model, &pre, &x, &att, method))
                .await;
        match drawn {
            Ok(Ok(v)) => out["attention"] = v,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "drawing the map failed"),
        }
    }
    out["ms"] = json!(start.elapsed().as_secs_f64() * 1e3);
    Json(out).into_response()
}

/// The attention map of one image: the grid values and the overlay as a base64 PNG.
fn attention_json(
    model: &vitrs::ViT,
    pre: &vitrs::Preprocess,
    x: &Tensor,
    att: &Tensor,
    method: Method,
) -> vitrs::Result<Value> {
    let cfg = model.config();
    // (L, 1, nh, N, N) is (L, nh, N, N) for one image.
    let map = attention_map(cfg, att.data(), method)?;
    let shown = vitrs::viz::attention::display_image(pre, x);
    let png = vitrs::viz::heatmap::overlay(&shown, &map.normalized(), map.grid, 0.5).to_png()?;
    let (gh, gw) = map.grid;
    let grid: Vec<&[f32]> = map.values.chunks(gw).take(gh).collect();
    Ok(json!({
        "method": match method { Method::Rollout { .. } => "rollout", _ => "mean" },
        "grid": [gh, gw],
        "values": grid,
        "overlay_png": base64(&png),
    }))
}

/// An image that could not be read: 415 when the bytes are no image format at all, 400 when
/// they are one but broken (truncated) or refused (too large to decode); the message is the
/// one `vit predict` prints.
fn image_error(e: vitrs::Error) -> Response {
    let status = match &e {
        vitrs::Error::Image { reason, .. } if reason == vitrs::preprocess::NOT_AN_IMAGE => {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

/// `POST /v2/models/{name}/infer` (Open Inference Protocol): one FP32 input
/// `(B, C, H, W)`, already preprocessed; the logits (or features) back.
async fn infer(State(s): State<Shared>, UrlPath(name): UrlPath<String>, req: Request) -> Response {
    let Some(m) = s.model(&name) else {
        return not_found(&name, &s);
    };
    let arrival = m.batcher.announce();
    let body = match read_body(&s, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let c = m.model.config();
    let want = format!("[B, {}, {}, {}]", c.channels, c.image_height, c.image_width);
    let Some(input) = v["inputs"].as_array().and_then(|a| a.first()) else {
        return error(StatusCode::BAD_REQUEST, "no `inputs`: send {\"inputs\": [{\"name\", \"shape\", \"datatype\": \"FP32\", \"data\"}]}");
    };
    if input["datatype"].as_str().is_some_and(|d| d != "FP32") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("datatype {}: only FP32 is served", input["datatype"]),
        );
    }
    let shape: Option<Vec<usize>> = input["shape"]
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
    let Some(shape) = shape else {
        return error(StatusCode::BAD_REQUEST, format!("`shape` must be {want}"));
    };
    let mut data = Vec::new();
    if !flatten(&input["data"], &mut data) {
        return error(
            StatusCode::BAD_REQUEST,
            "`data` must be numbers (flat or nested arrays)",
        );
    }
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let ok_shape = shape.len() == 4
        && shape[0] > 0
        && shape[1..] == [c.channels, c.image_height, c.image_width]
        && numel == Some(data.len());
    if !ok_shape {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "input shape {shape:?} with {} values: the model takes {want}, B·{} values",
                data.len(),
                c.channels * c.image_height * c.image_width
            ),
        );
    }
    let x = match Tensor::new(shape.clone(), data) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let r = match run_batched(&s, m, x, false, arrival).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (out, width) = output_of(m);
    Json(json!({
        "model_name": m.name,
        "model_version": "1",
        "outputs": [{"name": out, "datatype": "FP32", "shape": [shape[0], width], "data": r.outputs.data()}],
    }))
    .into_response()
}

/// Appends every number of a (nested) JSON array to `out`; false if anything else is found.
fn flatten(v: &Value, out: &mut Vec<f32>) -> bool {
    match v {
        Value::Number(n) => n.as_f64().map(|f| out.push(f as f32)).is_some(),
        Value::Array(a) => a.iter().all(|x| flatten(x, out)),
        _ => false,
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            s.push(if i <= c.len() {
                T[(n >> shift & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn nested_data_flattens_and_strings_do_not() {
        let mut out = vec![];
        assert!(flatten(&json!([[1, 2], [3.5]]), &mut out));
        assert_eq!(out, vec![1.0, 2.0, 3.5]);
        assert!(!flatten(&json!([1, "x"]), &mut vec![]));
    }
}
