//! `GET /metrics` in Prometheus' text format: requests by endpoint and status, a latency
//! histogram, a histogram of the batch sizes the forward passes ran with, the queue depths.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets.
const LATENCY: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size buckets (images per forward pass).
const BATCH: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram over fixed buckets.
#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

#[derive(Default)]
struct Inner {
    /// (endpoint, status) -> requests.
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch: Histogram,
}

/// The server's counters.
#[derive(Default)]
pub(crate) struct Metrics(Mutex<Inner>);

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16, took: Duration) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_default()
            .observe(&LATENCY, took.as_secs_f64());
    }

    /// A forward pass ran with `images` images (recorded once per request it answered).
    pub fn batch(&self, images: usize) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.batch.observe(&BATCH, images as f64);
    }

    /// The exposition text, with the current queue depth of each model.
    pub fn render(&self, depths: &[(String, usize)]) -> String {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        out.push_str("# HELP vitrs_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE vitrs_requests_total counter\n");
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "vitrs_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP vitrs_request_duration_seconds Time to answer a request.\n");
        out.push_str("# TYPE vitrs_request_duration_seconds histogram\n");
        for (endpoint, h) in &m.latency {
            let labels = format!("endpoint=\"{endpoint}\"");
            h.render(
                &mut out,
                "vitrs_request_duration_seconds",
                &labels,
                &LATENCY,
            );
        }
        out.push_str(
            "# HELP vitrs_batch_images Images in the forward pass that answered a request.\n",
        );
        out.push_str("# TYPE vitrs_batch_images histogram\n");
        m.batch.render(&mut out, "vitrs_batch_images", "", &BATCH);
        out.push_str("# HELP vitrs_queue_depth Requests waiting or running, per model.\n");
        out.push_str("# TYPE vitrs_queue_depth gauge\n");
        for (model, d) in depths {
            let _ = writeln!(out, "vitrs_queue_depth{{model=\"{model}\"}} {d}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_text_counts_and_buckets() {
        let m = Metrics::default();
        m.request("/v1/models/{name}/predict", 200, Duration::from_millis(30));
        m.request("/v1/models/{name}/predict", 200, Duration::from_millis(300));
        m.request("/v1/models/{name}/predict", 415, Duration::from_millis(1));
        m.batch(3);
        let t = m.render(&[("demo".into(), 2)]);
        assert!(t.contains(
            "vitrs_requests_total{endpoint=\"/v1/models/{name}/predict\",status=\"200\"} 2"
        ));
        assert!(t.contains("status=\"415\"} 1"));
        assert!(t.contains(
            "vitrs_request_duration_seconds_bucket{endpoint=\"/v1/models/{name}/predict\",le=\"0.05\"} 2"
        ));
        assert!(t.contains("vitrs_batch_images_bucket{le=\"2\"} 0"));
        assert!(t.contains("vitrs_batch_images_bucket{le=\"4\"} 1"));
        assert!(t.contains("vitrs_queue_depth{model=\"demo\"} 2"));
    }
}
