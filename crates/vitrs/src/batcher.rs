//! Dynamic batching for a server: requests that arrive within `max_wait` of each other run as
//! one forward pass of up to `max_batch` images, on one compute thread per model, through a
//! bounded queue. Batching is what lets a server keep the GEMMs large (a batch-16 ViT-B/16
//! forward runs about 1.2× as many images per second as sixteen batch-1 forwards).
//!
//! The batcher is independent of any async runtime: a request carries a `reply` callback,
//! called on the compute thread with its result, so an HTTP layer can wrap a one-shot channel
//! of its own runtime in it.
//!
//! With [`BatcherConfig::wait_for_announced`], a batch waits only for requests that have
//! been [announced](Batcher::announce) (a server announces a request when it starts reading
//! and decoding it): a lone request runs at once instead of waiting `max_wait` for company
//! that is not coming, and under load the batch still gathers everything on its way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{Capture, ViT, Workspace};
use crate::tensor::Tensor;

/// How a [`Batcher`] groups requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Images per forward pass at most (a single larger request still runs, alone).
    pub max_batch: usize,
    /// How long the first request of a batch waits for others.
    pub max_wait: Duration,
    /// Requests waiting at most; more are refused ([`Rejected::QueueFull`]).
    pub max_queue: usize,
    /// Wait (still at most `max_wait`) only while an [announced](Batcher::announce) request
    /// is on its way; false waits `max_wait` for any request.
    pub wait_for_announced: bool,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            max_queue: 256,
            wait_for_announced: false,
        }
    }
}

/// What a request gets back.
#[derive(Clone, Debug)]
pub struct Response {
    /// `(b, K)` logits, or the features `(b, F)` of a model without a classifier.
    pub outputs: Tensor,
    /// `(L, b, nh, N, N)`, when asked for.
    pub attentions: Option<Tensor>,
    /// Images in the forward pass this request ran in.
    pub batch_images: usize,
    /// Time from submission to the start of its forward pass, and the forward pass's.
    pub queued: Duration,
    pub compute: Duration,
}

/// One request: preprocessed images `(b, C, H, W)` of the batcher's model.
pub struct Request {
    pub images: Tensor,
    /// Capture the attention maps.
    pub attention: bool,
    /// Called once with the result, on the compute thread.
    pub reply: Box<dyn FnOnce(Result<Response>) + Send>,
}

/// Why [`Batcher::submit`] refused a request (given back to the caller).
pub enum Rejected {
    /// `max_queue` requests are waiting.
    QueueFull(Request),
    /// The batcher is shutting down.
    Closed(Request),
}

struct Queued {
    req: Request,
    at: Instant,
}

/// A model's compute thread and its queue.
pub struct Batcher {
    tx: Option<SyncSender<Queued>>,
    worker: Option<JoinHandle<()>>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    shape: [usize; 3],
}

