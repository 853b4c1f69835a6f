//! `vit serve` end to end: a real server process on 127.0.0.1, spoken to over raw HTTP/1.1.
//! The API answers what `vit predict` answers, bad input never hurts the server, batching
//! groups concurrent requests, `/metrics` counts them, SIGTERM drains and exits, and the web
//! page works in a real (headless) Chromium.

#![cfg(feature = "serve")]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_model() -> PathBuf {
    root().join("assets/demo/model")
}

/// A `vit serve` process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `vit serve ARGS --port 0` and waits for the address it listens on.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
            .args(["--threads", "2", "serve", "--port", "0"])
            .args(args)
            .current_dir(workdir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vit serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.strip_prefix("listening on http://") {
                addr = Some(rest.split('/').next().unwrap().parse().unwrap());
                break;
            }
        }
        let Some(addr) = addr else {
            panic!("vit serve did not start:\n{}", log.lock().unwrap());
        };
        // Keep reading its log so it never blocks on a full pipe.
        let l = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status, lower-cased headers, body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), the whole response read back.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before the body is all sent, and close: that is allowed.
    let _ = s.write_all(body);
    parse_reply(&read_response(&mut s))
}

/// Reads one response: up to its Content-Length, or its last chunk, or the connection's end
/// (some servers, chromedriver among them, keep the connection open despite `close`).
fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = vec![];
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let body = &raw[end + 4..];
            let complete = match length {
                Some(n) => body.len() >= n,
                None => head.contains("chunked") && body.ends_with(b"0\r\n\r\n"),
            };
            if complete {
                return raw;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return raw,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read the response: {e} (after {} bytes)", raw.len()),
        }
    }
}

fn parse_reply(raw: &[u8]) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 4 + size..];
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[], &[])
}

fn post_image(addr: SocketAddr, path: &str, bytes: &[u8]) -> Reply {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/octet-stream")],
        bytes,
    )
}

/// `{"inputs": [FP32 (B, C, H, W)]}` for `/v2/.../infer`.
fn infer_body(shape: &[usize], data: &[f32]) -> Vec<u8> {
    serde_json::to_vec(&json!({"inputs": [{"name": "pixel_values", "shape": shape, "datatype": "FP32", "data": data}]}))
        .unwrap()
}

/// What `vit predict --json --logits` prints for each image: (top-1 label, logits).
fn vit_predict(model: &Path, images: &[&Path]) -> Vec<(String, Vec<f32>)> {
    let mut args = vec!["predict", "--model", s(model), "--json", "--logits"];
    args.extend(images.iter().map(|p| s(p)));
    let o = vit(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let logits = v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (v["top"][0]["label"].as_str().unwrap().to_string(), logits)
        })
        .collect()
}

fn demo_image(name: &str) -> PathBuf {
    root().join("assets/demo/images").join(name)
}

