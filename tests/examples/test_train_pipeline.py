"""The main example end to end on a few steps: load, FourierFT steps, Orbax checkpoint, PEFT export, torch load."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import fourierft_jax

pytest.importorskip("peft")

import train  # noqa: E402  (examples/minilm, put on sys.path by conftest)


def test_pipeline_exports_an_adapter_that_peft_runs_identically(tmp_path):
    out = tmp_path / "run"
    report = train.main([
        "--out", str(out), "--epochs", "2", "--max-steps", "3", "--batch-size", "16", "--max-eval", "64", "--max-train", "256",
        "--methods", "fourierft,head", "--n-frequency", "64",
    ])
    fourier = report["results"]["fourierft"]
    # 12 adapted layers (query, value of 6 layers) x 64 coefficients + the 384x2 classifier and its bias.
    assert fourier["trainable_parameters"] == 12 * 64 + 384 * 2 + 2
    torch_check = fourier["torch"]
    assert torch_check["prediction_agreement"] == 1.0
    assert torch_check["max_logit_difference"] < 1e-4
    assert torch_check["max_merged_weight_relative_difference"] < 1e-6
    # Orbax kept only the best of the two epoch checkpoints.
    steps = [p for p in os.listdir(out / "checkpoints" / "fourierft") if p.isdigit()]
    assert len(steps) == 1
    assert (out / "learning_curves.png").stat().st_size > 10_000
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"fourierft", "head"}
    assert len(saved["histories"]["fourierft"]) == 2
    config = json.loads((out / "fourierft_peft_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FOURIERFT" and config["modules_to_save"] == ["classifier"]
    # The Orbax adapter checkpoint holds the same spectra, bit for bit, as the exported PEFT file.
    saved = fourierft_jax.load_adapter(str(out / "fourierft_adapter_orbax"))
    peft_tensors = load_file(str(out / "fourierft_peft_adapter" / "adapter_model.safetensors"))
    assert len(saved.state["spectra"]) == 12
    for name, spectrum in saved.state["spectra"].items():
        np.testing.assert_array_equal(np.asarray(spectrum), peft_tensors[f"base_model.model.{name}.fourierft_spectrum"])
