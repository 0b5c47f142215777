"""The README's quick start, end to end: real MiniLM weights, real SMS spam data, 2 gloo ranks."""

from __future__ import annotations

import torch
from helpers import RECIPES, launch, summary
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def test_quickstart_learns_spam(tmp_path):
    out = tmp_path / "quickstart"
    run = launch(RECIPES / "quickstart.yaml", f"output_dir={out}", "--procs", "2", timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["status"] == "completed" and s["epochs"] == 1.0 and s["samples_seen"] == 800
    test = s["metrics"]["test"]
    majority = 257 / 300  # ham share of the test split
    assert test["accuracy"] >= 0.93 > majority + 0.05, test
    assert test["per_class"]["spam"]["recall"] >= 0.6 and test["roc_auc"] >= 0.95
    assert s["train_loss"]["last"] < 0.5 * s["train_loss"]["first"]
    for key in ("time_to_first_step_s", "training_wall_s", "samples_per_s", "model_load_s", "data_prep_s"):
        assert s["timings"][key] > 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000025", "checkpoint-00000050"]
    # clean logs: no colour codes, the new classifier head said once in plain words, a closing line that leads
    # with the final metrics per split
    assert "\x1b[" not in run.output and "LOAD REPORT" not in run.output
    assert run.output.count("the task head is new and starts random (classifier.bias, classifier.weight)") == 1
    closing = run.stdout.strip().splitlines()[-2]
    assert closing.startswith("done: validation loss") and f"test loss {test['loss']:.4g} accuracy" in closing
    assert s["trained_tokens"] > 800 * 5, "800 messages of at least a few tokens each"

    # the exported folder is a plain Hugging Face model that classifies on its own
    model = AutoModelForSequenceClassification.from_pretrained(s["final_model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(s["final_model"])
    texts = ["WINNER!! You have won a £1000 prize. Call 09061701461 now to claim", "Ok, see you at lunch then"]
    with torch.no_grad():
        predicted = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["spam", "ham"]