#[test]
fn the_api_answers_what_vit_predict_answers() {
    let srv = Server::start(&["--model", &format!("demo={}", s(&demo_model()))]);
    let a = srv.addr;
    assert_eq!(get(a, "/v2/health/live").json()["live"], true);
    assert_eq!(get(a, "/v2/health/ready").json()["ready"], true);
    let models = get(a, "/v1/models").json();
    assert_eq!(models["models"][0]["name"], "demo");
    assert_eq!(models["models"][0]["labels"][9], "Ankle boot");
    let meta = get(a, "/v2/models/demo").json();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 1, 28, 28]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 10]));

    let images = [demo_image("00_ankle-boot.png"), demo_image("03_shirt.png")];
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let want = vit_predict(&demo_model(), &refs);

    // /v1/.../predict: the raw bytes, and the same image as multipart/form-data.
    for (img, (label, logits)) in images.iter().zip(&want) {
        let bytes = std::fs::read(img).unwrap();
        let r = post_image(a, "/v1/models/demo/predict?top_k=3", &bytes);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["model"], "demo");
        assert_eq!(v["top"].as_array().unwrap().len(), 3);
        assert_eq!(v["top"][0]["label"].as_str().unwrap(), label);
        let argmax = (0..logits.len())
            .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
            .unwrap();
        assert_eq!(v["top"][0]["index"], argmax);
        assert!(v["ms"].as_f64().unwrap() > 0.0);

        let boundary = "vitrsBoundary7d1f";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ct = format!("multipart/form-data; boundary={boundary}");
        let m = http(
            a,
            "POST",
            "/v1/models/demo/predict",
            &[("Content-Type", &ct)],
            &body,
        );
        assert_eq!(m.status, 200, "{}", m.text());
        // top_k defaults to 5.
        let mut top = m.json()["top"].as_array().unwrap().clone();
        assert_eq!(top.len(), 5);
        top.truncate(3);
        assert_eq!(json!(top), v["top"]);
    }

    // /v2/.../infer: the preprocessed tensors, both in one request, logits within 1e-5.
    let pre = vitrs::load(&demo_model()).unwrap().preprocess;
    let mut data = vec![];
    for img in &images {
        data.extend_from_slice(pre.load(img).unwrap().data());
    }
    let r = http(
        a,
        "POST",
        "/v2/models/demo/infer",
        &[("Content-Type", "application/json")],
        &infer_body(&[2, 1, 28, 28], &data),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["outputs"][0]["name"], "logits");
    assert_eq!(v["outputs"][0]["shape"], json!([2, 10]));
    let got: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let expect: Vec<f32> = want.iter().flat_map(|(_, l)| l.clone()).collect();
    assert_eq!(got.len(), expect.len());
    let worst = got
        .iter()
        .zip(&expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-5,
        "/infer logits differ from vit predict's by {worst}"
    );

    // The attention map: grid values and a PNG overlay.
    let bytes = std::fs::read(&images[0]).unwrap();
    for method in ["rollout", "mean"] {
        let r = post_image(
            a,
            &format!("/v1/models/demo/predict?attention={method}"),
            &bytes,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let att = &r.json()["attention"];
        assert_eq!(att["method"], method);
        assert_eq!(att["grid"], json!([7, 7]));
        assert_eq!(att["values"].as_array().unwrap().len(), 7);
        let png = att["overlay_png"].as_str().unwrap();
        assert!(
            png.starts_with("iVBORw0KGgo"),
            "not a base64 PNG: {}",
            &png[..20.min(png.len())]
        );
    }

    // The page is served from the binary.
    let page = get(a, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/html"));
    assert!(page.text().contains("<input id=\"file\" type=\"file\""));
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let srv = Server::start(&[
        "--model",
        &format!("demo={}", s(&demo_model())),
        "--max-body",
        "200000",
    ]);
    let a = srv.addr;
    // Every image of the bad-input corpus: the status and the message `vit predict` gives.
    let corpus = root().join("tests/bad_inputs");
    let table = std::fs::read_to_string(corpus.join("cases.tsv")).unwrap();
    let mut failures = vec![];
    let mut n = 0;
    for line in table.lines().filter(|l| l.contains("\timg_")) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [name, rel, _args, exit, expect] = cols[..] else {
            panic!("bad row: {line}");
        };
        let bytes = std::fs::read(corpus.join(rel)).unwrap();
        let r = post_image(a, "/v1/models/demo/predict", &bytes);
        let text = r.text();
        let ok = match exit {
            "0" => r.status == 200 && text.contains(expect),
            _ => {
                let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
                (r.status == 415 || r.status == 400) && msg.contains(expect)
            }
        };
        if !ok {
            failures.push(format!("{name}: {} {text}", r.status));
        }
        n += 1;
    }
    assert!(n >= 10, "only {n} image cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let not_image = post_image(a, "/v1/models/demo/predict", b"%PDF-1.4 not an image");
    assert_eq!(not_image.status, 415);
    let big = vec![0u8; 300_000];
    let r = post_image(a, "/v1/models/demo/predict", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    // A body announced too large is refused before it is sent.
    {
        let mut c = TcpStream::connect(a).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"POST /v1/models/demo/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nabc")
            .unwrap();
        let r = parse_reply(&read_response(&mut c));
        assert_eq!(r.status, 413);
        assert!(
            r.json()["error"].as_str().unwrap().contains("--max-body"),
            "{}",
            r.text()
        );
    }
    let r = post_image(a, "/v1/models/nope/predict", b"x");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("demo"));
    let r = post_image(a, "/v1/models/demo/predict?attention=sideways", b"x");
    assert_eq!(r.status, 400);
    let r = http(
        a,
        "POST",
        "/v2/models/demo/infer",
        &[],
        &infer_body(&[1, 3, 28, 28], &vec![0.0; 3 * 28 * 28]),
    );
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("[B, 1, 28, 28]"), "{msg}");
    let r = http(
        a,
        "POST",
        "/v2/models/demo/infer",
        &[],
        &infer_body(&[1, 1, 28, 28], &[0.0; 5]),
    );
    assert_eq!(r.status, 400);
    let r = http(a, "POST", "/v2/models/demo/infer", &[], b"{not json");
    assert_eq!(r.status, 400);
    assert_eq!(get(a, "/no/such/page").status, 404);

    // A client that hangs up mid-upload costs the server nothing.
    {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(b"POST /v1/models/demo/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n\x89PNG")
            .unwrap();
    }

    // Still serving, correctly.
    let bytes = std::fs::read(demo_image("05_sandal.png")).unwrap();
    let r = post_image(a, "/v1/models/demo/predict", &bytes);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["top"][0]["label"], "Sandal");
    assert!(!srv.log().contains("panicked"), "{}", srv.log());

    // The metrics saw all of it.
    let m = get(a, "/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4"));
    let m = m.text();
    for want in [
        "vitrs_requests_total{endpoint=\"/v1/models/{name}/predict\",status=\"200\"}",
        "vitrs_requests_total{endpoint=\"/v1/models/{name}/predict\",status=\"415\"}",
        "vitrs_requests_total{endpoint=\"/v1/models/{name}/predict\",status=\"413\"}",
        "vitrs_request_duration_seconds_bucket",
        "vitrs_batch_images_bucket",
        "vitrs_queue_depth{model=\"demo\"} 0",
    ] {
        assert!(m.contains(want), "no `{want}` in\n{m}");
    }
}

