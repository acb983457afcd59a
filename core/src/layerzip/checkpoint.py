"""save()/load(): a compressed model as ``model.safetensors`` + ``layerzip.json``. No pickle.

The manifest records, per replaced layer, the method and the module's JSON config, so that
``load`` can rebuild empty replacement modules on a fresh base model before filling every tensor
from safetensors. Files are written to temporary names and renamed into place; the manifest,
written last, carries the SHA-256 of the tensor file, so a torn or altered checkpoint is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import __version__
from .approximator import ApproxModule
from .errors import CheckpointError, SpecError
from .plugins import Registry, get_registry
from .walker import STATE_ATTR, _record_layer

FORMAT = "layerzip/1"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "layerzip.json"


def replaced_layers(model: nn.Module) -> dict[str, ApproxModule]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ApproxModule) and getattr(m, "layerzip_method", None)}


def save(model: nn.Module, directory: str | os.PathLike, registry: Registry | None = None) -> Path:
    """Write ``model.safetensors`` and ``layerzip.json`` into ``directory`` (created if needed)."""
    registry = registry or get_registry()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layers = replaced_layers(model)
    state = model.__dict__.get(STATE_ATTR, {"specs": [], "layers": {}})
    plugins = {}
    manifest_layers = {}
    for name, module in layers.items():
        info = registry.plugin_of(module.layerzip_method)
        if info is not None:
            plugins[info.distribution or info.name] = info.version
        manifest_layers[name] = {
            "method": module.layerzip_method,
            "backend": getattr(module, "backend_name", None),
            "module": type(module).__name__,
            "config": module.config(),
            **state["layers"].get(name, {}),
        }
    tmp = _atomic_target(out / MODEL_FILE)
    try:
        save_model(model, str(tmp))
        digest = _sha256(tmp)
        os.replace(tmp, out / MODEL_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {"format": FORMAT, "layerzip_version": __version__, "plugins": plugins,
                "specs": state["specs"], "model_file": MODEL_FILE, "model_sha256": digest,
                "layers": manifest_layers}
    _write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist: is {str(directory)!r} a directory "
                              "written by layerzip.save / 'layerzip compress --out'?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); the checkpoint is "
                              "truncated or corrupted: save it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} manifest (format={found!r})")
    for key in ("layers", "model_file", "model_sha256"):
        if key not in manifest:
            raise CheckpointError(f"{str(path)!r} lacks the field {key!r}; save it again")
    return manifest


def load(model: nn.Module, directory: str | os.PathLike, *, verify: bool = True,
         registry: Registry | None = None) -> nn.Module:
    """Rebuild the replaced layers of a checkpoint on ``model`` (the same base architecture,
    freshly built) and load every tensor. On any error the model is left as it was."""
    registry = registry or get_registry()
    manifest = read_manifest(directory)
    tensor_path = Path(directory) / manifest["model_file"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{str(tensor_path)!r} is missing; the checkpoint is incomplete")
    if verify and _sha256(tensor_path) != manifest["model_sha256"]:
        raise CheckpointError(f"{str(tensor_path)!r} does not match the SHA-256 in its manifest: "
                              "the file is truncated, corrupted or from another save")
    undo = []
    try:
        for name, entry in manifest["layers"].items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(
                    f"the checkpoint replaces layer {name!r}, which the given model lacks: load "
                    "it onto the same architecture it was saved from") from None
            adapter = registry.adapter_for(old)
            if adapter is None:
                raise CheckpointError(f"layer {name!r} of the given model is a "
                                      f"{type(old).__name__}, which no installed adapter accepts")
            if entry.get("adapter") and adapter.name != entry["adapter"]:
                raise CheckpointError(f"layer {name!r} was saved from a {entry['adapter']!r} "
                                      f"layer but the given model has a {adapter.name!r} layer")
            try:
                approximator = registry.approximator(entry["method"])
            except SpecError as exc:
                raise CheckpointError(f"layer {name!r}: {exc}; install the plugin that provides "
                                      f"it (the checkpoint lists {manifest.get('plugins')})"
                                      ) from None
            view = adapter.view(old)
            new = approximator.build(entry["config"])
            if (new.in_features, new.out_features) != (view.in_features, view.out_features):
                raise CheckpointError(
                    f"layer {name!r}: the checkpoint's module is {new.out_features}×"
                    f"{new.in_features} but the given model's layer is {view.out_features}×"
                    f"{view.in_features}")
            new.to(device=view.device, dtype=view.dtype)
            new.layerzip_method = entry["method"]
            undo.append(adapter.replace(model, name, new))
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            missing, unexpected = load_model(model, str(tensor_path), strict=False,
                                             device=str(device))
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{str(tensor_path)!r} could not be loaded into the model: "
                                  f"{exc}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"{str(tensor_path)!r} does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} — load it onto the architecture it was "
                "saved from")
    except Exception:
        for u in reversed(undo):
            u()
        raise
    for name, entry in manifest["layers"].items():
        _record_layer(model, name, entry.get("adapter"), entry.get("layer_type"))
    model.__dict__[STATE_ATTR]["specs"] = list(manifest.get("specs", []))
    return model


def save_record(prefix: str | os.PathLike, tensors: dict[str, torch.Tensor],
                metadata: dict) -> tuple[Path, Path]:
    """Write ``{prefix}.safetensors`` and then ``{prefix}.json`` (``metadata`` plus the tensor
    file's SHA-256), each to a temporary name and renamed into place: a process killed at any
    moment leaves either the previous record or the new one, and a mismatched pair is caught by
    :func:`load_record`. For plugins that keep their own checkpoints (training state, …)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tensor_path, meta_path = Path(f"{prefix}.safetensors"), Path(f"{prefix}.json")
    tmp = _atomic_target(tensor_path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, tensor_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(meta_path, json.dumps({**metadata, "tensors_sha256": digest}, indent=2) + "\n")
    return tensor_path, meta_path


def load_record(prefix: str | os.PathLike, device: str | torch.device = "cpu"
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a record written by :func:`save_record`; CheckpointError when a file is missing,
    unreadable, or the tensors do not match the hash in the JSON."""
    prefix = Path(prefix)
    tensor_path, meta_path = Path(f"{prefix}.safetensors"), Path(f"{prefix}.json")
    for path in (tensor_path, meta_path):
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} does not exist (a record is "
                                  f"{prefix.name}.safetensors + {prefix.name}.json)")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(meta_path)!r} is not valid JSON ({exc})") from None
    if metadata.get("tensors_sha256") != _sha256(tensor_path):
        raise CheckpointError(f"{str(tensor_path)!r} does not match the SHA-256 recorded in "
                              f"{str(meta_path)!r}: the record is torn or was altered")
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except SafetensorError as exc:
        raise CheckpointError(f"{str(tensor_path)!r} is not a readable safetensors file: "
                              f"{exc}") from None
    return tensors, metadata


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same directory and a rename."""
    _write_atomic(Path(path), text)


def _atomic_target(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = _atomic_target(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
