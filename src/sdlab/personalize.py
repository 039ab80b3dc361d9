"""Personalisation at generation time: textual-inversion embeddings and LoRAs, from sdlab or
from other tools, loaded into a Pipeline (`--embedding FILE[:TOKEN]`, `--lora FILE[:WEIGHT]`).

Embeddings. Formats read:
  - diffusers: `.safetensors` / `.bin` holding {token: (N, dim) or (dim,) tensor} (one or more tokens);
  - AUTOMATIC1111: `.pt` with `string_to_param: {"*": tensor}`, or `.safetensors` with `emb_params`.
  The token is `FILE:TOKEN` if given, else the diffusers key, else the file's stem. A token of N
  vectors becomes N tokenizer entries `<x>`, `<x>_1`, ... (as diffusers' load_textual_inversion
  names them), and the pipeline's tokenizer is wrapped so that a prompt only says `<x>`: the
  wrapper rewrites `<x>` to `<x> <x>_1 ...` before tokenising, so prompts.py needs no change.
  A token the vocabulary already knows (`triangle`, `style`) is refused: its row would be
  overwritten and the word lost; load the file as `FILE:<name>` instead.

LoRAs. Formats read: diffusers/peft (`unet.<module>.lora_A.weight` / `.lora.down.weight` /
  `.lora_linear_layer.down.weight`, `text_encoder.` keys, alpha from the file's
  `lora_adapter_metadata`) and kohya / A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, `lora_te_` / `lora_te1_` text-encoder keys), on Linear and Conv layers.
  sdlab's own Dreambooth LoRAs of the small models also adapt the VAE decoder, under `vae.` keys.
  A LoRA is *fused*: W += weight * alpha / rank * up @ down, computed in fp32. Why fuse rather
  than keep peft adapters: generation costs nothing extra, any layer kind works, peft is not needed
  at inference, and weight 0 leaves the weights bit for bit as they were. The price: removing a
  LoRA means loading the model again (a server switching LoRAs per request keeps one pipeline per
  LoRA set, or reloads). Fusing matches diffusers' `load_lora_weights` + `fuse_lora(lora_scale=w)`
  (checked in tests/test_personalize.py).

What was loaded is written into every image's infotext: `Lora: name:weight, ...`,
`Lora hashes: name: hash` and `TI hashes: token: hash` (hash: first 10 hex of the file's sha256, as
A1111's short hashes).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlab.errors import InputError, ModelLoadError

A1111_KEYS = ("string_to_param", "emb_params")
GENERIC_LORA_STEMS = ("pytorch_lora_weights", "adapter_model", "lora")


# ------------------------------------------------------------------------------ file arguments

def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """`FILE` or `FILE:SUFFIX` -> (file, suffix); a name that is an existing file is never split."""
    text = str(spec)
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    head, tail = text.rsplit(":", 1)
    return Path(head), tail


def parse_lora_spec(spec: str | Path) -> tuple[Path, float]:
    path, tail = split_spec(spec)
    if tail is None:
        return path, 1.0
    try:
        return path, float(tail)
    except ValueError:
        raise InputError(f"--lora {spec}: the weight after ':' must be a number, got {tail!r}") from None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def read_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """(contents, safetensors metadata) of a .safetensors or a torch pickle (weights only)."""
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as e:  # safetensors and torch raise many kinds on a bad file
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot read {path}: {first_line}") from e


# -------------------------------------------------------------------------------- embeddings

def vector_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of an N-vector token: `<x>`, `<x>_1`, ... (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def read_embedding_file(path: Path, token: str | None = None) -> dict[str, torch.Tensor]:
    """{token: (N, dim) float tensor} from any supported embedding file."""
    data, _ = read_tensors(path)
    if not isinstance(data, dict) or not data:
        raise ModelLoadError(f"{path}: not an embedding file (no tensors)")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelLoadError(f"{path}: A1111 embedding with {len(params)} entries in string_to_param")
        found = {token or path.stem: next(iter(params.values()))}
    elif "emb_params" in data:  # A1111 .safetensors
        found = {token or path.stem: data["emb_params"]}
    elif {"clip_l", "clip_g"} & set(data):
        raise ModelLoadError(f"{path}: an SDXL embedding (clip_l/clip_g); SD 1.x/2.x models only")
    else:  # diffusers: {token: tensor}
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ModelLoadError(f"{path}: not an embedding file (keys: {', '.join(map(str, data))[:200]})")
        if token is not None and len(tensors) > 1:
            raise InputError(f"{path} holds {len(tensors)} tokens; it cannot be renamed to {token!r}")
        found = {token: next(iter(tensors.values()))} if token else tensors
    out = {}
    for name, tensor in found.items():
        t = torch.as_tensor(tensor).detach().float()
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            raise ModelLoadError(f"{path}: embedding {name!r} has shape {tuple(t.shape)}, expected (N, dim)")
        out[name] = t
    return out


def check_new_token(tokenizer, token: str) -> None:
    """InputError if `token` is a word or word piece the vocabulary already has."""
    if not token or any(c.isspace() for c in token):
        raise InputError(f"token {token!r} must be one word without spaces")
    if token in tokenizer.get_added_vocab():
        return  # loaded before: its rows are overwritten
    vocab = tokenizer.get_vocab()
    if token in vocab or f"{token}</w>" in vocab:
        raise InputError(f"token {token!r} is already in the tokenizer's vocabulary; choose another "
                         f"(e.g. <{token}>), or load the file as FILE:<{token}>")


def add_tokens(tokenizer, text_encoder, token: str, n: int) -> list[int]:
    """Add an n-vector token to the tokenizer and rows for it to the text encoder; their ids.

    Names are lower-cased: CLIP's tokenizer lower-cases prompts before matching added tokens."""
    names = vector_names(token.lower(), n)
    for name in names:
        check_new_token(tokenizer, name)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


