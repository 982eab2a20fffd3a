"""Reading untrusted `.npz` files with every size checked before anything is inflated.

`numpy.load` trusts the file: it inflates whatever a zip member holds and
allocates whatever a `.npy` header declares, so a 2 MB file can inflate to
2 GiB and a 100-byte header can claim 2^40 rows. Here the zip directory, each
member's declared sizes and each `.npy` header are checked against the limits
in `edgeslim.storage.limits` first; object arrays (whose data is a pickle, and
unpickling runs code) are refused from the header alone; and only then are the
bytes read, in bounded chunks, into an array of the size already proven.
"""

from __future__ import annotations

import io
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy

from edgeslim.errors import BadInput
from edgeslim.storage import limits

#: A dataset holds one array per model input plus labels; thousands means a hostile file.
MAX_ARRAYS = 1024
#: The zip central directory is ~50 bytes plus the name per array. zipfile reads it
#: whole and builds an object per entry, so it is bounded before zipfile opens the file.
MAX_DIRECTORY_BYTES = 1024 * 1024
#: numpy's own cap on a `.npy` header (`max_header_size`), applied before the header is read.
MAX_HEADER_BYTES = 10_000
#: bool, signed and unsigned integers, floats and complex: what a model input or label can be.
NUMERIC_KINDS = "biufc"
_CHUNK = 16 * 1024 * 1024
# Everything zipfile, zlib and numpy's header parser raise on a malformed file.
# (Encrypted members, which zipfile reports as RuntimeError, are refused beforehand.)
_MALFORMED = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    struct.error,
    OverflowError,
    # numpy parses the .npy header as a Python literal (ast, then tokenize on failure).
    SyntaxError,
    tokenize.TokenError,
)


@dataclass(frozen=True)
class Member:
    """One `.npy` array in the zip, as its header declares it."""

    name: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int
    """Where the array's bytes start inside the member (after magic and header)."""


def read_npz(
    path: Path, where: str, *, rows: int | None = None, skip: Container[str] = ()
) -> dict[str, np.ndarray]:
    """Every array of the `.npz` by name (or only its first `rows` rows), `skip` left unread.

    Every array's header is checked, read or not. BadInput names the file and
    what is wrong with it; nothing is allocated beyond what the limits allow.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            _check_directory(f, where)
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                members = _members(zf, size, where)
                return {m.name: _read(zf, m, rows, where) for m in members if m.name not in skip}
    except BadInput:
        raise
    except RecursionError as exc:
        raise BadInput(f"dataset {where}: not a readable .npz ({exc})") from exc
    except _MALFORMED as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise BadInput(f"dataset {where}: not a readable .npz ({reason})") from exc


def zip_directory(f: BinaryIO) -> tuple[int, int] | None:
    """(entries, directory bytes) the zip's end record declares; None if it is not a zip.

    Read before `zipfile.ZipFile` is opened, which reads the whole central
    directory and builds an object per entry: the caller bounds both first.
    """
    # zipfile._EndRecData is the very routine ZipFile.__init__ uses to find the
    # directory (zip64 included), so the figures checked are the ones it acts on next.
    end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    if end is None:
        return None
    return end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]


def _check_directory(f: BinaryIO, where: str) -> None:
    """Bound the zip's central directory before zipfile reads it whole."""
    declared = zip_directory(f)
    if declared is None:
        raise BadInput(
            f"dataset {where}: not a zip archive (an .npz is a zip of .npy arrays, "
            "as numpy.savez writes)"
        )
    entries, directory = declared
    if entries > MAX_ARRAYS or directory > MAX_DIRECTORY_BYTES:
        raise BadInput(
            f"dataset {where}: the zip declares {entries} entries in a {directory}-byte "
            f"directory; a dataset holds at most {MAX_ARRAYS} arrays"
        )


