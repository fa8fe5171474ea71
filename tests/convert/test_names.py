"""Name maps: the default (dotted Flax path = torch name) on a transformers-named Flax BERT, regex rules for a
differently named tree, rule sets that are not one-to-one or leave a layer out (errors naming the layers), and
rules that match no layer (a warning, or an error with unused_rules="error", naming the rule)."""

import json
import os
import re
import sys

import jax
import numpy as np
import pytest

import fourierft_jax
from bridge._src.names import NameMap, NameMapError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from convert_models import ODD_RULES, OddNet, inputs, init, rel_err, torch_odd_twin  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "minilm"))


def test_default_map_on_a_transformers_named_flax_bert(tmp_path):
    from flax_bert import BertConfig, BertModel, params_from_torch_state

    torch.manual_seed(0)
    sizes = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=20)
    torch_model = transformers.BertModel(transformers.BertConfig(**sizes), add_pooling_layer=False).eval()
    config = BertConfig(**sizes)
    params = {"params": params_from_torch_state({k: v.numpy() for k, v in torch_model.state_dict().items()}, config)}
    fields = dict(n_frequency=40, scaling=100.0, target_modules=["query", "value", "dense"], bias="fourier_only")
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**fields), key=jax.random.key(0))
    assert "encoder.layer.0.attention.self.query" in adapter.layers()
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft")  # no name map: the default

    ids = np.random.default_rng(0).integers(1, 50, size=(2, 9))
    mask = np.ones_like(ids)
    want = np.asarray(adapter.make_apply(BertModel(config).apply)(adapter.trainable, params, ids, mask))
    loaded = peft.PeftModel.from_pretrained(torch_model, folder).eval()
    assert len([m for m in loaded.modules() if isinstance(m, peft.tuners.fourierft.FourierFTLayer)]) == len(
        adapter.layers())
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert rel_err(got, want) <= 1e-5