#[test]
fn a_full_queue_is_answered_503_with_retry_after() {
    // One request computing and one waiting at most; twelve large ones at once.
    let srv = Server::start(&[
        "--model",
        &format!("demo={}", s(&demo_model())),
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--max-wait-ms",
        "0",
    ]);
    let a = srv.addr;
    let n = 256;
    let body = std::sync::Arc::new(infer_body(&[n, 1, 28, 28], &vec![0.25; n * 28 * 28]));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(12));
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (b, body) = (barrier.clone(), body.clone());
            std::thread::spawn(move || {
                b.wait();
                http(a, "POST", "/v2/models/demo/infer", &[], &body)
            })
        })
        .collect();
    let replies: Vec<Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert!(
        !busy.is_empty(),
        "twelve {n}-image requests never filled a queue of one"
    );
    assert!(ok >= 1, "nothing was served");
    assert_eq!(
        ok + busy.len(),
        replies.len(),
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in busy {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("queue is full"));
    }
    // And once the rush is over it serves again.
    let r = http(
        a,
        "POST",
        "/v2/models/demo/infer",
        &[],
        &infer_body(&[1, 1, 28, 28], &[0.25; 784]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn concurrent_requests_share_forward_passes_and_sigterm_drains() {
    let mut srv = Server::start(&[
        "--model",
        s(&demo_model()),
        "--max-batch",
        "8",
        "--max-wait-ms",
        "300",
    ]);
    let a = srv.addr;
    let names = [
        "00_ankle-boot.png",
        "01_pullover.png",
        "02_trouser.png",
        "03_shirt.png",
        "04_coat.png",
        "05_sandal.png",
        "06_sneaker.png",
        "07_dress.png",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| demo_image(n)).collect();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let want = vit_predict(&demo_model(), &refs);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(names.len()));
    let handles: Vec<_> = paths
        .iter()
        .cloned()
        .map(|p| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let bytes = std::fs::read(p).unwrap();
                b.wait();
                post_image(a, "/v1/models/model/predict", &bytes).json()
            })
        })
        .collect();
    let got: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (g, (label, _)) in got.iter().zip(&want) {
        assert_eq!(g["top"][0]["label"].as_str(), Some(label.as_str()), "{g}");
    }
    let largest = got
        .iter()
        .map(|g| g["batch"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        largest > 1,
        "8 requests within 300 ms never shared a forward pass: {got:?}"
    );

    // SIGTERM while a request is in flight: it is answered, then the process exits 0.
    let bytes = std::fs::read(&paths[0]).unwrap();
    let inflight = std::thread::spawn(move || post_image(a, "/v1/models/model/predict", &bytes));
    std::thread::sleep(Duration::from_millis(100));
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "still running after SIGTERM:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit {status:?}:\n{}", srv.log());
    assert!(srv.log().contains("shutting down"), "{}", srv.log());
}

// ---- the web page in a real browser -------------------------------------------------------

/// Chromium and its WebDriver, when installed (Debian: `chromium chromium-driver`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(n))
                    .find(|f| f.is_file())
            })
        })
    };
    Some((
        find(&["chromium", "chromium-browser", "google-chrome"])?,
        find(&["chromedriver"])?,
    ))
}