def _members(zf: zipfile.ZipFile, file_size: int, where: str) -> list[Member]:
    """Every member's declared sizes and header, checked against the limits."""
    infos = zf.infolist()
    if not infos:
        raise BadInput(f"dataset {where}: the .npz holds no arrays")
    if len(infos) > MAX_ARRAYS:
        raise BadInput(f"dataset {where}: {len(infos)} entries; at most {MAX_ARRAYS} arrays")
    limit = limits.max_dataset_bytes()
    total = 0
    names: set[str] = set()
    for info in infos:
        if info.flag_bits & 0x1:
            raise BadInput(f"dataset {where}: {info.filename!r} is encrypted")
        if not info.filename.endswith(".npy"):  # also refuses directories and empty names
            raise BadInput(f"dataset {where}: {info.filename!r} is not a .npy array")
        total += info.file_size
        if total > limit:
            raise BadInput(
                f"dataset {where}: the arrays inflate to more than "
                f"{limits.human_bytes(limit)} (the zip declares {total} bytes by "
                f"{info.filename!r}); set {limits.MAX_DATASET_BYTES_ENV} to raise the limit"
            )
    ratio = limits.max_dataset_compression_ratio()
    if total > limits.DATASET_RATIO_FLOOR and total > ratio * max(file_size, 1):
        raise BadInput(
            f"dataset {where}: {limits.human_bytes(file_size)} inflate to "
            f"{limits.human_bytes(total)} ({total // max(file_size, 1)}x, more than "
            f"{ratio}x): refused as a zip bomb; set "
            f"{limits.MAX_DATASET_COMPRESSION_RATIO_ENV} to raise the limit"
        )
    members = []
    for info in infos:
        member = _header(zf, info, where)
        if member.name in names:
            raise BadInput(f"dataset {where}: array {member.name!r} appears twice")
        names.add(member.name)
        members.append(member)
    return members


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Member:
    """The `.npy` header of one member, parsed without reading the array."""
    name = info.filename.removesuffix(".npy")
    with zf.open(info) as f:
        # magic (6) + version (2) + header length (2 or 4) + header: read only that much.
        head = io.BytesIO(f.read(min(info.file_size, 12 + MAX_HEADER_BYTES)))
    version = npy.read_magic(head)
    if version == (1, 0):
        shape, fortran_order, dtype = npy.read_array_header_1_0(head, MAX_HEADER_BYTES)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy.read_array_header_2_0(head, MAX_HEADER_BYTES)
    else:
        raise BadInput(f"dataset {where}: array {name!r} has .npy format {version}, not 1.0/2.0")
    if dtype.hasobject:
        raise BadInput(
            f"dataset {where}: array {name!r} holds Python objects (dtype {dtype}); loading "
            "them would unpickle code from the file, so edgeslim refuses it. Save numeric "
            "arrays only"
        )
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise BadInput(
            f"dataset {where}: array {name!r} has dtype {dtype}; expected a numeric array"
        )
    if any(d < 0 for d in shape):
        raise BadInput(f"dataset {where}: array {name!r} declares a negative dimension {shape}")
    count = 1
    for d in shape:
        count *= d  # Python ints: a lying header cannot overflow this
    declared = count * dtype.itemsize
    stored = info.file_size - head.tell()
    if declared != stored:
        raise BadInput(
            f"dataset {where}: array {name!r} declares shape {list(shape)} {dtype} "
            f"({declared} bytes) but the file holds {stored} bytes of data"
        )
    return Member(name, info, tuple(shape), dtype, fortran_order, head.tell())


def _read(zf: zipfile.ZipFile, m: Member, rows: int | None, where: str) -> np.ndarray:
    """The member's array (its first `rows` rows for C-ordered arrays of rank >= 1)."""
    shape = m.shape
    if rows is not None and shape and not m.fortran_order:
        shape = (min(rows, shape[0]), *shape[1:])
    count = 1
    for d in shape:
        count *= d
    buffer = np.empty(count * m.dtype.itemsize, dtype=np.uint8)
    view = memoryview(buffer)
    with zf.open(m.info) as f:
        f.seek(m.data_offset)
        done = 0
        while done < len(buffer):
            got = f.readinto(view[done : done + _CHUNK])
            if not got:
                raise BadInput(f"dataset {where}: array {m.name!r} is truncated")
            done += got
    array = buffer.view(m.dtype)
    if m.fortran_order:
        array = array.reshape(shape[::-1]).transpose()
        return array[:rows].copy() if rows is not None and shape else array
    return array.reshape(shape)
