"""Training-step overhead of modewatch.watch() on a small Hugging Face BERT, where attention
dropout is functional (each attention call passes through modewatch's wrapper).

    python scripts/bench_transformers.py [--rounds 41] [--steps 5]

Needs transformers (a test extra). A BERT of 4 layers, hidden size 128, sequence 64, batch 8,
built from a config (no download), one CPU thread; SDPA and eager attention. Variants are
interleaved in rotating order within each round, timed by thread CPU time; figures are medians
of the per-round paired differences against the bare model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import modewatch  # noqa: E402


class Bench:
    def __init__(self, attention: str, folder: str):
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=256,
                                         max_position_embeddings=64, attn_implementation=attention)
        self.model = transformers.BertForSequenceClassification(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids, self.labels = torch.randint(0, 1000, (8, 64)), torch.randint(0, 2, (8,))
        self.log = os.path.join(folder, f"bert-{attention}.jsonl")

    def steps(self, watched: bool, n: int) -> float:
        watcher = modewatch.watch(self.model, log=self.log) if watched else None
        start = time.thread_time()
        for _ in range(n):
            self.model(input_ids=self.ids, labels=self.labels).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        elapsed = time.thread_time() - start
        if watcher is not None:
            watcher.close()
        return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="modewatch-bench-")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, "
          f"{args.rounds} rounds of {args.steps} steps")
    for attention in ("sdpa", "eager"):
        bench = Bench(attention, folder)
        bench.steps(False, 2), bench.steps(True, 2)  # warm-up
        times = {False: [], True: []}
        for r in range(args.rounds):
            for watched in ((False, True) if r % 2 else (True, False)):
                times[watched].append(bench.steps(watched, args.steps))
        bare = statistics.median(times[False])
        extra = statistics.median(w - b for w, b in zip(times[True], times[False]))
        calls = modewatch.analyze(bench.log).summary["layer_calls"] // max(1, args.steps)
        print(f"BERT-4x128 {attention:5s}: bare {bare * 1e3:7.2f} ms/step, watch() {extra * 1e3:+.3f} ms/step "
              f"= {100 * extra / bare:+.2f}% ({calls} mode-sensitive calls per step, functional included)")


if __name__ == "__main__":
    main()
