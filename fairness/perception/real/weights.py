"""Where a real backend's weights come from: one resolver for every backend.

A *source* is either a local file or folder (relative paths resolve against the bundle
folder, so a bundle can carry its weights) or a Hugging Face Hub id (``org/name``, optionally
``hf-hub:org/name``). Hub files are looked up in the Hugging Face cache and downloaded only when
downloads are allowed: offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` or a
component's ``local_files_only: true``) never touches the network.

Weights that cannot be found raise :class:`MissingWeightsError` (a ``FileNotFoundError``)
whose message says exactly what to download and where to put it, because on a cluster
without internet "file not found" alone sends the user hunting through four libraries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_PREFIX = "hf-hub:"
# org/name with the characters the Hub allows; anything else (./x, /abs, a.safetensors) is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".json"}


class MissingWeightsError(FileNotFoundError):
    """Weights a backend needs are not on this machine (the message says how to get them)."""


@dataclass(frozen=True)
class WeightsRequest:
    """What a backend needs from a source, and how to tell the user about it.

    ``files`` lists the files needed inside a folder or Hub repository, each as a tuple of
    acceptable alternatives (first found wins, e.g. safetensors before a pickle). ``field`` is
    the bundle.json key the user edits to point at local weights (``config.pretrained``).
    ``hub_id`` / ``url`` are where the files can be downloaded, for the error message.
    """

    backend: str
    what: str
    field: str
    files: tuple[tuple[str, ...], ...]
    hub_id: str | None = None
    url: str | None = None

    @property
    def primary_files(self) -> list[str]:
        return [alternatives[0] for alternatives in self.files]


def offline_mode(local_files_only: bool = False) -> bool:
    """True when nothing may be downloaded: the config flag or the usual environment variables.

    Read from the environment at call time (huggingface_hub reads it once at import, which
    would ignore a later ``HF_HUB_OFFLINE=1``).
    """
    return bool(local_files_only) or any(os.environ.get(v, "").strip().lower() in _TRUE for v in _OFFLINE_VARS)


def hub_id_of(source: str) -> str | None:
    """The Hub repository id that ``source`` names, or None when it is a path."""
    s = source[len(_HUB_PREFIX):] if source.startswith(_HUB_PREFIX) else source
    if source.startswith(_HUB_PREFIX) or (_HUB_ID.match(s) and Path(s).suffix.lower() not in _WEIGHT_SUFFIXES):
        return s.rstrip("/")
    return None


def local_path(source: str | os.PathLike[str], root: Path | None = None) -> Path:
    """``source`` as a path: ``~`` expanded, relative paths taken inside ``root`` (the bundle)."""
    path = Path(source).expanduser()
    return path if path.is_absolute() or root is None else Path(root) / path


def resolve_weights(source: str | os.PathLike[str], request: WeightsRequest, *, root: Path | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False) -> list[Path]:
    """Local paths of ``request.files`` for ``source`` (one path per entry, in order).

    - an existing file: it is the (single) requested file;
    - an existing folder: the requested files inside it;
    - a Hub id: the files from the Hugging Face cache (``cache_dir`` overrides its location),
      downloaded first unless offline.

    Raises :class:`MissingWeightsError` naming what to download and where to put it.
    """
    if str(source).startswith(_HUB_PREFIX):  # explicitly a Hub id: no local lookup
        return _from_hub(str(source)[len(_HUB_PREFIX):].rstrip("/"), request, cache_dir,
                         offline_mode(local_files_only), None)
    path = local_path(source, root)
    if path.is_file():
        if len(request.files) != 1:
            raise _missing(request, f"{path} is a file, but a folder holding {_names(request)} is needed", path)
        return [path]
    if path.is_dir():
        found, absent = [], []
        for alternatives in request.files:
            hit = next((path / name for name in alternatives if (path / name).is_file()), None)
            found.append(hit)
            if hit is None:
                absent.append(" or ".join(alternatives))
        if absent:
            raise _missing(request, f"folder {path} lacks {', '.join(absent)}", path)
        return [p for p in found if p is not None]
    repo = hub_id_of(str(source))
    if repo is None:
        raise _missing(request, f"no file or folder at {path}", path)
    return _from_hub(repo, request, cache_dir, offline_mode(local_files_only), path)


def _from_hub(repo: str, request: WeightsRequest, cache_dir: str | os.PathLike[str] | None,
              offline: bool, path: Path | None) -> list[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    out, tried_online = [], False
    for alternatives in request.files:
        reasons = []
        for name in alternatives:
            try:
                out.append(Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=offline)))
                break
            except Exception as err:  # not cached, offline, no network, not in the repo: all "missing"
                reasons.append(f"{name}: {type(err).__name__}")
                unreachable = not isinstance(err, EntryNotFoundError) or isinstance(err, LocalEntryNotFoundError)
                if not offline and unreachable:
                    # The Hub is unreachable: look only in the cache from now on (each online try
                    # retries for ~20 s).
                    offline, tried_online = True, True
        else:
            mode = ("the Hub was unreachable (set HF_HUB_OFFLINE=1 to skip the attempt)" if tried_online else
                    "offline mode is on, so only the local cache was searched" if offline else "download failed")
            where = cache_dir or _hub_cache()
            local = f"no local file or folder at {path}, and " if path is not None else ""
            raise _missing(request, f"{local}Hub repository {repo!r} is not in the Hugging Face cache ({where}); "
                                    f"{mode} [{'; '.join(reasons)}]", None, hub_id=repo)
    return out


def _names(request: WeightsRequest) -> str:
    return ", ".join(" or ".join(alt) for alt in request.files)


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return "~/.cache/huggingface/hub"


def _missing(request: WeightsRequest, reason: str, path: Path | None, hub_id: str | None = None) -> MissingWeightsError:
    """The error that tells the user which files to fetch, from where, and where to put them."""
    hub_id = hub_id or request.hub_id
    lines = [f"{request.backend}: weights not found for {request.what}: {reason}.", "To fix it:"]
    if hub_id:
        folder = f"weights/{hub_id.split('/')[-1]}"
        lines.append(f"  - on a machine with internet run `hf download {hub_id} {' '.join(request.primary_files)} "
                     f"--local-dir {folder}` (needed: {_names(request)}), copy {folder} into the bundle folder and "
                     f"set {request.field} in bundle.json to {folder!r} (relative paths resolve against the bundle "
                     "folder);")
        lines.append(f"  - or fill the Hugging Face cache ({_hub_cache()}, or the component's cache_dir) with "
                     f"`hf download {hub_id}` and keep {request.field} as it is; without HF_HUB_OFFLINE / "
                     "local_files_only it downloads there itself when the Hub is reachable.")
    if request.url:
        dest = path if path is not None and path.suffix else Path(request.url).name
        lines.append(f"  - download {request.url} to {dest} and set {request.field} in bundle.json to that file.")
    if not hub_id and not request.url:
        where = path if path is not None else "a folder"
        lines.append(f"  - put {_names(request)} at {where}, or set {request.field} in bundle.json to where they are.")
    return MissingWeightsError("\n".join(lines))