/// A request on its way to [`Batcher::submit`] (being received or decoded); dropping it
/// (after submitting, or on failure) ends the announcement.
pub struct Arrival(Arc<AtomicUsize>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the compute thread of `model`.
    pub fn new(model: Arc<ViT>, cfg: BatcherConfig) -> Self {
        let (tx, rx) = sync_channel(cfg.max_queue.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let arriving = Arc::new(AtomicUsize::new(0));
        let c = model.config();
        let shape = [c.channels, c.image_height, c.image_width];
        let (d, a) = (depth.clone(), arriving.clone());
        let worker = std::thread::Builder::new()
            .name("vitrs-batcher".into())
            .spawn(move || run(model, cfg, rx, d, a))
            .ok();
        Batcher {
            tx: Some(tx),
            worker,
            depth,
            arriving,
            shape,
        }
    }

    /// Announces a request that will be submitted soon: a batch being gathered waits for it
    /// (at most `max_wait`) when [`BatcherConfig::wait_for_announced`] is set.
    pub fn announce(&self) -> Arrival {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arrival(self.arriving.clone())
    }

    /// Queues a request, or gives it back when the queue is full or closed. Its images must
    /// be `(b ≥ 1, C, H, W)` of the model (checked here: a wrong shape is answered through
    /// `reply` with the expected shape).
    pub fn submit(&self, req: Request) -> std::result::Result<(), Rejected> {
        let s = req.images.shape();
        if s.len() != 4 || s[0] == 0 || s[1..] != self.shape {
            let (shape, reply) = (s.to_vec(), req.reply);
            reply(Err(Error::ShapeMismatch {
                name: "input images (B, C, H, W)".into(),
                expected: vec![
                    s.first().copied().unwrap_or(1).max(1),
                    self.shape[0],
                    self.shape[1],
                    self.shape[2],
                ],
                got: shape,
            }));
            return Ok(());
        }
        let Some(tx) = &self.tx else {
            return Err(Rejected::Closed(req));
        };
        self.depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(Queued {
            req,
            at: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(q) => Rejected::QueueFull(q.req),
                    TrySendError::Disconnected(q) => Rejected::Closed(q.req),
                })
            }
        }
    }

    /// Requests waiting or running now.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Stops taking requests, runs the ones queued, and waits for the compute thread.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often a batch waiting for announced requests checks that some are still on their way.
const POLL: Duration = Duration::from_micros(200);

/// The compute thread: take a request, gather more until the batch is full or the first has
/// waited `max_wait` (or, with `wait_for_announced`, nothing more is on its way), run them as
/// one forward pass, reply to each.
fn run(
    model: Arc<ViT>,
    cfg: BatcherConfig,
    rx: Receiver<Queued>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
) {
    let mut ws = Workspace::new();
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv() {
                Ok(q) => q,
                Err(_) => return, // closed and drained
            },
        };
        let deadline = first.at + cfg.max_wait;
        let mut images = first.req.images.shape()[0];
        let mut group = vec![first];
        while images < cfg.max_batch {
            // What is queued already joins without waiting; with `wait_for_announced`, nothing
            // on its way means no wait at all.
            let waiting = match rx.try_recv() {
                Ok(q) => Ok(q),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    if cfg.wait_for_announced && arriving.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    let mut wait = deadline.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                    if cfg.wait_for_announced {
                        wait = wait.min(POLL);
                    }
                    rx.recv_timeout(wait)
                }
            };
            match waiting {
                Ok(q) if images + q.req.images.shape()[0] <= cfg.max_batch => {
                    images += q.req.images.shape()[0];
                    group.push(q);
                }
                // Too big to join this batch: it starts the next one.
                Ok(q) => {
                    carry = Some(q);
                    break;
                }
                // Check again: queued, still on its way, or past the deadline.
                Err(RecvTimeoutError::Timeout) if cfg.wait_for_announced => continue,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        forward_group(&model, &mut ws, group, images, &depth);
    }
}

