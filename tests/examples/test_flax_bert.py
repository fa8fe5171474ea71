"""The example's Flax BERT equals transformers' torch BertModel on the same weights and inputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax_bert import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    load_minilm,
    minilm_path,
    params_from_torch_state,
)


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def test_random_tiny_bert_matches_transformers():
    torch.manual_seed(0)
    torch_config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40,
    )
    torch_model = transformers.BertModel(torch_config, add_pooling_layer=False).eval()
    state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40)
    params = params_from_torch_state(state, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours = np.asarray(BertModel(config).apply({"params": params}, ids, mask))
    reference = _torch_hidden(torch_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_minilm_hidden_states_match_transformers():
    model, params, tokenizer = load_minilm()
    texts = ["what a wonderful day", "awful", ":-)"]
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings])[:, :16]
    mask = np.array([e.attention_mask for e in encodings])[:, :16]
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    reference = _torch_hidden(transformers.AutoModel.from_pretrained(minilm_path()).eval(), ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], reference[valid], atol=1e-4, rtol=1e-4)


def test_missing_weight_is_named():
    with pytest.raises(KeyError, match="embeddings.word_embeddings.weight"):
        params_from_torch_state({}, BertConfig(num_hidden_layers=1))


def test_sequence_classifier_matches_transformers():
    torch.manual_seed(1)
    torch_config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, num_labels=3,
    )
    torch_model = transformers.BertForSequenceClassification(torch_config).eval()
    state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=20)
    bert = params_from_torch_state({k[5:]: v for k, v in state.items() if k.startswith("bert.")}, config,
                                   with_pooler=True)
    classifier = {"kernel": state["classifier.weight"].T, "bias": state["classifier.bias"]}
    ids = np.random.default_rng(1).integers(1, 50, size=(4, 9))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    ours = BertForSequenceClassification(config, num_labels=3).apply(
        {"params": {"bert": bert, "classifier": classifier}}, ids, mask)
    with torch.no_grad():
        reference = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5, rtol=1e-4)
