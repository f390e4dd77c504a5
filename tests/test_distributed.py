"""Distributed jobs: real torchrun runs on CPU (gloo), per-rank logs, merged analysis."""

import os
import subprocess
import sys
import textwrap

import pytest

import modewatch
from modewatch import ranks

JOB = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import modewatch

    scenario, folder = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with modewatch.watch(ddp, log=os.path.join(folder, "rank{rank}-{pid}.jsonl")):
        ddp.train()
        for step in range(8):
            loss = ddp(torch.randn(16, 8)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 3 and (scenario == "all-eval" or rank == 0):
                ddp.module.eval()  # only rank 0 evaluates, and never switches back
                with torch.no_grad():
                    ddp.module(torch.randn(4, 8))
                if scenario == "clean":
                    ddp.train()
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job under torchrun with 2 processes for a scenario; return its log folder."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "job.py"
    script.write_text(JOB)

    def run(scenario):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEWATCH")}
        for attempt in range(2):  # a second try only for the launcher's own trouble (a port taken)
            folder = root / f"{scenario}-{attempt}"
            folder.mkdir()
            result = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(script), scenario, str(folder)],
                capture_output=True, text=True, timeout=180, env=env, cwd=root)
            if result.returncode == 0:
                return str(folder)
        raise AssertionError(result.stderr[-3000:])

    return run


def eval_line():
    return JOB.splitlines().index("            ddp.module.eval()  # only rank 0 evaluates, and never switches back") + 1


@pytest.mark.slow
def test_rank_zero_left_in_eval_mode_is_a_rank_mode_mismatch(job):
    """Only rank 0 evaluates and stays in eval mode: per-rank findings for rank 0 and a
    rank-mode-mismatch naming rank 0, the layers without DDP's prefix, and the eval() line."""
    folder = job("rank0-eval")
    assert len(os.listdir(folder)) == 2
    analysis = modewatch.analyze(folder)
    assert analysis.summary["ranks"] == [0, 1]
    by_rule = {}
    for finding in analysis.findings:
        by_rule.setdefault(finding.rule, []).append(finding)
    assert set(by_rule) == {"rank-mode-mismatch", "train-without-dropout", "bn-frozen-in-train"}
    (mismatch,) = by_rule["rank-mode-mismatch"]
    assert (mismatch.rank, mismatch.severity, sorted(mismatch.layers)) == (0, "error", ["1", "2"])
    assert (mismatch.first_step, mismatch.last_step) == (4, 7)
    assert mismatch.mode_site["line"] == eval_line() and mismatch.mode_site["call"] == "eval"
    assert mismatch.forward_site["line"] == JOB.splitlines().index("        loss = ddp(torch.randn(16, 8)).sum()") + 1
    assert [f.rank for f in by_rule["train-without-dropout"]] == [0]
    assert by_rule["train-without-dropout"][0].layers == ["module.2"]


@pytest.mark.slow
def test_the_same_bug_on_every_rank_is_one_finding(job):
    """Every rank makes the same mistake: one finding per rule, with the ranks listed, and no
    rank-mode-mismatch (the ranks agree)."""
    analysis = modewatch.analyze(job("all-eval"))
    rules = {f.rule: f for f in analysis.findings}
    assert set(rules) == {"train-without-dropout", "bn-frozen-in-train"}
    finding = rules["train-without-dropout"]
    assert (finding.rank, finding.ranks, finding.layers) == (None, [0, 1], ["2"])
    assert finding.count == 2 * 4
    assert "on all 2 ranks" in finding.message


@pytest.mark.slow
def test_a_correct_distributed_job_is_clean(job):
    """Rank 0 evaluates and switches back to train mode: nothing to report."""
    assert modewatch.analyze(job("clean")).findings == []


def test_wrapper_prefixes_are_ignored_when_comparing_layers():
    """DDP's module. and torch.compile's _orig_mod. do not make two layers different."""
    assert ranks.plain_name("module._orig_mod.encoder.drop") == "encoder.drop"
    assert ranks.plain_name("modules.drop") == "modules.drop"


def test_the_sweep_finds_what_comparing_every_pair_of_spans_finds():
    """rank-mode-mismatch compares ranks by one sweep over sorted span boundaries; on random jobs
    (overlapping, touching and nested spans, a rank's spans overlapping its own, four ranks) it
    finds exactly what comparing each eval span with every train span of the other ranks finds."""
    import random

    from modewatch.format import PARAM_GRAD
    from modewatch.reader import NO_CONTEXT, Calls, Layer

    def every_pair(timelines):
        found = []
        for name, layer in sorted(timelines.layers.items()):
            for rank, spans in sorted(layer.eval.items()):
                for span in spans:
                    hits = [(max(span.first, first), min(span.last, last))
                            for other, pairs in layer.train.items() if other != rank
                            for first, last in zip(pairs[0::2], pairs[1::2])
                            if max(span.first, first) <= min(span.last, last)]
                    if hits:
                        found.append((rank, name, span, (min(h[0] for h in hits), max(h[1] for h in hits))))
        return found

    for seed in range(300):
        generator = random.Random(seed)
        timelines = ranks.Timelines()
        for _ in range(generator.randint(0, 40)):
            first = generator.randint(0, 60)
            layer = Layer(generator.choice(["a", "module.a", "b"]), "Dropout", "dropout", 0, False)
            timelines.add(Calls(layer, PARAM_GRAD, generator.random() < 0.5, True, False, False, None, 0.5, None,
                                None, NO_CONTEXT, False, False, first, first + generator.randint(0, 8), 0, 1, 1),
                          generator.randint(0, 3), 0)
        assert timelines.mismatches() == every_pair(timelines), seed
