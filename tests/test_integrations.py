"""Code nobody here wrote: Hugging Face Transformers models and PyTorch Lightning training.

Both are test extras ([dev]); models are tiny and randomly initialised from a config, nothing is
downloaded (HF_HUB_OFFLINE=1).
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before Transformers is imported: never reach for the hub

import modewatch  # noqa: E402
from modewatch.cli import main  # noqa: E402
import transformers  # noqa: E402
from helpers import environment, findings_by_rule, line_of  # noqa: E402


def tiny_bert(attention="sdpa"):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, attn_implementation=attention)
    return transformers.BertForSequenceClassification(config)


def text_batches(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 100, (4, 12), generator=generator), torch.randint(0, 2, (4,), generator=generator))
            for _ in range(n)]


ATTENTION = {"sdpa": "F.scaled_dot_product_attention", "eager": "F.dropout"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_seed_bug_is_found_with_attention_dropout(log, attention):
    """A BERT fine-tuning loop whose evaluation leaves the model in eval mode: the hidden and the
    attention dropout (functional in Transformers, through SDPA or eager attention) are reported."""
    torch.manual_seed(0)
    model = tiny_bert(attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = text_batches()
    with modewatch.watch(model, log=log):
        model.train()
        for step, (ids, labels) in enumerate(data):
            model(input_ids=ids, labels=labels).loss.backward()  # <- bert forward
            optimizer.step()
            optimizer.zero_grad()
            if step == 1:
                model.eval()  # <- bert eval
                with torch.no_grad():
                    model(input_ids=ids)
    found = findings_by_rule(modewatch.analyze(log))
    assert set(found) == {"train-without-dropout"}
    finding = found["train-without-dropout"]
    assert f"bert.encoder.layer.0.attention.self:{ATTENTION[attention]}" in finding.layers
    assert f"bert.encoder.layer.1.attention.self:{ATTENTION[attention]}" in finding.layers
    assert {"bert.embeddings.dropout", "bert.encoder.layer.0.output.dropout", "dropout"} <= set(finding.layers)
    assert finding.batches == 4
    assert finding.mode_site["line"] == line_of("bert eval")
    assert finding.forward_site["line"] == line_of("bert forward")


def test_from_pretrained_then_training_without_train_is_found(log, tmp_path):
    """from_pretrained() returns a model in eval mode; training it without model.train() is
    train-without-dropout, pointing at the watch() line, the first line known to follow the load."""
    tiny_bert().save_pretrained(tmp_path / "checkpoint")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "checkpoint")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with modewatch.watch(model, log=log):  # <- watch loaded model
        for ids, labels in text_batches(3):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finding = findings_by_rule(modewatch.analyze(log))["train-without-dropout"]
    assert finding.batches == 3
    assert finding.mode_site["line"] == line_of("watch loaded model")
    assert "already in eval mode when modewatch began watching it" in finding.message
    assert "from_pretrained()" in finding.message


def run_script(tmp_path, source, *args):
    """Run ``source`` with MODEWATCH=1 in a fresh interpreter; `modewatch analyze --format json` of
    its log: the document and the exit status."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    log = tmp_path / "run.jsonl"
    env = environment(MODEWATCH="1", MODEWATCH_LOG=os.fspath(log), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, os.fspath(script), *args], env=env, check=True, cwd=tmp_path,
                   capture_output=True, timeout=300)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["analyze", os.fspath(log), "--format", "json"])
    return json.loads(out.getvalue()), code, script


FROM_PRETRAINED = """
    import sys, torch, transformers
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    transformers.BertForSequenceClassification(config).save_pretrained("checkpoint")
    model = transformers.BertForSequenceClassification.from_pretrained("checkpoint")  # <- load
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(input_ids=torch.randint(0, 100, (4, 12)), labels=torch.randint(0, 2, (4,))).loss.backward()
        optimizer.step()
"""


def test_from_pretrained_under_modewatch_names_the_users_line(tmp_path):
    """Under MODEWATCH=1 the eval() inside from_pretrained() is seen: the finding points at the
    user's from_pretrained() line, not at a line inside Transformers, and says so."""
    document, code, script = run_script(tmp_path, FROM_PRETRAINED)
    assert code == 1
    (finding,) = document["findings"]
    assert finding["rule"] == "train-without-dropout"
    assert "bert.encoder.layer.0.attention.self:F.scaled_dot_product_attention" in finding["layers"]
    assert finding["mode_site"]["file"] == os.fspath(script)
    assert finding["mode_site"]["line"] == line_of("load", script)
    assert "inside from_pretrained()" in finding["message"]


LIGHTNING = """
    import sys, torch, lightning
    from torch import nn

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(16, 2))

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)  # <- lightning forward

        def validation_step(self, batch, index):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = Classifier()
    if sys.argv[1:] == ["eval"]:
        model.eval()  # <- user eval
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", enable_progress_bar=False, logger=False,
                                enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)  # <- fit
"""


def test_lightning_fit_has_no_error_findings(tmp_path):
    """Lightning sets the modes itself (sanity check, validation each epoch, restored after):
    a LightningModule fit under MODEWATCH=1 gets no finding at all."""
    document, code, _ = run_script(tmp_path, LIGHTNING)
    assert code == 0
    assert document["findings"] == []
    assert document["summary"]["steps"] == 8


def test_lightning_module_left_in_eval_at_fit_is_found(tmp_path):
    """A module in eval mode when fit() starts trains in eval mode (Lightning restores the mode it
    found after each validation): both layers are found and named. The mode site is the last
    eval() call, Lightning's for validation (at the user's fit() line), and the message also
    names the user's own eval() that it only kept."""
    document, code, script = run_script(tmp_path, LIGHTNING, "eval")
    assert code == 1
    found = {f["rule"]: f for f in document["findings"]}
    assert set(found) == {"train-without-dropout", "bn-frozen-in-train"}
    assert found["train-without-dropout"]["layers"] == ["net.3"]
    assert found["bn-frozen-in-train"]["layers"] == ["net.1"]
    assert found["bn-frozen-in-train"]["count"] == 8
    assert found["bn-frozen-in-train"]["forward_site"]["line"] == line_of("lightning forward", script)
    finding = found["bn-frozen-in-train"]
    assert finding["mode_site"]["line"] == line_of("fit", script)
    assert f"model.eval() inside fit() at {script}:{line_of('fit', script)}" in finding["message"]
    assert f"which kept the mode set before by model.eval() at {script}:{line_of('user eval', script)}" \
        in finding["message"]