def test_regex_rules_map_a_differently_named_tree(tmp_path):
    params = init(OddNet())
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=50.0, target_modules=["q", "v"],
                                           bias="fourier_only", modules_to_save=["out"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2))
    leaves, tree = jax.tree.flatten(adapter.trainable)
    adapter.set_trainable(jax.tree.unflatten(tree, [a + 0.3 for a in leaves]))  # heads and biases trained too
    names = NameMap(**ODD_RULES)
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", name_map=names)
    written = fourierft_jax.FourierFTConfig.from_pretrained(folder)
    assert sorted(written.target_modules) == sorted(
        f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv")
    assert written.modules_to_save == ["head"]

    x = inputs()
    want = np.asarray(adapter.make_apply(OddNet().apply)(adapter.trainable, params, x))
    loaded = peft.PeftModel.from_pretrained(torch_odd_twin(params), folder).eval()
    with torch.no_grad():
        assert rel_err(loaded(torch.from_numpy(x)).numpy(), want) <= 1e-5

    # Back to JAX with the to_torch rules only: the params' names give the inverse.
    back = fourierft_jax.import_peft(folder, params, name_map=NameMap(to_torch=ODD_RULES["to_torch"]))
    assert back.layers() == adapter.layers()
    for a, b in zip(jax.tree.leaves(back.trainable), jax.tree.leaves(adapter.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And with both directions given, through the JSON form the CLI reads.

    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps(ODD_RULES))
    again = fourierft_jax.import_peft(folder, params, name_map=NameMap.parse(str(rules_file)))
    np.testing.assert_array_equal(np.asarray(again.trainable["default"]["spectra"]["layers_1.attn.v"]),
                                  np.asarray(adapter.trainable["default"]["spectra"]["layers_1.attn.v"]))


def test_rules_that_are_not_one_to_one_are_refused(tmp_path):
    params = init(OddNet())
    config = fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["q", "v"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    # q and v of a layer collapse onto one torch name.
    merged = NameMap(to_torch=[(r"^layers_(\d+)\.attn\.[qv]$", r"layers.\1.proj")])
    with pytest.raises(NameMapError, match=r"\['layers_0\.attn\.q', 'layers_0\.attn\.v'\] all map to .*'layers\.0\.proj'"):
        fourierft_jax.export_peft(adapter, tmp_path / "a", name_map=merged)
    # A callable that has no name for one layer.
    partial = NameMap(to_torch=lambda name: None if name.startswith("layers_1") else name.replace("_", "."))
    with pytest.raises(NameMapError, match=r"'layers_1\.attn\.q' maps to no torch name"):
        fourierft_jax.export_peft(adapter, tmp_path / "b", name_map=partial)
    # Directions that disagree: a name does not come back to itself.
    lossy = NameMap(to_torch=ODD_RULES["to_torch"], to_flax=[(r"^layers\.(\d+)\.self_attn\.(q|v)_proj$", r"L\1.\2")])
    with pytest.raises(NameMapError, match=r"'layers_0\.attn\.q' -> 'layers\.0\.self_attn\.q_proj' comes back as 'L0\.q'"):
        fourierft_jax.export_peft(adapter, tmp_path / "c", name_map=lossy)
    assert not any(os.path.exists(tmp_path / d) for d in "abc")

    # Importing: a torch name in the file that no JAX module maps to.
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", name_map=NameMap(**ODD_RULES))
    not_covering = NameMap(to_torch=[(r"^layers_0\.attn\.(q|v)$", r"layers.0.self_attn.\1_proj")])
    with pytest.raises(NameMapError, match=r"'layers\.1\.self_attn\.q_proj' is the image of no JAX module"):
        fourierft_jax.import_peft(folder, params, name_map=not_covering)
    with pytest.raises(NameMapError, match="is not a regular expression"):
        NameMap(to_torch=[("(", "x")])
    with pytest.raises(NameMapError, match="neither a JSON file nor JSON text"):
        NameMap.parse("not json")


def test_name_map_unit_rules():
    identity = NameMap()
    assert identity.is_identity
    assert identity.to_torch_names(["a.b", "c"]) == {"a.b": "a.b", "c": "c"}
    assert identity.to_flax_names(["a.b"], known_flax=["a.b", "c"]) == {"a.b": "a.b"}
    with pytest.raises(NameMapError, match=r"'x\.y' -> 'x\.y'"):
        identity.to_flax_names(["x.y"], known_flax=["a.b"])
    forward_only = NameMap(to_torch=[(r"_(\d+)", r".\1")])
    assert forward_only.to_torch_names(["h_0.q", "h_1.q"]) == {"h_0.q": "h.0.q", "h_1.q": "h.1.q"}
    with pytest.raises(NameMapError, match="give 'to_flax' rules too"):
        forward_only.to_flax_names(["h.0.q"])
    # Two JAX names with one image: the inverse is ambiguous, and says so.
    with pytest.raises(NameMapError, match=r"'h\.0' is the image of several JAX modules \['h_0', 'h\.0'\]"):
        forward_only.to_flax_names(["h.0"], known_flax=["h_0", "h.0"])
    assert NameMap.parse(json.dumps(ODD_RULES)).to_torch_names(["inp"]) == {"inp": "embed"}
    with pytest.raises(NameMapError, match="not a \\(pattern, replacement\\) pair"):
        NameMap(to_torch=[("a",)])
    with pytest.raises(NameMapError, match="the rule raised KeyError"):
        NameMap(to_torch=lambda name: {}[name]).to_torch_names(["q"])


def test_a_rule_that_matches_no_layer_is_reported_by_name(tmp_path):
    """A typo in a rule leaves the names unchanged and PEFT later finds no such module: the map names the rule."""
    import warnings

    params = init(OddNet())
    config = fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["q", "v"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    typo = [(r"^layers_(\d+)\.attn\.(q|v)$", r"layers.\1.self_attn.\2_proj"), (r"^layer_(\d+)\.mlp$", r"mlp.\1")]
    named = re.escape(f"to_torch rule 1 ({typo[1][0]!r} -> {typo[1][1]!r})")
    with pytest.warns(UserWarning, match=named):
        fourierft_jax.export_peft(adapter, tmp_path / "warned", name_map=NameMap(to_torch=typo))
    assert os.path.isdir(tmp_path / "warned")  # a warning only: the names themselves are one-to-one
    with pytest.raises(NameMapError, match=r"matched none of the 4 name\(s\) \['layers_0\.attn\.q'.*" + named):
        fourierft_jax.export_peft(adapter, tmp_path / "strict", name_map=NameMap(to_torch=typo, unused_rules="error"))
    assert not os.path.exists(tmp_path / "strict")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fourierft_jax.export_peft(adapter, tmp_path / "quiet", name_map=NameMap(to_torch=typo, unused_rules="ignore"))
        fourierft_jax.export_peft(adapter, tmp_path / "exact", name_map=NameMap(to_torch=typo[:1]))  # all used

    # Importing: to_flax rules are checked on the file's torch names, to_torch-only rules on the model's names.
    folder = tmp_path / "exact"
    back = [(r"^layers\.(\d+)\.self_attn\.(q|v)_proj$", r"layers_\1.attn.\2"), (r"^model\.", "")]
    with pytest.raises(NameMapError, match=re.escape(f"to_flax rule 1 ({back[1][0]!r} -> '')")):
        fourierft_jax.import_peft(folder, params, name_map=NameMap(typo[:1], back, unused_rules="error"))
    with pytest.raises(NameMapError, match=named):
        fourierft_jax.import_peft(folder, params, name_map=NameMap(to_torch=typo, unused_rules="error"))
    imported = fourierft_jax.import_peft(folder, params, name_map=NameMap(typo[:1], back[:1], unused_rules="error"))
    assert imported.layers() == adapter.layers()


def test_unused_rule_check_units():
    strict = NameMap(to_torch=[(r"^a$", "A"), (r"^b$", "B")], unused_rules="error")
    assert strict.to_torch_names(["a", "b"]) == {"a": "A", "b": "B"}
    with pytest.raises(NameMapError, match=r"to_torch rule 1 \('\^b\$' -> 'B'\)"):
        strict.to_torch_names(["a"])
    # A lookup of one name from a set already checked.
    assert strict.to_torch_names(["a"], check_rules=False) == {"a": "A"}
    # A rule counts as used when it rewrites the output of an earlier one.
    chained = NameMap(to_torch=[(r"^x_", "y_"), (r"^y_(\d)$", r"z.\1")], unused_rules="error")
    assert chained.to_torch_names(["x_1"]) == {"x_1": "z.1"}
    # Callables cannot be inspected, so they are not checked.
    assert NameMap(to_torch=str.upper, unused_rules="error").to_torch_names(["q"]) == {"q": "Q"}
    # Through JSON (what `fourierft convert --name-map` reads) the default is a warning.
    with pytest.warns(UserWarning, match=r"to_torch rule 0 \('\^nothing\$' -> 'x'\)"):
        assert NameMap.parse('[["^nothing$", "x"]]').to_torch_names(["q"]) == {"q": "q"}
    with pytest.raises(NameMapError, match=r"unused_rules must be one of \('error', 'warn', 'ignore'\), got 'no'"):
        NameMap(unused_rules="no")
