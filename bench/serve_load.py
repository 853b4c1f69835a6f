#!/usr/bin/env python3
"""Load on `vit serve`, and on the same model behind a typical Python service.

For each model (ViT-B/16 with random weights, and the bundled demo model) and each
concurrency (1, 8, 32), a fixed number of requests (each client thread keeps one HTTP/1.1
connection and posts the same image again and again) measure throughput and p50/p99
latency of `POST /v1/models/{name}/predict`, with batching on (`--max-batch 16`) and off
(`--max-batch 1`). Beside it, the same weights in PyTorch behind FastAPI + uvicorn (one
worker, `torch.inference_mode`, timm preprocessing from the image bytes), measured the same
way, and `vit bench --batch-size 16` (run before and after each concurrency level) for the
ceiling. Everything on 127.0.0.1, one server at a time, the load generator in this process.

Usage (repository root, after `cargo build --release`; needs torch, timm, safetensors,
pillow, fastapi, uvicorn — see tools/requirements.txt):
    python bench/serve_load.py [--models b16,demo] [--concurrency 1,8,32] [--requests 128]
                               [--threads 2] [--json FILE] [--write docs/perf.md]

`--soak N` instead sends N mixed requests (valid images, bad inputs, oversized bodies,
clients hanging up mid-upload) at concurrency 32 to one server and checks every valid
answer, that the process is alive afterwards, and its resident memory against the start.
"""
import argparse
import http.client
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, seconds=300):
    t = time.time()
    while time.time() - t < seconds:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not start listening")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_b16(tmp):
    """A random-weight timm ViT-B/16 (seed 0) saved as a timm checkpoint folder."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000).eval()
    d = os.path.join(tmp, "b16")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(d, "model.safetensors"))
    cfg = {"architecture": "vit_base_patch16_224", "num_classes": 1000,
           "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic",
                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9}}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


def test_image(size):
    """A smooth 3-channel JPEG (a gradient with shapes; what matters is decoding cost)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, 128)
    d = ImageDraw.Draw(img)
    d.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(200, 40, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_vit(vit, models, threads, max_batch, port):
    args = [vit, "--threads", str(threads), "serve", "--port", str(port), "--max-batch", str(max_batch)]
    for name, path in models:
        args += ["--model", f"{name}={path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc


PY_SERVICE = r'''
import io, json, os, sys, time
import torch, timm
from PIL import Image
from fastapi import FastAPI, Request, Response
from safetensors.torch import load_file
import uvicorn

torch.set_num_threads(int(os.environ["THREADS"]))
folder, port = sys.argv[1], int(sys.argv[2])
cfg = json.load(open(os.path.join(folder, "config.json")))
args = dict(cfg.get("model_args", {}), num_classes=cfg["num_classes"])
m = timm.create_model(cfg["architecture"], pretrained=False, **args).eval()
m.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
data_cfg = timm.data.resolve_data_config({}, model=m)
data_cfg.update({k: v for k, v in cfg.get("pretrained_cfg", {}).items() if k in data_cfg})
transform = timm.data.create_transform(**data_cfg)
mode = "L" if data_cfg["input_size"][0] == 1 else "RGB"
labels = cfg.get("label_names") or [f"class_{i}" for i in range(cfg["num_classes"])]
app = FastAPI()

@app.post("/v1/models/{name}/predict")
async def predict(name: str, request: Request, top_k: int = 5):
    t = time.perf_counter()
    body = await request.body()
    try:
        img = Image.open(io.BytesIO(body)).convert(mode)
    except Exception as e:
        return Response(json.dumps({"error": str(e)}), status_code=415, media_type="application/json")
    x = transform(img).unsqueeze(0)
    with torch.inference_mode():
        p = m(x).softmax(-1)[0]
    v, i = p.topk(min(top_k, p.numel()))
    top = [{"index": int(j), "label": labels[int(j)], "prob": float(q)} for q, j in zip(v, i)]
    return {"model": name, "top": top, "ms": (time.perf_counter() - t) * 1e3}

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", workers=1)
'''


def start_python(folder, threads, port, tmp):
    script = os.path.join(tmp, "py_service.py")
    open(script, "w").write(PY_SERVICE)
    env = dict(os.environ, THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, script, folder, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(port, path, body, concurrency, requests, seconds):
    """`requests` POSTs from `concurrency` clients, each on its own keep-alive connection,
    sending the next request as soon as the last is answered (stopping early after
    `seconds`). The first and the last `concurrency` answers are the ramp-up and the
    ramp-down of the closed loop (a lone first request, a last partial batch), so throughput
    is counted between them: answers after the `concurrency`-th and up to the
    `requests - concurrency`-th, over the time between those two; latencies are those of the
    requests sent and answered in that window. Returns (req/s, p50 s, p99 s, errors)."""
    done, errors = [], []  # (sent, answered) per successful request
    lock = threading.Lock()
    left = [requests]
    deadline = time.time() + seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if left[0] == 0 or time.time() > deadline:
                    break
                left[0] -= 1
            t = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/octet-stream"})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200 and b'"top"' in data
            except (OSError, http.client.HTTPException) as e:
                ok, data = False, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t1 = time.perf_counter()
            with lock:
                (done if ok else errors).append((t, t1) if ok else data[:200])
        conn.close()

    # Warm-up: one request (first-touch allocations, lazy initialisation).
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", path, body, {"Content-Type": "application/octet-stream"})
    c.getresponse().read()
    c.close()
    ts = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ends = sorted(t1 for _, t1 in done)
    if len(ends) < 2 * concurrency + 1:
        return float("nan"), float("nan"), float("nan"), errors + [b"too few answers for a window"]
    a, b = ends[concurrency - 1], ends[len(ends) - concurrency - 1]
    counted = sum(1 for e in ends if a < e <= b)
    lat = sorted(t1 - t0 for t0, t1 in done if t0 >= a and t1 <= b) or sorted(t1 - t0 for t0, t1 in done)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    return counted / (b - a), q(0.5), q(0.99), errors


def vit_bench(vit, model, threads):
    out = subprocess.run([vit, "bench", "--model", model, "--batch-size", "16", "--threads", str(threads),
                          "--iters", "3", "--warmup", "1", "--json"], check=True, capture_output=True,
                         text=True).stdout
    return 16 / json.loads(out)["median_batch_seconds"]


def write_section(path, text):
    begin, end = "<!-- serve_load.py:begin -->", "<!-- serve_load.py:end -->"
    doc = open(path).read()
    if begin not in doc or end not in doc:
        sys.exit(f"{path} has no {begin} ... {end} section")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(path, "w").write(f"{head}{begin}\n{text}{end}{tail}")


def soak(vit, folder, n, threads, tmp):
    """N mixed requests at concurrency 32: valid images (answers checked against the first
    answer), bad inputs (415/400), oversized bodies (413), uploads abandoned midway."""
    port = free_port()
    proc = start_vit(vit, [("demo", folder)], threads, 16, port)
    args_body_limit = 20 << 20
    bad_dir = os.path.join(ROOT, "tests", "bad_inputs")
    bad = [open(os.path.join(bad_dir, f), "rb").read() for f in
           ("img_zero_bytes.png", "img_truncated.png", "img_truncated.jpg", "img_not_an_image.jpg",
            "img_gif_bomb.gif", "img_huge_header.png")]
    images = sorted(os.listdir(os.path.join(ROOT, "assets", "demo", "images")))
    valid = [open(os.path.join(ROOT, "assets", "demo", "images", f), "rb").read() for f in images]
    path = "/v1/models/demo/predict"

    def once(body):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            c.request("POST", path, body, {"Content-Type": "application/octet-stream"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    want = {}
    for i, b in enumerate(valid):
        st, data = once(b)
        assert st == 200, data
        want[i] = json.loads(data)["top"][0]["index"]
    counts = {"valid": 0, "bad": 0, "oversized": 0, "abandoned": 0}
    failures = []
    lock = threading.Lock()
    rng = random.Random(0)
    state = {}

    def worker():
        while True:
            with lock:
                nxt = next(state["it"], None)
            if nxt is None:
                return
            k, kind = nxt
            try:
                if kind == "valid":
                    i = k % len(valid)
                    st, data = once(valid[i])
                    ok = st == 200 and json.loads(data)["top"][0]["index"] == want[i]
                elif kind == "bad":
                    st, data = once(bad[k % len(bad)])
                    ok = st in (400, 415) and (b"cannot decode image" in data or b"limit" in data)
                elif kind == "oversized":
                    # Announced length over the limit: answered 413 without reading it all.
                    s = socket.create_connection(("127.0.0.1", port), timeout=60)
                    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {args_body_limit + 1}\r\n"
                              "Connection: close\r\n\r\n".encode() + b"\0" * 65536)
                    st = int(s.recv(64).split(b" ")[1])
                    s.close()
                    ok = st == 413
                else:
                    s = socket.create_connection(("127.0.0.1", port), timeout=60)
                    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n".encode()
                              + valid[0][:100])
                    s.close()
                    ok = True
            except Exception as e:  # noqa: BLE001 - every failure is reported
                ok, kind = False, f"{kind}: {e!r}"
            with lock:
                counts[kind.split(":")[0]] = counts.get(kind.split(":")[0], 0) + 1
                if not ok:
                    failures.append(f"request {k} ({kind})")

    def mixed(count):
        plan = [rng.choice(["valid"] * 6 + ["bad"] * 2 + ["oversized", "abandoned"]) for _ in range(count)]
        state["it"] = iter(enumerate(plan))
        ts = [threading.Thread(target=worker) for _ in range(32)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()

    # Warm up with the same mix at the same concurrency (threads, connection buffers and the
    # allocator's arenas reach their working size), then take the baseline.
    warm = max(200, n // 20)
    mixed(warm)
    time.sleep(1)
    rss0 = rss_kib(proc.pid)
    failures.clear()
    for k in counts:
        counts[k] = 0
    t = time.time()
    mixed(n)
    took = time.time() - t
    time.sleep(1)
    alive = proc.poll() is None
    rss1 = rss_kib(proc.pid) if alive else 0
    stop(proc)
    growth = (rss1 - rss0) / rss0
    print(f"soak: {n} requests in {took:.0f} s at concurrency 32 (after {warm} to warm up): {counts}")
    print(f"  failures: {len(failures)}{' ' + '; '.join(failures[:5]) if failures else ''}")
    print(f"  process alive afterwards: {alive}; RSS {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB "
          f"({100 * growth:+.1f} %)")
    return not failures and alive and abs(growth) <= 0.10


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit", default=os.path.join(ROOT, "target", "release", "vit"))
    ap.add_argument("--models", default="b16,demo")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=128, help="requests per measurement (at least 4 per client)")
    ap.add_argument("--seconds", type=float, default=150, help="stop a measurement after this long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-python", action="store_true", help="skip the FastAPI + PyTorch service")
    ap.add_argument("--json")
    ap.add_argument("--write", help="put the table into this Markdown file between the serve_load.py markers")
    ap.add_argument("--soak", type=int, help="run a soak of this many mixed requests instead")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vitrs-serve-load-")
    demo = os.path.join(ROOT, "assets", "demo", "model")
    if a.soak:
        sys.exit(0 if soak(a.vit, demo, a.soak, a.threads, tmp) else 1)

    conc = [int(c) for c in a.concurrency.split(",")]
    rows, raw, summary = [], [], []
    for key in a.models.split(","):
        if key == "b16":
            name, folder, body = "ViT-B/16", make_b16(tmp), test_image(224)
        elif key == "demo":
            name, folder = "demo (Fashion-MNIST)", demo
            body = open(os.path.join(ROOT, "assets", "demo", "images", "00_ankle-boot.png"), "rb").read()
        else:
            sys.exit(f"unknown model {key}: b16 or demo")
        servers = [("vitrs, batching", lambda p: start_vit(a.vit, [("m", folder)], a.threads, 16, p)),
                   ("vitrs, no batching", lambda p: start_vit(a.vit, [("m", folder)], a.threads, 1, p))]
        if not a.no_python:
            servers.append(("FastAPI + PyTorch", lambda p: start_python(folder, a.threads, p, tmp)))
        # The machine's speed drifts: each concurrency level measures its own ceiling, the
        # mean of a `vit bench` run just before and just after its servers.
        ceiling = vit_bench(a.vit, folder, a.threads)
        print(f"{name}: vit bench --batch-size 16: {ceiling:.2f} img/s", flush=True)
        for c in conc:
            level = []
            for label, start in servers:
                port = free_port()
                proc = start(port)
                n = max(a.requests, 4 * c)
                tput, p50, p99, errs = load(port, "/v1/models/m/predict", body, c, n, a.seconds)
                stop(proc)
                if errs:
                    print(f"  {len(errs)} errors, e.g. {errs[0]!r}", flush=True)
                print(f"  {label:20s} c={c:<3d} {tput:7.2f} req/s  p50 {1e3 * p50:8.1f} ms  "
                      f"p99 {1e3 * p99:8.1f} ms", flush=True)
                level.append((label, tput, p50, p99, len(errs)))
            after = vit_bench(a.vit, folder, a.threads)
            print(f"{name}: vit bench --batch-size 16: {after:.2f} img/s", flush=True)
            ceil_c, ceiling = (ceiling + after) / 2, after
            for label, tput, p50, p99, nerr in level:
                row = (name, label, c, tput, p50, p99, tput / ceil_c)
                rows.append(row)
                raw.append(dict(zip(["model", "server", "concurrency", "req_per_s", "p50_s", "p99_s",
                                     "vs_bench_b16"], row)) | {"errors": nerr, "bench_b16_img_per_s": ceil_c})
            by = {label: (tput, p99) for label, tput, _, p99, _ in level}
            if "FastAPI + PyTorch" in by:
                (vt, vp), (pt, pp) = by["vitrs, batching"], by["FastAPI + PyTorch"]
                summary.append(f"{name}, concurrency {c}: vitrs with batching serves {vt / ceil_c:.2f} x "
                               f"`vit bench --batch-size 16` ({ceil_c:.2f} img/s) and {vt / pt:.2f} x FastAPI + "
                               f"PyTorch, at a p99 of {1e3 * vp:.0f} ms against {1e3 * pp:.0f} ms.")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [f"CPU: {cpu}; threads: {a.threads}; {time.strftime('%Y-%m-%d')}; "
             f"`bench/serve_load.py --requests {a.requests}`\n", "",
             "| model | server | concurrency | requests/s | p50 ms | p99 ms | × `vit bench` b16 |",
             "|---|---|---|---|---|---|---|"]
    for name, label, c, tput, p50, p99, rel in rows:
        lines.append(f"| {name} | {label} | {c} | {tput:.2f} | {1e3 * p50:.0f} | {1e3 * p99:.0f} | {rel:.2f} |")
    if summary:
        lines += [""] + [f"- {x}" for x in summary]
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if a.json:
        json.dump(raw, open(a.json, "w"), indent=1)
    if a.write:
        write_section(a.write, table)


if __name__ == "__main__":
    main()
