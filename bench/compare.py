#!/usr/bin/env python3
"""Side-by-side inference speed: vitrs (`vit bench`) vs PyTorch eager (timm,
`torch.inference_mode`) and ONNX Runtime (the same timm model exported to ONNX,
`intra_op_num_threads` = threads), same machine, same thread count, fp32, random weights,
interleaved (each repetition runs every row once, vit then torch then ort), medians.

Usage (from the repository root, after `cargo build --release`):
    python bench/compare.py [--threads 2] [--reps 5] [--models Ti/16,S/16,B/16] [--batches 1,16]
                            [--peers torch,ort] [--write docs/perf.md] [--json FILE]
Held to AVX2 on an AVX-512 CPU (`VITRS_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`), the peers default to PyTorch alone:
ONNX Runtime has no switch that holds it.
`bench/compare.sh` makes a virtual environment with the pinned packages and runs this.
Each vitrs repetition also reads the FMA peak of the instruction set it runs (`vit bench
--peak`, half a second in the same process), so the table gives vitrs' share of the peak the
host offered at that moment and whether the row meets the speed issue's bar.
Prints a Markdown table; `--write FILE` also puts it into FILE between the lines
`<!-- compare.py:begin -->` and `<!-- compare.py:end -->`; `--json FILE` saves the raw timings.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

TIMM = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224", "B": "vit_base_patch16_224"}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vit_once(vit, model, batch, threads):
    """One vit process: one warm-up forward, one timed, and the FMA peak of the instruction set
    it ran read in the same process (`--peak`); returns (seconds per batch, GFLOP/s of that
    forward, the peak's GFLOP/s, the instruction set)."""
    out = json.loads(subprocess.run(
        [vit, "bench", "--model", model, "--batch-size", str(batch), "--threads", str(threads),
         "--iters", "1", "--warmup", "1", "--json", "--peak"],
        check=True, capture_output=True, text=True,
    ).stdout)
    return (out["median_batch_seconds"], out["gflops_per_sec"], out["peak_gflops_per_sec"],
            out["kernels"])


BAR = ("Bar met: at least min(1.3 × the best peer, 85 % of the FMA peak) and never under 1.0 ×"
       " (the speed issue's); the % is the median repetition's GFLOP/s over the median of the"
       " peaks read beside them (\"?\": under 1.3 × with no peak to judge by, on the portable"
       " kernels).")


def efficiency(gflops, peaks):
    """vitrs' share of the FMA peak: the median repetition's GFLOP/s over the median of the peaks
    read beside them (the host's speed moves over minutes, and both readings move with it);
    None when no peak was read (the portable rung has none)."""
    if not peaks or None in peaks:
        return None
    return statistics.median(gflops) / statistics.median(peaks)


def verdict(ratio, efficiency):
    """The speed issue's bar for a row: at least min(1.3 × the best peer, 85 % of the FMA peak),
    and never under 1.0 × the best peer ("?" when it hangs on an unknown peak)."""
    if ratio >= 1.0 and (ratio >= 1.3 or (efficiency or 0) >= 0.85):
        return "yes"
    return "?" if efficiency is None and ratio >= 1.0 else "**no**"


def peak_range(peaks):
    """The lowest and highest peak read, as text."""
    known = [p for p in peaks if p is not None]
    return f"{min(known):.1f}–{max(known):.1f} GFLOP/s" if known else "none (portable kernels)"


def percent(efficiency):
    return "—" if efficiency is None else f"{100 * efficiency:.0f} %"


def ort_session(tm, batch, threads, tmp, name):
    """Exports `tm` to ONNX (batch dimension dynamic) and opens it in ONNX Runtime with
    `threads` intra-op threads; checks its logits against PyTorch's."""
    import numpy as np
    import onnxruntime as ort
    import torch

    path = os.path.join(tmp, name.replace("/", "_") + ".onnx")
    if not os.path.exists(path):
        x = torch.randn(2, 3, 224, 224)
        torch.onnx.export(tm, (x,), path, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        want = tm(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > 1e-3:
        sys.exit(f"ONNX Runtime's {name} disagrees with PyTorch's by {diff}: export broken")
    return sess


def write_section(path, text):
    """Replaces the text between the compare.py markers in `path`."""
    begin, end = "<!-- compare.py:begin -->", "<!-- compare.py:end -->"
    doc = open(path).read()
    if begin not in doc or end not in doc:
        sys.exit(f"{path} has no `{begin}` ... `{end}` section to write the table into")
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + end + tail)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="Ti/16,S/16,B/16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--peers", help="comma-separated: torch, ort (default both; torch alone "
                    "where VITRS_KERNELS holds vitrs below the CPU's top rung)")
    ap.add_argument("--write", help="Markdown file to put the table into (between markers)")
    ap.add_argument("--json")
    a = ap.parse_args()
    # Held to a lower rung (`VITRS_KERNELS=avx2` on an AVX-512 CPU, with PyTorch held by
    # `ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS` and `ONEDNN_MAX_CPU_ISA`), vitrs would be
    # compared against an ONNX Runtime still on AVX-512: it has no such switch.
    held = os.environ.get("VITRS_KERNELS", "") in ("avx2", "portable")
    if a.peers is None:
        a.peers = "torch" if held else "torch,ort"
        if held:
            print("VITRS_KERNELS holds vitrs to a lower rung and ONNX Runtime cannot be held: "
                  "comparing against PyTorch alone (hold it too: ATEN_CPU_CAPABILITY, "
                  "MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA)", file=sys.stderr)
    elif held and "ort" in a.peers.split(","):
        print("warning: VITRS_KERNELS holds vitrs to a lower rung, but ONNX Runtime runs the "
              "CPU's widest instructions", file=sys.stderr)
    peers = a.peers.split(",")
    unknown = set(peers) - {"torch", "ort"}
    if unknown:
        sys.exit(f"unknown peer(s) {sorted(unknown)}: use torch and/or ort")

    import torch
    import timm

    torch.set_num_threads(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    versions = f"torch {torch.__version__}, timm {timm.__version__}"
    if "ort" in peers:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    tmp = tempfile.mkdtemp(prefix="vitrs-compare-")
    # Every row's models first (all of them held at once: about 1.5 GB with ONNX Runtime's
    # sessions), then the repetitions outermost, each running every row once: a spell of a
    # busy host (tens of seconds) then lands on one repetition of several rows, which their
    # medians ride out, instead of on every repetition of one row. Each side runs one untimed
    # forward before its timed one, as each `vit bench` process does: with the rows between
    # them, the peers' weights are no longer warm from their last repetition.
    setups, sessions = [], {}
    for name in a.models.split(","):
        variant = name.split("/")[0]
        tm = timm.create_model(TIMM[variant], pretrained=False).eval()
        for batch in [int(b) for b in a.batches.split(",")]:
            if "ort" in peers and name not in sessions:
                # The export's batch dimension is dynamic: one session serves every batch.
                sessions[name] = ort_session(tm, batch, a.threads, tmp, name)
            setups.append({"name": name, "batch": batch, "tm": tm,
                           "x": torch.randn(batch, 3, 224, 224), "sess": sessions.get(name),
                           "times": {"vit": [], "torch": [], "ort": []},
                           # Beside each vitrs repetition: its GFLOP/s and the FMA peak read
                           # in its process.
                           "gflops": [], "peaks": [], "kernels": None})
    with torch.inference_mode():
        for rep in range(a.reps):
            for su in setups:
                times = su["times"]
                t, g, p, su["kernels"] = vit_once(a.vit, su["name"], su["batch"], a.threads)
                times["vit"].append(t)
                su["gflops"].append(g)
                su["peaks"].append(p)
                if "torch" in peers:
                    su["tm"](su["x"])  # warm-up
                    t0 = time.perf_counter()
                    su["tm"](su["x"])
                    times["torch"].append(time.perf_counter() - t0)
                if su["sess"]:
                    xn = su["x"].numpy()
                    su["sess"].run(None, {"x": xn})  # warm-up
                    t0 = time.perf_counter()
                    su["sess"].run(None, {"x": xn})
                    times["ort"].append(time.perf_counter() - t0)
            print(f"repetition {rep + 1} of {a.reps} done", file=sys.stderr, flush=True)
    rows = []
    for su in setups:
        name, batch, times, kernels = su["name"], su["batch"], su["times"], su["kernels"]
        gflops, peaks = su["gflops"], su["peaks"]
        med = {k: statistics.median(v) for k, v in times.items() if v}
        best = min(v for k, v in med.items() if k != "vit")
        eff = efficiency(gflops, peaks)
        row = {"model": name, "batch": batch, "ratio": best / med["vit"], "times": times,
               "gflops": gflops, "peaks": peaks, "efficiency": eff, "kernels": kernels}
        for k, v in med.items():
            row[f"{k}_s"], row[f"{k}_ips"] = v, batch / v
        rows.append(row)
        print(f"{name} b{batch}: " + ", ".join(f"{k} {batch / v:.2f} img/s" for k, v in med.items())
              + f", vitrs / best peer {row['ratio']:.2f}, {percent(eff)} of the {kernels} FMA"
              " peak", file=sys.stderr, flush=True)

    cols = [("torch", "PyTorch"), ("ort", "ONNX Runtime")]
    cols = [(k, label) for k, label in cols if k in peers]
    lines = [f"CPU: {cpu_model()}; threads: {a.threads}; vitrs kernels: {rows[0]['kernels']}; "
             f"{versions}; {time.strftime('%Y-%m-%d')}; median of {a.reps} interleaved repetitions; "
             f"FMA peak read beside each vitrs repetition "
             f"{peak_range([p for r in rows for p in r['peaks']])}\n",
             "| model | batch | vitrs img/s | " + " | ".join(f"{l} img/s" for _, l in cols)
             + " | vitrs / best peer | vitrs, % of FMA peak | bar met |",
             "|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} @224 | {r['batch']} | {r['vit_ips']:.2f} | "
                     + " | ".join(f"{r[k + '_ips']:.2f}" for k, _ in cols)
                     + f" | {r['ratio']:.2f} | {percent(r['efficiency'])} | "
                     + f"{verdict(r['ratio'], r['efficiency'])} |")
    lines.append("\n" + BAR)
    table = "\n".join(lines) + "\n"
    print(table)
    if a.write:
        write_section(a.write, table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