/// Runs `group` (together `images` images) as one forward pass and replies to each request.
/// Each request leaves `depth` just before its reply, so a client that has its answer never
/// sees itself still counted (a metrics scrape right after the reply reads the true depth).
fn forward_group(
    model: &ViT,
    ws: &mut Workspace,
    group: Vec<Queued>,
    images: usize,
    depth: &AtomicUsize,
) {
    let start = Instant::now();
    let cfg = model.config();
    let per_image = cfg.channels * cfg.image_height * cfg.image_width;
    let mut data = Vec::with_capacity(images * per_image);
    for q in &group {
        data.extend_from_slice(q.req.images.data());
    }
    let capture = Capture {
        attentions: group.iter().any(|q| q.req.attention),
        pre_logits: false,
    };
    let result = Tensor::new(
        vec![images, cfg.channels, cfg.image_height, cfg.image_width],
        data,
    )
    .and_then(|x| model.forward(&x, capture, ws));
    let compute = start.elapsed();
    let out = match result {
        Ok(o) => o,
        Err(e) => {
            let msg = e.to_string();
            for q in group {
                depth.fetch_sub(1, Ordering::SeqCst);
                (q.req.reply)(Err(Error::BadInput(format!("the batch failed: {msg}"))));
            }
            return;
        }
    };
    let width = out.logits.shape()[1];
    let mut offset = 0;
    for q in group {
        let b = q.req.images.shape()[0];
        let outputs = Tensor::new(
            vec![b, width],
            out.logits.data()[offset * width..(offset + b) * width].to_vec(),
        );
        let attentions = q
            .req
            .attention
            .then_some(out.attentions.as_ref())
            .flatten()
            .map(|a| slice_images(a, offset, b));
        let reply = q.req.reply;
        depth.fetch_sub(1, Ordering::SeqCst);
        reply(outputs.map(|outputs| Response {
            outputs,
            attentions: attentions.and_then(|a| a.ok()),
            batch_images: images,
            queued: start.saturating_duration_since(q.at),
            compute,
        }));
        offset += b;
    }
}

