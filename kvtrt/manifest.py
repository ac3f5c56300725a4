"""`manifest.json`: the contract between an export folder and the runtime.

The exporter writes it; the runtime reads it, checks it against its own version and against the
graphs it loads, and refuses a mismatch with a message that says how to fix it (re-export).
Imports nothing heavy: the runtime needs neither torch.onnx nor transformers to read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .contract import GraphVariant, group_graphs

#: bump when the graph contract (`kvtrt.contract`) changes; an export with another format is refused
FORMAT = 7
MANIFEST_NAME = "manifest.json"


class ExportMismatchError(RuntimeError):
    """The export folder does not match this runtime or its own manifest."""


@dataclass
class Manifest:
    """Everything the runtime needs to drive an exported graph."""

    model_type: str
    source: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: str  # "fp32" | "fp16"
    max_positions: int
    score_window: int
    graphs: dict[str, str]  # GraphVariant value ("prefill", "decode", ...) -> file name
    weights_file: str
    tokenizer_file: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    quantize: str = "none"
    #: `score.{l}` per query head ("query") or per KV group ("kv", every export made before this field)
    score_heads: str = "kv"
    export_options: dict = field(default_factory=dict)
    #: layer boundaries [0, ..., n_layers] of the decode groups (`kvtrt.contract`); [] when there are none
    decode_groups: list = field(default_factory=list)
    #: the model's generation_config.json as `generate` keyword arguments (see `generation_defaults()`);
    #: the runtime uses them unless the caller passes its own
    generation_defaults: dict = field(default_factory=dict)
    #: dtype of the KV cache the graphs read and write ("fp32" | "fp16"); "" (exports made before this
    #: field): the model's `dtype`
    kv_dtype: str = ""
    format: int = FORMAT
    kvtrt_version: str = __version__

    def __post_init__(self):
        self.kv_dtype = self.kv_dtype or self.dtype

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def score_rows(self) -> int:
        """Rows of `score.{l}` per sequence: query heads or KV heads (see `score_heads`)."""
        return self.n_heads if self.score_heads == "query" else self.n_kv_heads

    @property
    def variant_graphs(self) -> dict[str, str]:
        """`graphs` without the decode groups (ORT-only slices of decode_shared, checked against it by
        the tests) and decode_heads (ORT-only, checked against decode by the tests): what validation and
        TensorRT builds cover."""
        ort_only = {key for key, _, _ in group_graphs(self.decode_groups)} | {GraphVariant.DECODE_HEADS.value}
        return {k: v for k, v in self.graphs.items() if k not in ort_only}

    @property
    def group_ranges(self) -> list[range]:
        """The decode groups' layer ranges (empty without decode groups)."""
        b = self.decode_groups
        return [range(a, z) for a, z in zip(b[:-1], b[1:])]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take over all layers and KV heads."""
        itemsize = 2 if self.kv_dtype == "fp16" else 4
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Read and check `directory/manifest.json` (clear errors for every way it can be wrong)."""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"export folder {str(directory)!r} does not exist; create it with "
                                    f"`kvtrt export MODEL -o {directory}`")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a kvtrt export (no {MANIFEST_NAME}); create one with "
                                    f"`kvtrt export MODEL -o {directory}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExportMismatchError(f"{path} is not valid JSON ({exc}); re-export the model") from None
        if data.get("format") != FORMAT or _minor(data.get("kvtrt_version", "")) != _minor(__version__):
            raise ExportMismatchError(
                f"{directory} was exported by kvtrt {data.get('kvtrt_version', '?')} (graph format "
                f"{data.get('format', '?')}); this is kvtrt {__version__} (format {FORMAT}). Re-export it with "
                f"`kvtrt export {data.get('source', 'MODEL')} -o {directory}`")
        known = set(cls.__dataclass_fields__)
        missing = known - set(data) - {"bos_token", "eos_token", "quantize", "export_options", "generation_defaults",
                                       "score_heads", "decode_groups", "kv_dtype"}
        if missing:
            raise ExportMismatchError(f"{path} lacks {sorted(missing)}; re-export the model")
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        for name in [*manifest.graphs.values(), manifest.weights_file, manifest.tokenizer_file]:
            if not (directory / name).is_file():
                raise ExportMismatchError(f"{directory} lacks {name}, which its manifest names; re-export the model")
        return manifest


#: generation_config.json fields carried into `Manifest.generation_defaults`, under `generate`'s names
GENERATION_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "min_new_tokens")


def generation_defaults(config) -> dict:
    """A transformers `GenerationConfig` (or None) as `generate` keyword arguments, HF's meaning kept:
    without `do_sample` HF decodes greedily whatever temperature/top_k/top_p say, so those are carried
    only for a sampling model (temperature, and top_k at HF's own default of 50 when unset);
    repetition_penalty, max_new_tokens and min_new_tokens whenever the model sets them. Reads
    attributes only: no transformers import."""
    if config is None:
        return {}
    get = lambda name: getattr(config, name, None)  # noqa: E731
    out: dict = {}
    if get("do_sample") is True:
        temperature = 1.0 if get("temperature") is None else float(get("temperature"))
        if temperature > 0:
            out["temperature"] = temperature
            out["top_k"] = 50 if get("top_k") is None else int(get("top_k"))
            if get("top_p") is not None and float(get("top_p")) < 1:
                out["top_p"] = float(get("top_p"))
    if get("repetition_penalty") is not None and float(get("repetition_penalty")) != 1.0:
        out["repetition_penalty"] = float(get("repetition_penalty"))
    for name in ("max_new_tokens", "min_new_tokens"):
        if get(name):
            out[name] = int(get(name))
    return out


def generation_eos_ids(config) -> list[int]:
    """The EOS ids a `GenerationConfig` stops at (HF `generate` stops at any of them)."""
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])