/// A WebDriver session over raw HTTP (W3C WebDriver, JSON).
struct WebDriver {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl WebDriver {
    fn start(chromium: &Path, chromedriver: &Path) -> WebDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut wd = WebDriver {
            driver,
            addr,
            session: String::new(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"],
            },
        }}});
        let v = wd.call("POST", "/session", Some(caps));
        wd.session = v["sessionId"].as_str().expect("a session id").to_string();
        wd
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = http(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": js, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Polls `js` until it returns something truthy.
    fn wait_for(&self, js: &str, what: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.script(js);
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                &[],
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = vec![];
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= (val(c) as u32) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn the_web_page_classifies_an_upload_in_chromium() {
    let Some((chromium, chromedriver)) = browser() else {
        assert!(
            std::env::var_os("VITRS_REQUIRE_BROWSER").is_none(),
            "VITRS_REQUIRE_BROWSER is set but chromium / chromedriver are not installed \
             (apt-get install -y chromium chromium-driver)"
        );
        eprintln!(
            "skipped: no chromium + chromedriver (apt-get install -y chromium chromium-driver)"
        );
        return;
    };
    let srv = Server::start(&[
        "--model",
        &format!("fashion-demo={}", s(&demo_model())),
        "--model",
        &format!("second={}", s(&demo_model())),
    ]);
    let image = demo_image("00_ankle-boot.png");
    let wd = WebDriver::start(&chromium, &chromedriver);
    wd.call(
        "POST",
        &wd.s("/url"),
        Some(json!({"url": format!("http://{}/", srv.addr)})),
    );
    // Both models are offered; the page says it is ready.
    wd.wait_for(
        "return document.getElementById('status').textContent === 'Ready.'",
        "the model list",
    );
    let options =
        wd.script("return [...document.querySelectorAll('#model option')].map(o => o.value)");
    assert_eq!(options, json!(["fashion-demo", "second"]));
    // No empty result panel before an image is chosen.
    let shown = wd.script("return getComputedStyle(document.getElementById('result')).display");
    assert_eq!(shown, json!("none"));

    // Keyboard: Tab goes to the model list, the attention choice, then the file picker.
    let focused = wd.script("document.activeElement.blur(); return document.activeElement.tagName");
    assert_eq!(focused, json!("BODY"));
    let mut order = vec![];
    for _ in 0..3 {
        wd.call(
            "POST",
            &wd.s("/actions"),
            Some(json!({"actions": [{"type": "key", "id": "kb", "actions": [
            {"type": "keyDown", "value": "\u{E004}"}, {"type": "keyUp", "value": "\u{E004}"}]}]})),
        );
        order.push(wd.script("const e = document.activeElement; return e.id || e.name"));
    }
    assert_eq!(json!(order), json!(["model", "method", "file"]));

    // Upload the bundled Fashion-MNIST image through the file input.
    let input = wd.find("#file");
    wd.call(
        "POST",
        &wd.s(&format!("/element/{input}/value")),
        Some(json!({"text": s(&image.canonicalize().unwrap())})),
    );
    let top1 = wd.wait_for(
        "return document.getElementById('result').dataset.top1",
        "the result",
    );
    assert_eq!(top1, json!("Ankle boot"));
    let bars = wd.script("return document.querySelectorAll('#top li').length");
    assert_eq!(bars, json!(5));
    // The overlay was drawn: a decoded PNG of the image's size or larger.
    let drawn = wd.wait_for(
        "const o = document.getElementById('overlay'); return o.complete && o.naturalWidth >= 28 && o.dataset.method",
        "the overlay",
    );
    assert_eq!(drawn, json!("rollout"));

    // Switching the map redraws it with the last layer's heads averaged.
    let mean = wd.find("input[value=mean]");
    wd.call(
        "POST",
        &wd.s(&format!("/element/{mean}/click")),
        Some(json!({})),
    );
    wd.wait_for(
        "return document.getElementById('overlay').dataset.method === 'mean'",
        "the head-averaged map",
    );
    wd.call(
        "POST",
        &wd.s(&format!(
            "/element/{}/click",
            wd.find("input[value=rollout]")
        )),
        Some(json!({})),
    );
    wd.wait_for(
        "const o = document.getElementById('overlay'); return o.dataset.method === 'rollout' && o.complete",
        "the rollout map again",
    );

    let shot = base64_decode(wd.call("GET", &wd.s("/screenshot"), None).as_str().unwrap());
    assert!(shot.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let out = match std::env::var_os("VITRS_SCREENSHOT") {
        Some(p) => PathBuf::from(p),
        None => tmp("browser").join("serve.png"),
    };
    std::fs::write(&out, &shot).unwrap();
    eprintln!("screenshot: {}", out.display());
}
