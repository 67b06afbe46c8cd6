"""Evaluation speed with and without length-sorted batches, on SST-2 dev and on long texts:

    python scripts/eval_batching.py --before TREE [--after TREE] [--long 64] [--repeats 2]
                                    [--out runs/eval_batching]

TREE is a checkout of the project (`git worktree add /tmp/before <commit>`); the same
`jax-nlu-ppo eval` command (embedded model, chat prompt, greedy, batch size 32) runs in each,
one after the other. The long-text file is made from SST-2's training sentences: sentences of
one label joined until a drawn length (log-normal, median 1,000 characters, p90 about 2,500,
like movie reviews), so its gold labels stay meaningful. Prints examples/s for each tree and
data file and how many answers differ between the trees.

Each command compiles the shapes it meets that JAX's persistent cache does not hold yet, and
sorted batches meet more lengths; so SST-2 dev runs `--repeats` times, alternating the trees,
and the table gives the first run and the best later one (the cache warm for both).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


def long_texts(count: int, seed: int = 0) -> list[dict]:
  with open(GLUE / "SST-2" / "train.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  rng = np.random.default_rng(seed)
  by_label = {label: [r["sentence"].strip() for r in rows if r["label"] == label]
              for label in ("0", "1")}
  out = []
  for i in range(count):
    label = "01"[i % 2]
    # log-normal: median 1000, p90 = 1000 * exp(1.2816 * sigma) = 2500
    target = 1000 * np.exp(rng.normal(0, np.log(2.5) / 1.2816))
    text = ""
    while len(text) < target:
      text += by_label[label][rng.integers(len(by_label[label]))] + " . "
    out.append({"sentence": text.strip(), "label": int(label), "idx": i})
  return out


def run_eval(tree: pathlib.Path, data: str, out: pathlib.Path) -> dict:
  env = dict(os.environ, PYTHONPATH=str(tree))
  subprocess.run([sys.executable, "-m", "jax_nlu_ppo", "eval", "--task", "sst2", "--data", data,
                  "--output", str(out)], cwd=tree, env=env, check=True)
  return json.loads(out.read_text())


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--before", required=True, type=pathlib.Path)
  parser.add_argument("--after", default=ROOT, type=pathlib.Path)
  parser.add_argument("--long", type=int, default=64, help="long texts to score")
  parser.add_argument("--repeats", type=int, default=2, help="runs of SST-2 dev per tree")
  parser.add_argument("--out", default=ROOT / "runs" / "eval_batching", type=pathlib.Path)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  long_file = args.out / "long_texts.jsonl"
  texts = long_texts(args.long)
  long_file.write_text("".join(json.dumps(t) + "\n" for t in texts))
  lengths = np.array([len(t["sentence"]) for t in texts])
  print(f"long texts: {len(texts)}, characters median {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}")
  rows = []
  for name, key, data, repeats in (("SST-2 dev (872)", "dev", str(GLUE), args.repeats),
                                   (f"long texts ({len(texts)})", "long", str(long_file), 1)):
    runs = {"before": [], "after": []}
    for repeat in range(1, repeats + 1):
      for which, tree in (("before", args.before), ("after", args.after)):
        path = args.out / f"{key}_{which}_{repeat}.json"
        # Done cells are kept: rerunning the script only fills in what is missing.
        runs[which].append(json.loads(path.read_text()) if path.exists()
                           else run_eval(tree, data, path))
    first = [runs[w][0]["n"] / runs[w][0]["seconds"] for w in ("before", "after")]
    warm = [max(r["n"] / r["seconds"] for r in runs[w][1:]) if repeats > 1 else None
            for w in ("before", "after")]
    differ = sum(a["response"] != b["response"] for r in runs["after"] for a, b in
                 zip(runs["before"][0]["predictions"], r["predictions"]))
    cells = [f"{first[0]:.2f}", f"{first[1]:.2f}", f"{first[1] / first[0]:.1f}x"]
    cells += ([f"{warm[0]:.2f}", f"{warm[1]:.2f}", f"{warm[1] / warm[0]:.1f}x"] if warm[0]
              else ["-", "-", "-"])
    rows.append(f"| {name} | {' | '.join(cells)} | "
                f"{runs['before'][0]['accuracy']:.3f} / {runs['after'][0]['accuracy']:.3f} | "
                f"{differ} |")
  print("| data | examples/s before, first run | after | speed-up | before, warm cache | after "
        "| speed-up | accuracy before / after | answers that differ |\n"
        "|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
