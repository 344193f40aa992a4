"""The console script and the packaging contract."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    hf = tiny_model("llama", torch.float32)
    hf.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(hf.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(folder)
    return folder


def _run(*args):
    return subprocess.run([sys.executable, "-m", "specdec.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_and_prints_the_stats_table(checkpoint):
    out = _run("generate", "w5 w6 w7", "--model", str(checkpoint), "--max-new-tokens", "6", "--draft",
               str(checkpoint), "-k", "3")
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stderr and "tokens per target forward" in out.stderr
    assert "acceptance rate            1.000" in out.stderr  # the model drafting for itself
    assert out.stdout.strip()  # the streamed text


def test_bad_arguments_exit_2_with_a_message(checkpoint):
    out = _run("generate", "w5", "--model", str(checkpoint), "--top-p", "1.5", "--temperature", "0.7")
    assert out.returncode == 2 and "top_p" in out.stderr
    out = _run("generate", "w5", "--model", str(checkpoint / "missing"))
    assert out.returncode == 2 and "missing" in out.stderr


def test_only_specdec_is_installed_at_the_top_level():
    dist = importlib.metadata.distribution("specdec")
    top = (dist.read_text("top_level.txt") or "specdec").split()
    assert top == ["specdec"]
    import specdec

    assert specdec.models.__name__ == "specdec.models" and specdec.kernels.__name__ == "specdec.kernels"
    assert "specdec = specdec.cli:main" in (dist.read_text("entry_points.txt") or "")
