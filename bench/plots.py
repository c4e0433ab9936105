"""Make the figures of docs/benchmarks.md from the benchmark results (bench/out/*_results.json) and from
a demo training run. PNGs via minilora.plot (no plotting dependency); colours, in order: blue, orange,
green (the legend keys at the top right follow the series order given in docs/benchmarks.md).

    python bench/plots.py            # writes docs/img/*.png
"""
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from minilora.plot import line_plot  # noqa: E402

OUT = os.path.join(HERE, "..", "docs", "img")


def merge_figures():
    path = os.path.join(HERE, "out", "merge_results.json")
    if not os.path.isfile(path):
        print(f"skip merge figures: no {path} (run bench/merge.py)")
        return
    results = json.load(open(path))["results"]
    gb = [r["bytes"] / 1e9 for r in results]
    series = {name: (gb, [r["runs"][name]["wall_s"] for r in results]) for name in ("minilora", "peft", "copy")}
    line_plot(series, os.path.join(OUT, "merge_wall.png"))
    series = {name: (gb, [r["runs"][name]["peak_rss_mib"] for r in results]) for name in ("minilora", "peft", "copy")}
    line_plot(series, os.path.join(OUT, "merge_rss.png"))
    print("wrote docs/img/merge_wall.png, merge_rss.png")


def demo_loss_figure():
    from minilora.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        run_demo(tmp, seed=0, steps=60)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "adapter", "train_log.jsonl"))]
    line_plot({"train loss": ([r["step"] for r in rows], [r["loss"] for r in rows])},
              os.path.join(OUT, "demo_loss.png"))
    print(f"wrote docs/img/demo_loss.png (loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f})")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    merge_figures()
    demo_loss_figure()