class ExpandingTokenizer:
    """A tokenizer that rewrites multi-vector tokens before tokenising: `<x>` -> `<x> <x>_1 ...`.

    Everything else is the wrapped tokenizer's, so it stands in for it anywhere."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.expansions: dict[str, int] = {}  # token -> vectors
        self._pattern: re.Pattern | None = None

    def register(self, token: str, n: int) -> None:
        token = token.lower()
        self.expansions.pop(token, None)
        if n > 1:
            self.expansions[token] = n
        names = sorted(self.expansions, key=len, reverse=True)
        self._pattern = (re.compile("|".join(rf"{re.escape(t)}(?!_\d)" for t in names), re.I)
                         if names else None)

    def expand(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(
            lambda m: " ".join(vector_names(m.group(0).lower(), self.expansions[m.group(0).lower()])),
            text)

    def __call__(self, text, *args, **kwargs):
        text = self.expand(text) if isinstance(text, str) else [self.expand(t) for t in text]
        return self._tokenizer(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str):
        if name == "_tokenizer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


def expanding_tokenizer(pipe) -> ExpandingTokenizer:
    """The pipeline's tokenizer, wrapped once (the components and the prompt encoder share it)."""
    tok = pipe.components.tokenizer
    if not isinstance(tok, ExpandingTokenizer):
        tok = ExpandingTokenizer(tok)
        pipe.components.tokenizer = tok
    pipe.encoder.tokenizer = tok
    return tok


def set_embedding(pipe, token: str, vectors: torch.Tensor) -> list[int]:
    """Make `token` mean `vectors` (N, dim) in the pipeline's prompts; returns the token ids."""
    c = pipe.components
    table = c.text_encoder.get_input_embeddings()
    if vectors.shape[1] != table.embedding_dim:
        raise ModelLoadError(f"embedding {token!r} has vectors of size {vectors.shape[1]}, but this "
                             f"model's text encoder uses {table.embedding_dim} (made for another model?)")
    tok = expanding_tokenizer(pipe)
    ids = add_tokens(tok, c.text_encoder, token, len(vectors))
    with torch.no_grad():
        table = c.text_encoder.get_input_embeddings()
        table.weight[ids] = vectors.to(table.weight.device, table.weight.dtype)
    tok.register(token, len(vectors))
    return ids


