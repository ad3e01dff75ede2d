"""Helpers of benchmarks/scale_encode.sh: build the random-weight model and a fixed synthetic page
set, then turn the encode-corpus logs of the 1/2/4-GPU runs into pages/s and scaling efficiency.

    python benchmarks/scale_encode.py prepare WORK --pages 256 --size 4b
    python benchmarks/scale_encode.py summarize WORK OUT --shard-size 16
    python benchmarks/scale_encode.py replicas WORK OUT --pages 128   # notebook 05's one-process split

Throughput is read from each rank's own log line (`rank r/N: encoded ... span START FIRST END`,
wall-clock stamps of one host): the encode phase of a run spans from the earliest rank's start to
the latest rank's end, model loading excluded; "steady" leaves out each rank's first shard (CUDA
and cuBLAS warm-up). The torchrun wall time, loading included, is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

log = logging.getLogger("scale_encode")
PAGE_SIZE = (1024, 1280)  # 32 x 40 tokens of 32 px: 1,280 visual tokens, the reference budget
SPAN = re.compile(r"rank (\d+)/(\d+): encoded (\d+) pages on (\S+) in [\d.]+ s .*span ([\d.]+) ([\d.]+) ([\d.]+)")
WALL = re.compile(r"^wall ([\d.]+) ([\d.]+)$", re.M)


def synthetic_page(number: int) -> Image.Image:
    """A report-like page: a title bar, text lines and a table of random widths (seeded per page)."""
    rng = random.Random(number)
    page = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle((64, 48, 64 + rng.randint(300, 800), 96), fill=(20, 40, 90))
    y = 140
    while y < PAGE_SIZE[1] - 80:
        if rng.random() < 0.1:  # a table block
            for row in range(rng.randint(3, 8)):
                for column in range(4):
                    x = 64 + column * 220
                    draw.rectangle((x, y, x + 200, y + 28), outline=(90, 90, 90))
                    draw.text((x + 8, y + 8), f"{rng.randint(0, 99999):,}", fill="black")
                y += 30
        else:
            draw.text((64, y), " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(8, 16))), fill="black")
        y += rng.randint(22, 40)
    return page


def prepare(work: Path, pages: int, size: str) -> None:
    from colquant.retriever import tiny

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny.build(work / "model", size=size, device=device)
    folder = work / "pages"
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(pages):
        synthetic_page(number).save(folder / f"page-{number:05d}.png")
    log.info("model %s (%s) and %d pages of %dx%d px under %s", size, device, pages, *PAGE_SIZE, work)


def run_summary(log_file: Path, shard_size: int) -> dict:
    text = log_file.read_text()
    ranks = [match.groups() for match in SPAN.finditer(text)]
    if not ranks:
        raise SystemExit(f"{log_file}: no rank finished encoding (see the log)")
    world = int(ranks[0][1])
    pages = sum(int(r[2]) for r in ranks)
    start, first, end = (min(float(r[4]) for r in ranks), min(float(r[5]) for r in ranks), max(float(r[6]) for r in ranks))
    steady_pages = pages - sum(min(shard_size, int(r[2])) for r in ranks)
    wall = WALL.search(text)
    return {"gpus": world, "ranks_reporting": len(ranks), "pages": pages, "devices": sorted(r[3] for r in ranks),
            "encode_s": end - start, "pages_per_s": pages / (end - start),
            "steady_pages_per_s": steady_pages / (end - first) if steady_pages > 0 else None,
            "torchrun_wall_s": float(wall[2]) - float(wall[1]) if wall else None}


def same_as_one_gpu(index_dir: Path, reference: Path) -> dict:
    from colquant.inference.index import load_index

    a, b = load_index(index_dir), load_index(reference)
    equal = sum(torch.equal(x, y) for x, y in zip(a.embeddings, b.embeddings))
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.embeddings, b.embeddings))
    return {"ids_equal": a.ids == b.ids, "pages_bitwise_equal": equal, "max_abs_diff": diff}


def summarize(work: Path, out: Path, shard_size: int) -> None:
    logs = sorted(out.glob("scale-encode-n*.log"), key=lambda p: int(p.stem.rsplit("n", 1)[1]))
    rows = [run_summary(path, shard_size) for path in logs]
    base = rows[0]["pages_per_s"]
    base_steady = rows[0]["steady_pages_per_s"]
    for row in rows:
        row["efficiency"] = row["pages_per_s"] / (row["gpus"] * base)
        row["steady_efficiency"] = (row["steady_pages_per_s"] / (row["gpus"] * base_steady)
                                    if row["steady_pages_per_s"] and base_steady else None)
        row |= same_as_one_gpu(work / f"index-{row['gpus']}", work / "index-1")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "page_size": PAGE_SIZE, "shard_size": shard_size, "runs": rows}
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    (out / f"scale-encode-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{gpu}: encode-corpus, {rows[0]['pages']} pages of {PAGE_SIZE[0]}x{PAGE_SIZE[1]} px",
             "gpus  pages/s  efficiency  steady pages/s  steady eff.  torchrun wall s  same as 1 GPU (bitwise pages, max diff)"]
    for r in rows:
        steady = f"{r['steady_pages_per_s']:14.2f}  {r['steady_efficiency']:11.3f}" if r["steady_pages_per_s"] else f"{'-':>14}  {'-':>11}"
        lines.append(f"{r['gpus']:4d}  {r['pages_per_s']:7.2f}  {r['efficiency']:10.3f}  {steady}  "
                     f"{r['torchrun_wall_s'] or 0:15.1f}  {r['pages_bitwise_equal']}/{r['pages']}, {r['max_abs_diff']:.2e}")
    print("\n".join(lines))  # the benchmark's output: the table


def replicas(work: Path, out: Path, pages: int, batch_size: int) -> None:
    """The one-process split of notebook 05's encoder: the model on every visible GPU, one thread
    each (`distributed.encode_across_replicas`), timed against the model on GPU 0 alone, with the
    encoder's own batch function (processor, forward, real tokens to the CPU)."""
    import time

    import colquant
    from colquant.inference.distributed import encode_across_replicas, load_replicas, visible_gpus

    model, processor = colquant.load(work / "model")
    others = load_replicas(work / "model", visible_gpus()[1:], dtype=model.dtype,
                           max_num_visual_tokens=processor.max_num_visual_tokens)
    images = [Image.open(work / "pages" / f"page-{n:05d}.png").convert("RGB") for n in range(pages)]
    batches = [images[start:start + batch_size] for start in range(0, pages, batch_size)]

    def encode_batch(replica: torch.nn.Module, values: list[Image.Image]) -> list[torch.Tensor]:
        with torch.inference_mode():
            features = processor.process_images(values).to(next(replica.parameters()).device)
            embeddings = replica(**features).embeddings
            return [row[mask].cpu() for row, mask in zip(embeddings, features["attention_mask"].bool())]

    rows, reference = [], None
    for models in ([model], [model, *others]):
        encode_across_replicas(models, batches[: len(models)], encode_batch)  # warm-up: one batch per GPU
        started = time.perf_counter()
        items = encode_across_replicas(models, batches, encode_batch)
        seconds = time.perf_counter() - started
        reference = reference or items
        rows.append({"gpus": len(models), "pages": pages, "seconds": seconds, "pages_per_s": pages / seconds,
                     "pages_bitwise_equal": sum(torch.equal(a, b) for a, b in zip(items, reference))})
    rows[1]["efficiency"] = rows[1]["pages_per_s"] / (rows[1]["gpus"] * rows[0]["pages_per_s"])
    (out / "scale-encode-replicas.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(f"threads: {r['gpus']} GPU(s) {r['pages_per_s']:.2f} pages/s, "
                     f"{r['pages_bitwise_equal']}/{pages} pages equal to 1 GPU" for r in rows)
          + f"; efficiency {rows[1]['efficiency']:.3f}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("prepare")
    build.add_argument("work", type=Path)
    build.add_argument("--pages", type=int, default=256)
    build.add_argument("--size", default="4b", choices=("tiny", "4b"))
    report = commands.add_parser("summarize")
    report.add_argument("work", type=Path)
    report.add_argument("out", type=Path)
    report.add_argument("--shard-size", type=int, required=True)
    threads = commands.add_parser("replicas")
    threads.add_argument("work", type=Path)
    threads.add_argument("out", type=Path)
    threads.add_argument("--pages", type=int, default=128)
    threads.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.work, args.pages, args.size)
    elif args.command == "summarize":
        summarize(args.work, args.out, args.shard_size)
    else:
        replicas(args.work, args.out, args.pages, args.batch_size)


if __name__ == "__main__":
    main()
