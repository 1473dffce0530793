"""Adapters on disk: a folder of .safetensors files, listed with their metadata, loaded once and
kept in memory so that attaching one is a reference swap. An adapter may be kept private to
someone (a visitor's training job makes one): `keepers.json` in the folder says whose, until the
owner publishes it."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.adapter import Adapter, base_fingerprint, check_base, load_adapter, read_adapter_metadata
from core.errors import UserError
from core.files import atomic_path, write_json
from core.model import Transformer

NAME_RULE = "letters, digits, '.', '_' and '-', at most 64, not starting with '.'"


def clean_name(name: str) -> str:
    """An adapter name that is safe as a file name: the uploaded or typed name, never a path."""
    stem = Path(str(name)).name  # drops any folder part, '../' included
    stem = stem[:-len(".safetensors")] if stem.endswith(".safetensors") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-")
    if not stem or stem.startswith(".") or len(stem) > 64:
        raise UserError(f"adapter name {name!r} is not usable; accepted: {NAME_RULE}")
    return stem


@dataclass
class Entry:
    name: str
    path: Path
    meta: dict
    problem: str | None  # why it cannot be used with the loaded model, if it cannot

    def summary(self) -> dict:
        cfg, training, base = self.meta.get("config", {}), self.meta.get("training", {}), self.meta.get("base", {})
        v2 = [f for f in ("bias_scale", "norm_tuning") if cfg.get(f)] + (["visual_queries"] if cfg.get("visual_blocks") else [])
        loss = training.get("final_loss")
        return {"name": self.name, "K": cfg.get("prompt_len"), "L": cfg.get("layers"), "V2": "+".join(v2) or "-",
                "base": f"{base.get('n_layers', '?')}x{base.get('dim', '?')}" if base else "?",
                "dataset": training.get("dataset", "-"), "steps": training.get("steps", "-"),
                "final loss": round(loss, 4) if isinstance(loss, (int, float)) else "-",
                "date": training.get("date", "-"), "usable": "yes" if self.problem is None else self.problem}


class AdapterRegistry:
    def __init__(self, folder: str | os.PathLike, model: Transformer):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.fingerprint = base_fingerprint(model)  # the base never changes; listings compare with it
        self._loaded: dict[str, tuple[float, Adapter]] = {}  # name -> (file mtime, adapter)
        self._listed: dict[Path, tuple[tuple, Entry]] = {}  # path -> ((mtime, size), entry)
        self._keepers_file = self.folder / "keepers.json"
        try:
            self._keepers: dict[str, str] = json.loads(self._keepers_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self._keepers = {}

    # -- who may see an adapter ------------------------------------------------------------
    def keeper(self, name: str) -> str | None:
        """Whose private adapter this is; None: published, everyone's."""
        return self._keepers.get(name)

    def publish(self, name: str):
        if not self.path(name).is_file():
            raise UserError(f"no adapter named {name!r}")
        self._set_keeper(clean_name(name), None)

    def _set_keeper(self, name: str, keeper: str | None):
        if keeper is None and name not in self._keepers:
            return
        if keeper is None:
            del self._keepers[name]
        else:
            self._keepers[name] = keeper
        write_json(self._keepers_file, self._keepers)

    def path(self, name: str) -> Path:
        return self.folder / f"{clean_name(name)}.safetensors"

    def entries(self) -> list[Entry]:
        """Every file's metadata and fitness for the model; a file is read again only when it
        changes (open pages list the registry every few seconds)."""
        out, listed = [], {}
        for path in sorted(self.folder.glob("*.safetensors")):
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._listed.get(path)
            if cached is None or cached[0] != stamp:
                meta, problem = {}, None
                try:
                    meta = read_adapter_metadata(path)
                    check_base(meta, self.model, self.fingerprint)
                except UserError as e:
                    problem = str(e)
                cached = (stamp, Entry(path.stem, path, meta, problem))
            listed[path] = cached
            out.append(cached[1])
        self._listed = listed
        return out

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def load(self, name: str) -> Adapter:
        """The adapter, loaded on first use and kept; reloaded if its file changed."""
        path = self.path(name)
        if not path.is_file():
            raise UserError(f"no adapter named {name!r}; accepted: {', '.join(self.names()) or 'none yet'}")
        mtime = path.stat().st_mtime
        cached = self._loaded.get(path.stem)
        if cached is None or cached[0] != mtime:
            cached = (mtime, load_adapter(path, self.model, attach=False))
            self._loaded[path.stem] = cached
        return cached[1]

    def add(self, source: str | os.PathLike, name: str | None = None, overwrite: bool = False,
            keeper: str | None = None) -> str:
        """Copy a file into the registry after checking it loads for this model; `keeper`: private to them."""
        source = Path(source)
        if source.suffix != ".safetensors":
            raise UserError(f"{source.name}: only .safetensors adapter files are accepted")
        load_adapter(source, self.model, attach=False)  # refuses corrupt or incompatible files
        target = self.path(name or source.stem)
        if target.exists() and not overwrite:
            raise UserError(f"an adapter named {target.stem!r} exists already; choose another name")
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        self._set_keeper(target.stem, keeper)
        return target.stem

    def rename(self, old: str, new: str) -> str:
        src, dst = self.path(old), self.path(new)
        if not src.is_file():
            raise UserError(f"no adapter named {old!r}")
        if dst.exists():
            raise UserError(f"an adapter named {dst.stem!r} exists already; choose another name")
        os.rename(src, dst)
        if src.stem in self._loaded:
            self._loaded[dst.stem] = self._loaded.pop(src.stem)
        keeper = self._keepers.get(src.stem)
        self._set_keeper(src.stem, None)
        self._set_keeper(dst.stem, keeper)
        return dst.stem

    def delete(self, name: str):
        path = self.path(name)
        if not path.is_file():
            raise UserError(f"no adapter named {name!r}")
        path.unlink()
        self._loaded.pop(path.stem, None)
        self._set_keeper(path.stem, None)

    def name_of(self, adapter: Adapter | None) -> str | None:
        for name, (_, a) in self._loaded.items():
            if a is adapter:
                return name
        return None
