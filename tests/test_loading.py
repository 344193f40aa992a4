"""Loading from checkpoint folders, GGUF files and transformers objects; clear errors otherwise."""

import pytest
import torch
from conftest import tiny_model

import specdec
from specdec.models.llama import LlamaModel
from specdec.models.loading import as_native
from specdec.models.loading import load_draft


def test_transformers_model_converts_once_and_shares_weights():
    hf = tiny_model("qwen2")
    native = as_native(hf)
    assert as_native(hf) is native
    fused = native.model.layers[0].self_attn.qkv_proj.weight
    hf_attn = hf.model.layers[0].self_attn
    # q, k, v of transformers' model are now slices of the native fused matrix: one copy in memory
    assert hf_attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert hf_attn.k_proj.weight.data_ptr() == fused[hf_attn.q_proj.weight.shape[0]:].data_ptr()
    assert native.model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert "_specdec_native" not in hf.state_dict()


@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2", "mistral"])
def test_checkpoint_folder_roundtrip(tmp_path, arch):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    hf = tiny_model(arch, torch.float32)
    hf.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(hf.config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    model, tokenizer = specdec.load(tmp_path)
    assert isinstance(model, LlamaModel) and model.dtype == torch.float32
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=10), specdec.generate(hf, ids, max_new_tokens=10))
    model16, _ = specdec.load(str(tmp_path), dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16 and model16.inv_freq.dtype == torch.float32
    assert isinstance(tokenizer, type(AutoTokenizer.from_pretrained(tmp_path)))
    # as a draft, a model takes its target's dtype (a draft head keeps its own: test_head.py)
    assert load_draft(tmp_path, torch.bfloat16).dtype == torch.bfloat16
    assert load_draft("ngram", torch.float32) == "ngram"  # prompt lookup has no weights to load
    with pytest.raises(ValueError, match="dtype"):
        load_draft("ngram", "float33")  # refused whatever the draft
    bare = tmp_path / "bare"  # a draft shares its target's tokenizer: it needs none of its own
    hf.save_pretrained(bare)
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=10, draft_model=load_draft(bare, "float32")),
                       specdec.generate(model, ids, max_new_tokens=10))  # (the CLI names its dtype)


def test_fallback_architecture_loads_from_a_folder(tmp_path):
    hf = tiny_model("gpt2", torch.float32)
    hf.save_pretrained(tmp_path)
    from specdec.models.loading import load_checkpoint

    model = load_checkpoint(tmp_path)
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=6), specdec.generate(hf, ids, max_new_tokens=6))


def test_missing_path_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        specdec.load(tmp_path / "nowhere")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="gguf"):
        specdec.load(f)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, monkeypatch):
    import numpy as np
    from gguf import GGUFWriter

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "mamba-ish-unknown")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="mamba-ish-unknown"):
        specdec.load(path)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
