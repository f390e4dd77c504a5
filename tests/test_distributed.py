"""Distributed jobs: a real torchrun job on CPU (gloo), per-rank logs, merged analysis."""

import os
import subprocess
import sys
import textwrap

import pytest

import modewatch
from modewatch import ranks
from helpers import environment

SCENARIOS = ("rank0-eval", "all-eval", "clean")

# One torchrun launch runs every scenario, one after the other, each with a model and logs of its own.
JOB = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import modewatch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for scenario in sys.argv[2:]:
        folder = os.path.join(sys.argv[1], scenario)
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
    # Every log is closed by now. Skip the interpreter's teardown: there, torch's gloo aborts now
    # and then once several DDP models have lived in a process ("terminate called without an
    # active exception"; about 1 launch in 6 here, with modewatch or without).
    os._exit(0)
""")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The job, run once under torchrun with 2 processes for every scenario; a scenario's name
    gives its log folder."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "job.py"
    script.write_text(JOB)
    for attempt in range(2):  # a second try only for the launcher's own trouble (a port taken)
        folder = root / f"attempt-{attempt}"
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(script), str(folder), *SCENARIOS],
            capture_output=True, text=True, timeout=300, cwd=root,
            env=environment(TMPDIR=str(root)))  # torchrun leaves a folder of its own there
        if result.returncode == 0:
            return lambda scenario: str(folder / scenario)
    raise AssertionError(result.stderr[-8000:])


def line_in_job(text):
    """The number of the job's line that holds ``text``."""
    (number,) = [n for n, line in enumerate(JOB.splitlines(), 1) if text in line]
    return number


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
    assert mismatch.mode_site["line"] == line_in_job("ddp.module.eval()") and mismatch.mode_site["call"] == "eval"
    assert mismatch.forward_site["line"] == line_in_job("loss = ddp(torch.randn(16, 8)).sum()")
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
                                None, NO_CONTEXT, False, False, 0, first, first + generator.randint(0, 8), 0, 1, 1),
                          generator.randint(0, 3), 0)
        assert timelines.mismatches() == every_pair(timelines), seed
