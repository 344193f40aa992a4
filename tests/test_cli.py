"""The console script and the packaging contract."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parent.parent


def _run(*args, module="specdec"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_and_prints_the_stats_table(checkpoint):
    out = _run("generate", "w5 w6 w7", "--model", str(checkpoint), "--max-new-tokens", "6", "--draft",
               str(checkpoint), "-k", "3")
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stderr and "tokens per target forward" in out.stderr
    assert "acceptance rate            1.000" in out.stderr  # the model drafting for itself
    # the streamed text is the generated tokens decoded: the same greedy generation run here, on the same checkpoint
    import specdec

    model, tokenizer = specdec.load(str(checkpoint), dtype="float32")
    ids = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    text = tokenizer.decode(specdec.generate(model, ids, max_new_tokens=6)[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip() and out.stdout.strip() == text.strip(), (out.stdout, text)


def test_generate_shows_speculation_and_its_speedup_by_default(checkpoint):
    out = _run("generate", "w5 w6 w7 w5 w6", "--model", str(checkpoint), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "draft ngram, k = auto" in out.stderr  # a model without a shipped head: n-gram lookup
    assert "round budget" in out.stderr and "per-position acceptance" in out.stderr
    assert "plain decoding of the same prompt" in out.stderr and "x over plain decoding" in out.stderr
    assert "the two outputs are identical, token for token" in out.stderr
    assert "one-time costs" in out.stderr and "prefill" in out.stderr and "warm-up" in out.stderr


def test_generate_under_torchrun_splits_the_model_and_rank_0_alone_speaks(checkpoint):
    """torchrun --nproc-per-node 2 -m specdec generate: the target split over two gloo ranks, "auto" k agreed
    on by the ranks; the text is one process's, printed once."""
    args = ("generate", "w5 w6 w7 w5 w6", "--model", str(checkpoint), "--max-new-tokens", "8")
    out = _run("--nproc-per-node", "2", "-m", "specdec", *args, module="torch.distributed.run")
    alone = _run(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == alone.stdout.strip() and out.stderr.count("identical, token for token") == 1


def test_generate_with_draft_none_decodes_plainly(checkpoint):
    out = _run("generate", "w5 w6", "--model", str(checkpoint), "--max-new-tokens", "4", "--draft", "none")
    assert out.returncode == 0, out.stderr
    assert "plain decoding:" in out.stderr and "over plain decoding" not in out.stderr
    assert "draft passes               0" in out.stderr


def test_generate_quantized_with_its_own_layers_as_draft(checkpoint):
    out = _run("generate", "w5 w6", "--model", str(checkpoint), "--max-new-tokens", "6", "--quantize", "int8",
               "--draft", "self", "-k", "2", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert "draft self, k = 2" in out.stderr and "identical, token for token" in out.stderr


def test_generate_and_serve_default_to_the_same_draft():
    from specdec.cli import DEFAULT_HEAD, DEFAULT_MODEL, _draft_name

    assert _draft_name(DEFAULT_MODEL, None) == DEFAULT_HEAD  # the shipped head, as `specdec serve` uses
    assert _draft_name("some/folder", None) == "ngram" and _draft_name(DEFAULT_MODEL, "none") is None


def test_python_m_specdec_is_the_cli(checkpoint):
    """``python -m specdec`` behaves as the console script (launchers such as torchrun -m start modules)."""
    script = Path(sys.executable).with_name("specdec")  # the console script beside this interpreter
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    module = _run("generate", "--help")
    assert module.returncode == 0 and module.stdout == subprocess.run(
        [str(script), "generate", "--help"], capture_output=True, text=True, timeout=120).stdout
    out = _run("generate", "w5", "--model", str(checkpoint / "missing"))
    assert out.returncode == 2 and "missing" in out.stderr


def _stand_in(site: Path, name: str) -> None:
    """A tiny installed distribution that owns the import name ``name``, as Hugging Face's ``kernels`` does."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"STAND_IN = {name!r}\n")
    info = site / f"{name}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "top_level.txt").write_text(name + "\n")


def test_checkout_folders_never_shadow_distributions_of_the_same_name(tmp_path):
    """From the checkout's root (python -c puts it first on sys.path), kernels/, models/ and bench/ must not
    hide installed packages of those names: transformers imports Hugging Face's `kernels`."""
    for name in ("kernels", "models", "bench"):
        _stand_in(tmp_path, name)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = ("import specdec, kernels, models, bench; print(kernels.STAND_IN, models.STAND_IN, bench.STAND_IN, "
            "specdec.kernels.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kernels", "models", "bench", "specdec.kernels"]


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
