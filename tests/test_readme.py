"""The README's Python examples run as written, on small stand-ins for the user's model, data and local folders."""
import copy
import re
from pathlib import Path

import pytest
import torch

from helpers import forget_batches, small_cnn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(marker: str) -> str:
    """The README's ```python block that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = small_cnn()
    original = copy.deepcopy(model).eval()  # sf.unlearn returns the model in eval mode
    batches = forget_batches()
    names = {"model": model, "forget_loader": batches, "inputs": batches[0][0],
             "copy_of_original_model": copy.deepcopy(model)}
    exec(compile(python_block("cfg = sf.SEMUConfig(gamma=0.95)"), "README.md", "exec"), names)
    assert torch.equal(names["original_logits"], original(batches[0][0]))
    assert set(names["sm2"].adapters) == {layer.name for layer in names["report"].layers if layer.k > 0}
    assert list((tmp_path / "adapters").glob("adapters-*.safetensors"))
    merged = names["merged"]
    with torch.no_grad():  # the merged model is the adapted one: same outputs as the loaded adapters give
        torch.testing.assert_close(merged(batches[0][0]), names["sm2"].eval()(batches[0][0]), rtol=1e-4, atol=1e-5)


def test_llm_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from llm_helpers import random_texts, save_tiny_llm

    monkeypatch.chdir(tmp_path)
    save_tiny_llm(tmp_path / "my-llama")
    names = {"forget_texts": random_texts(8, seed=0), "retain_texts": random_texts(8, seed=1)}
    exec(compile(python_block("llm.unlearn_llm("), "README.md", "exec"), names)
    metrics = names["metrics"]
    assert metrics["forget_ppl_after"] >= metrics["forget_ppl_before"] and "retain_ppl_after" in metrics
    assert (tmp_path / "lora" / "adapter_config.json").exists()


def test_official_preset_example_runs():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(40, 3, 6, 6), torch.arange(40) % 5
    names = {"model": small_cnn(), "forget_loader": DataLoader(TensorDataset(x[:10], y[:10]), batch_size=5),
             "retain_loader": DataLoader(TensorDataset(x[10:], y[10:]), batch_size=10)}
    exec(compile(python_block('sf.preset("official-classification")'), "README.md", "exec"), names)
    assert names["report"].training["optimizer"] == "sgd"
    assert names["kwargs"]["retain_mode"] == "mixed" and names["kwargs"]["config"].gamma == 0.9
