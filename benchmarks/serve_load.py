"""Many people on one `apa serve`: throughput, round latency and memory with K people at once.

Each row starts a fresh `apa serve` process (its own data directory, the MNIST prior, ``--workers
K``) and K simulated people, each a thread that starts a session and rates every round as soon as
it is ready (fetching the round's images first, as the page does; ratings 1-5 from a seeded
generator), until its budget is spent. Rows marked "shared" batch the sessions' network calls
(``--batch-window 0.01``, the default); "own" rows serve the same sessions with one network call
per session (``--batch-window 0``). K = 1 is the anchor row: the same work by one person alone.

Per row: rated images per second over all people (throughput), its ratio to K = 1 and to the
"own" row of the same K, the median and 95th percentile of a round's latency (from sending a
round's ratings to the next round being ready, or the first round from the session's start), the
server's resident memory before any session and at the end with K sessions open (RSS), and the
network calls' mean rows (from the server's log). Run:

  python benchmarks/serve_load.py --people 1,4,8,16 --own 8
  python benchmarks/serve_load.py --people 1,8 --own 8 --budget 16

``--cluster K,...`` adds rows served by `apa serve --ray local` (apa.web.cluster: 2 ingress and 2
engine replicas on a Ray started for the row, the sessions in a PostgreSQL started once with
scripts/postgres.sh): the same people over HTTP, memory summed over every process of the server
(Ray's own included):

  python benchmarks/serve_load.py --people 1,4 --own "" --cluster 1,4

``--make-sd DIR`` writes a random-weight Stable Diffusion 1.5 folder (diffusers layout, the real
classes, block widths ``--sd-widths``) and serves ``--prior sd15`` from it: the rows then show that
every session shares one UNet in memory (the model's own megabytes are printed beside the table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body: dict | None = None) -> dict | bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
        return json.loads(raw) if r.headers.get("content-type", "").startswith("application/json") else raw


def wait_ready(base: str, token: str, poll: float = 0.05) -> dict:
    """Poll the session until a round waits for ratings, or it is done."""
    while True:
        state = call(base, "GET", f"/api/sessions/{token}")
        if state["phase"] in ("ready", "done", "error"):
            return state
        time.sleep(poll)


def person(base: str, seed: int, latencies: list[float], rated: list[int]) -> None:
    """One simulated person: a whole session, rating every round as soon as it is ready."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    token = call(base, "POST", "/api/sessions")["token"]
    while True:
        state = wait_ready(base, token)
        latencies.append(time.perf_counter() - t0)
        if state["phase"] != "ready":
            if state["phase"] == "error":
                raise RuntimeError(state["message"])
            return
        r, k = state["round"], state["images"]
        for p in range(k):  # the page loads every image before the person can rate
            call(base, "GET", f"/api/sessions/{token}/rounds/{r}/images/{p}.png")
        t0 = time.perf_counter()
        call(base, "POST", f"/api/sessions/{token}/rounds/{r}/ratings", {"ratings": [rng.randint(1, 5) for _ in range(k)]})
        rated.append(k)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a cluster's replicas, Ray's own processes)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def one_row(people: int, mode: str, args: argparse.Namespace) -> dict:
    """Start a server, run ``people`` people at once, stop it; the row's numbers. ``mode``: "shared" (the
    sessions' network calls batched), "own" (each session calls the network alone) or "cluster"
    (`apa serve --ray local` over ``args.database``)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "apa.cli", "serve", "--port", str(port), "--data-dir", data, "--prior", args.prior,
               "--particles", str(args.particles), "--budget", str(args.budget), "--per-round", str(args.per_round),
               "--eval-samples", str(args.eval_samples), "--workers", str(people),
               "--batch-window", str(0.0 if mode == "own" else args.window), "--log-level", "warning", *args.serve_args]
        if mode == "cluster":
            cmd += ["--ray", "local", "--database", args.database, "--replicas", "2", "--engines", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        base = f"http://127.0.0.1:{port}"
        memory_of = tree_rss_mb if mode == "cluster" else rss_mb
        try:
            for _ in range(900):
                try:
                    call(base, "GET", "/")
                    break
                except OSError:
                    time.sleep(0.2)
                    if server.poll() is not None:
                        raise RuntimeError(f"the server stopped: {' '.join(cmd)}")
            idle = memory_of(server.pid)
            latencies: list[float] = []
            rated: list[int] = []
            threads = [threading.Thread(target=person, args=(base, 1000 + i, latencies, rated)) for i in range(people)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            memory = memory_of(server.pid)
        finally:
            server.terminate()  # a cluster's server removes its application and stops its Ray on SIGTERM
            server.wait(timeout=120)
    return {"people": people, "mode": mode, "rated": sum(rated), "wall_s": wall, "per_s": sum(rated) / wall,
            "p50_s": statistics.median(latencies), "p95_s": statistics.quantiles(latencies, n=20)[-1],
            "rss_mb": memory, "idle_mb": idle}


def write_sd(folder: Path, widths: tuple[int, ...], seed: int = 0) -> float:
    """A random-weight SD 1.5 in diffusers layout (UNet2DConditionModel with ``widths``, a 4-level
    AutoencoderKL, a 2-layer CLIPTextModel, EulerAncestral with SD's schedule) -> its parameters' MB."""
    import torch

    from apa.compat import ensure_torchvision

    ensure_torchvision()
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)
    unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=256, attention_head_dim=8, layers_per_block=1,
                                block_out_channels=widths, down_block_types=down, up_block_types=up)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, sample_size=64,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1))
    vocab = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_clip_tokenizer"
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text), ("tokenizer", tokenizer)):
        part.save_pretrained(folder / name)
    EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, steps_offset=1).save_pretrained(folder / "scheduler")
    return sum(p.numel() * 4 for m in (unet, vae, text) for p in m.parameters()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", default="1,4,8,16", help="K simulated people at once, one row each")
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--prior", default="mnist")
    ap.add_argument("--serve-args", default="", help="more `apa serve` flags in one string, e.g. \"--device cuda\"")
    ap.add_argument("--own", default="8", help="K for the rows served one network call per session")
    ap.add_argument("--window", type=float, default=0.01, help="the shared rows' --batch-window")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--cluster", default="", help="K for rows served by `apa serve --ray local` (needs apa[cluster] "
                                                  "and PostgreSQL's binaries)")
    ap.add_argument("--make-sd", type=Path, help="write a random-weight SD 1.5 here and serve --prior sd15 from it")
    ap.add_argument("--sd-widths", default="64,128,256,256", help="its UNet's block widths")
    args = ap.parse_args()
    args.serve_args = args.serve_args.split()
    if args.make_sd:
        widths = tuple(int(w) for w in args.sd_widths.split(","))
        mb = write_sd(args.make_sd, widths)
        print(f"random SD 1.5 (UNet widths {widths}) in {args.make_sd}: {mb:.0f} MB of fp32 parameters", flush=True)
        args.prior = "sd15"
        args.serve_args = ["--model", str(args.make_sd), "--height", "64", "--width", "64", *args.serve_args]
    plan = [(int(k), "shared") for k in args.people.split(",")] + [(int(k), "own") for k in args.own.split(",") if k]
    plan += [(int(k), "cluster") for k in args.cluster.split(",") if k]
    with postgres(any(mode == "cluster" for _, mode in plan)) as args.database:
        rows = [one_row(k, mode, args) for k, mode in plan]
    print_table(rows)


@contextlib.contextmanager
def postgres(needed: bool):
    """A throwaway PostgreSQL (scripts/postgres.sh) for the cluster rows: its URL, or None if not needed."""
    if not needed:
        yield None
        return
    script = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
    directory = tempfile.mkdtemp(prefix="apa-postgres-")
    try:
        out = subprocess.run(["bash", str(script), "start", directory, str(free_port())], check=True,
                             capture_output=True, text=True, timeout=120)
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", directory], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    alone = next((r for r in rows if r["people"] == 1 and r["mode"] == "shared"), rows[0])
    own = {r["people"]: r for r in rows if r["mode"] == "own"}
    print("| people | network calls | rated images | wall s | rated per s | x one alone (goal at 8: ≥ 3) | "
          "x own calls (goal at 8: ≥ 2) | round latency p50 s | p95 s | p95 / one alone's (goal at 8: ≤ 3) | "
          "server RSS MB, idle -> end | MB per session (goal ≤ 30) |\n|" + "---|" * 12)
    for r in rows:
        vs_own = f"{r['per_s'] / own[r['people']]['per_s']:.2f}" if r["people"] in own and r["mode"] != "own" else "–"
        print(f"| {r['people']} | {r['mode']} | {r['rated']} | {r['wall_s']:.1f} | "
              f"{r['per_s']:.2f} | {r['per_s'] / alone['per_s']:.2f} | {vs_own} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} | {r['p95_s'] / alone['p95_s']:.2f} | {r['idle_mb']:.0f} -> {r['rss_mb']:.0f} | "
              f"{(r['rss_mb'] - r['idle_mb']) / r['people']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