/// Images `offset..offset + b` of an attention capture `(L, B, nh, N, N)`.
fn slice_images(a: &Tensor, offset: usize, b: usize) -> Result<Tensor> {
    let s = a.shape();
    let plane: usize = s[2..].iter().product();
    let mut data = Vec::with_capacity(s[0] * b * plane);
    for l in 0..s[0] {
        let start = (l * s[1] + offset) * plane;
        data.extend_from_slice(&a.data()[start..start + b * plane]);
    }
    Tensor::new(vec![s[0], b, s[2], s[3], s[4]], data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Sizes, ViTConfig};
    use std::sync::mpsc::channel;

    fn model() -> Arc<ViT> {
        let cfg = ViTConfig::paper(Sizes {
            image: (8, 8),
            channels: 1,
            patch: 4,
            width: 8,
            depth: 1,
            heads: 2,
            mlp: 8,
            classes: 3,
        });
        let mut m = ViT::random(cfg, 1).unwrap();
        // A non-zero head, so the logits depend on the input.
        let mut rng = crate::model::Rng::new(2);
        m.params_mut()
            .flat_mut()
            .iter_mut()
            .for_each(|v| *v += 0.1 * rng.normal() as f32);
        Arc::new(m)
    }

    fn image(seed: usize, b: usize) -> Tensor {
        Tensor::new(
            vec![b, 1, 8, 8],
            (0..b * 64)
                .map(|i| ((i * 7 + seed * 13) % 17) as f32 / 17.0)
                .collect(),
        )
        .unwrap()
    }

    /// Requests submitted together run as one batch and each gets its own rows, equal to
    /// running it alone; attention maps come back for the one that asked.
    #[test]
    fn concurrent_requests_are_batched_and_answered_each() {
        let m = model();
        let cfg = BatcherConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(200),
            max_queue: 16,
            wait_for_announced: false,
        };
        let mut b = Batcher::new(m.clone(), cfg);
        let (tx, rx) = channel();
        for i in 0..3 {
            let tx = tx.clone();
            let req = Request {
                images: image(i, 1 + i % 2),
                attention: i == 1,
                reply: Box::new(move |r| tx.send((i, r)).unwrap()),
            };
            assert!(b.submit(req).is_ok());
        }
        let mut got: Vec<(usize, Response)> = (0..3)
            .map(|_| {
                let (i, r) = rx.recv().unwrap();
                (i, r.unwrap())
            })
            .collect();
        got.sort_by_key(|(i, _)| *i);
        for (i, r) in &got {
            // 1 + 2 + 1 images, all in one forward pass.
            assert_eq!(r.batch_images, 4, "request {i}");
            let alone = m.logits(&image(*i, 1 + i % 2)).unwrap();
            let d = crate::kernels::max_abs_diff(r.outputs.data(), alone.data());
            assert!(d < 1e-5, "request {i}: {d}");
            assert_eq!(r.attentions.is_some(), *i == 1);
        }
        let a = got[1].1.attentions.as_ref().unwrap();
        assert_eq!(a.shape(), &[1, 2, 2, 5, 5]);
        b.close();
    }

    /// A request has left the queue depth by the time its reply runs: the reply below holds
    /// the compute thread until the test has read the depth, so a decrement after the reply
    /// would be seen as 1 every time (the server's metrics were read as 1 after the answer).
    #[test]
    fn an_answered_request_is_no_longer_counted() {
        let mut b = Batcher::new(model(), BatcherConfig::default());
        let (tx, rx) = channel();
        let (go, wait) = channel::<()>();
        let req = Request {
            images: image(0, 1),
            attention: false,
            reply: Box::new(move |r| {
                tx.send(r.is_ok()).unwrap();
                let _ = wait.recv();
            }),
        };
        assert!(b.submit(req).is_ok());
        assert!(rx.recv().unwrap());
        assert_eq!(b.queue_depth(), 0);
        go.send(()).unwrap();
        b.close();
    }

    /// With `wait_for_announced`, a lone request runs at once, and a batch waits for an
    /// announced request until it arrives.
    #[test]
    fn batches_wait_only_for_announced_requests() {
        let cfg = BatcherConfig {
            max_batch: 8,
            max_wait: Duration::from_secs(5),
            max_queue: 16,
            wait_for_announced: true,
        };
        let b = Batcher::new(model(), cfg);
        let (tx, rx) = channel();
        let submit = |i: usize| {
            let tx = tx.clone();
            b.submit(Request {
                images: image(i, 1),
                attention: false,
                reply: Box::new(move |r| tx.send(r.unwrap()).unwrap()),
            })
            .is_ok()
        };
        let t = Instant::now();
        assert!(submit(0));
        let r = rx.recv().unwrap();
        assert_eq!(r.batch_images, 1);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a lone request waited {:?}",
            t.elapsed()
        );

        let on_its_way = b.announce();
        assert!(submit(1));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "the batch did not wait for the announced request"
        );
        assert!(submit(2));
        drop(on_its_way);
        let (r1, r2) = (rx.recv().unwrap(), rx.recv().unwrap());
        assert_eq!((r1.batch_images, r2.batch_images), (2, 2));
    }

    /// A full queue refuses and gives the request back; a wrong shape is answered with the
    /// expected one; closing runs what was queued.
    #[test]
    fn a_full_queue_refuses_and_closing_drains() {
        let cfg = BatcherConfig {
            max_batch: 1,
            max_wait: Duration::from_millis(0),
            max_queue: 1,
            wait_for_announced: false,
        };
        let mut b = Batcher::new(model(), cfg);
        let (tx, rx) = channel();
        let mut refused = 0;
        for i in 0..50 {
            let tx = tx.clone();
            let req = Request {
                images: image(i, 1),
                attention: false,
                reply: Box::new(move |r| tx.send(r.is_ok()).unwrap()),
            };
            if let Err(Rejected::QueueFull(_)) = b.submit(req) {
                refused += 1;
            }
        }
        assert!(refused > 0, "a queue of 1 took 50 requests at once");
        b.close();
        let answered = rx.try_iter().filter(|ok| *ok).count();
        assert_eq!(answered, 50 - refused);
        // Wrong shape: answered at once with what is expected.
        let b = Batcher::new(model(), cfg);
        let (tx, rx) = channel();
        let req = Request {
            images: Tensor::zeros(vec![1, 3, 8, 8]),
            attention: false,
            reply: Box::new(move |r| tx.send(r.err().unwrap().to_string()).unwrap()),
        };
        assert!(b.submit(req).is_ok());
        let e = rx.recv().unwrap();
        assert!(
            e.contains("[1, 1, 8, 8]") && e.contains("[1, 3, 8, 8]"),
            "{e}"
        );
    }
}