def load_embedding(pipe, spec: str | Path) -> dict[str, tuple[int, int]]:
    """Load one `FILE[:TOKEN]`; returns {token: (vectors, dim)} for each token it defines."""
    path, token = split_spec(spec)
    embeddings = read_embedding_file(path, token)
    for name, vectors in embeddings.items():
        set_embedding(pipe, name, vectors)
    digest = file_hash(path)
    _add_extra(pipe, "TI hashes", ", ".join(f"{name}: {digest}" for name in embeddings))
    return {name: tuple(vectors.shape) for name, vectors in embeddings.items()}


# ------------------------------------------------------------------------------------- LoRAs

@dataclass
class LoraLayer:
    """One adapted layer: delta W = scale * up @ down."""

    target: str  # "unet", "text_encoder" or "vae"
    module: str  # path inside the target, diffusers / transformers naming (or kohya's underscores)
    down: torch.Tensor | None = None  # (rank, in[, kh, kw])
    up: torch.Tensor | None = None  # (out, rank[, 1, 1])
    alpha: float | None = None  # None: alpha = rank (scale 1)
    kohya: bool = False

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


_ROLES = [
    (re.compile(r"^(?P<m>.+)\.(?:lora_down|lora\.down|lora_linear_layer\.down|lora_A(?:\.[^.]+)?)"
                r"\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.(?:lora_up|lora\.up|lora_linear_layer\.up|lora_B(?:\.[^.]+)?)"
                r"\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)_lora\.down\.weight$"), "down"),  # old diffusers attention processors
    (re.compile(r"^(?P<m>.+)_lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
_KOHYA_TARGETS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_TARGETS = {"unet.": "unet", "text_encoder.": "text_encoder", "vae.": "vae"}  # vae.: sdlab's


def _split_module(module: str) -> tuple[str, str, bool]:
    """(target, module path, kohya naming) of a LoRA key's module part."""
    module = module.removeprefix("base_model.model.")
    if module.startswith(("lora_te2_", "text_encoder_2.")):
        raise ModelLoadError("an SDXL LoRA (second text encoder); SD 1.x/2.x models only")
    for prefix, target in _KOHYA_TARGETS.items():
        if module.startswith(prefix):
            return target, module[len(prefix):], True
    target = "unet"
    for prefix, name in _TARGETS.items():
        if module.startswith(prefix):
            target, module = name, module[len(prefix):]
    module = re.sub(r"\.processor\.(to_[qkv])$", r".\1", module)
    module = re.sub(r"\.processor\.to_out$", ".to_out.0", module)
    return target, module, False


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' lora_adapter_metadata: {target: {"lora_alpha": a, "alpha_pattern": {...}}}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    packed = json.loads(raw)
    out: dict[str, dict] = {}
    for key, value in packed.items():
        target, _, field = key.partition(".")
        out.setdefault(target, {})[field] = value
    return out


def read_lora_file(path: Path) -> list[LoraLayer]:
    data, metadata = read_tensors(path)
    if not isinstance(data, dict) or not data:
        raise ModelLoadError(f"{path}: not a LoRA file (no tensors)")
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key, value in data.items():
        for pattern, role in _ROLES:
            m = pattern.match(key)
            if m:
                break
        else:
            raise ModelLoadError(f"{path}: unsupported LoRA key {key!r} (LoRA in diffusers or kohya "
                                 f"format only; LoHa/LoKr/DoRA are not supported)")
        try:
            target, module, kohya = _split_module(m.group("m"))
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        layer = layers.setdefault((target, module), LoraLayer(target, module, kohya=kohya))
        if role == "alpha":
            layer.alpha = float(value)
        else:
            setattr(layer, role, value.float())
    alphas = _metadata_alphas(metadata)
    for layer in layers.values():
        if layer.down is None or layer.up is None:
            raise ModelLoadError(f"{path}: LoRA layer {layer.module} lacks its "
                                 f"{'down' if layer.down is None else 'up'} weight")
        meta = alphas.get(layer.target, {})
        if layer.alpha is None and "lora_alpha" in meta:
            pattern = meta.get("alpha_pattern") or {}
            layer.alpha = float(next((a for p, a in pattern.items() if layer.module.endswith(p)),
                                     meta["lora_alpha"]))
    return list(layers.values())


def _adaptable_modules(model, kohya: bool) -> dict[str, torch.nn.Module]:
    """Linear and Conv layers by name; a text encoder's also under `text_model.` (transformers 5
    dropped that level of CLIPTextModel, the LoRA files of other tools keep it)."""
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    if hasattr(model, "get_input_embeddings") and not hasattr(model, "text_model"):
        modules.update({f"text_model.{name}": m for name, m in list(modules.items())})
    return {name.replace(".", "_"): m for name, m in modules.items()} if kohya else modules


def fuse_lora(components, layers: list[LoraLayer], weight: float, source: str = "LoRA") -> int:
    """W += weight * scale * up @ down for every layer; returns the number of layers changed."""
    tables: dict[tuple[str, bool], dict] = {}
    missing = []
    plan = []
    for layer in layers:
        key = (layer.target, layer.kohya)
        if key not in tables:
            tables[key] = _adaptable_modules(getattr(components, layer.target), layer.kohya)
        module = tables[key].get(layer.module)
        if module is None:
            missing.append(f"{layer.target}:{layer.module}")
        else:
            plan.append((layer, module))
    if missing:
        raise ModelLoadError(f"{source}: {len(missing)} of {len(layers)} LoRA layers are not in this "
                             f"model (first: {missing[0]}); is it a LoRA for another model family?")
    for layer, module in plan:
        w = module.weight
        delta = layer.up.flatten(1).to(w.device) @ layer.down.flatten(1).to(w.device)
        if delta.numel() != w.numel():
            raise ModelLoadError(f"{source}: LoRA layer {layer.module} makes a "
                                 f"{tuple(delta.shape)} update for a {tuple(w.shape)} weight")
        with torch.no_grad():
            w.add_((delta.reshape(w.shape) * (weight * layer.scale)).to(w.dtype))
    return len(plan)


def lora_name(path: Path) -> str:
    return path.parent.name if path.stem in GENERIC_LORA_STEMS and path.parent.name else path.stem


def load_lora(pipe, spec: str | Path) -> tuple[str, float]:
    """Fuse one `FILE[:WEIGHT]` into the pipeline's UNet / text encoder; returns (name, weight)."""
    path, weight = parse_lora_spec(spec)
    layers = read_lora_file(path)
    fuse_lora(pipe.components, layers, weight, source=str(path))
    name = lora_name(path)
    _add_extra(pipe, "Lora", f"{name}:{weight:g}")
    _add_extra(pipe, "Lora hashes", f"{name}: {file_hash(path)}")
    return name, weight


# ------------------------------------------------------------------------------------ entry

def _add_extra(pipe, key: str, value: str) -> None:
    """Append to an infotext field the pipeline writes into every image (Pipeline.infotext_extras)."""
    extras = pipe.infotext_extras
    extras[key] = f"{extras[key]}, {value}" if extras.get(key) else value


@dataclass
class Personalization:
    """What apply_personalization loaded: {token: (vectors, dim)} and {LoRA name: weight}."""

    embeddings: dict[str, tuple[int, int]]
    loras: dict[str, float]


def apply_personalization(pipe, embeddings: list[str] | tuple = (),
                          loras: list[str] | tuple = ()) -> Personalization:
    """Load textual-inversion embeddings (`FILE[:TOKEN]`) and fuse LoRAs (`FILE[:WEIGHT]`)."""
    loaded = Personalization({}, {})
    for spec in embeddings:
        loaded.embeddings.update(load_embedding(pipe, spec))
    for spec in loras:
        name, weight = load_lora(pipe, spec)
        loaded.loras[name] = weight
    return loaded
