"""Sizes and their conversions: the one checked place where units change.

Every quantity in balloonist carries its unit in its name (``memory_bytes``,
``target_pages``, ``period_s``). Conversions between bytes and pages, and parsing of
user-written sizes such as ``"512MiB"``, happen only here, and they refuse to guess:
a size without a unit, a fraction of a byte, or a byte count that is not a whole
number of pages where pages are required raises :class:`SizeError`.
"""

from __future__ import annotations

import re
from typing import Final

from balloonist.errors import SizeError

#: x86 base page; what Linux guests, virtio-balloon and the simulator all count in.
PAGE_SIZE_BYTES: Final = 4096

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB
TIB: Final = 1024 * GIB

_UNIT_BYTES: Final[dict[str, int]] = {
    "b": 1,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "tib": TIB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": KIB,
    "m": MIB,
    "g": GIB,
    "t": TIB,
}

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$")

#: Largest size we accept anywhere (1 PiB): far above any host, small enough for int64.
MAX_SIZE_BYTES: Final = 1024 * TIB


def parse_size_bytes(text: str) -> int:
    """Parse ``"512MiB"``, ``"2GiB"``, ``"1.5G"`` into bytes. A unit is required.

    ``K/M/G/T`` alone mean binary units, as in QEMU's ``-m``; ``KB/MB/GB`` are decimal.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
            raise SizeError(f"size {text.strip()!r} has no unit (write e.g. '{text.strip()}MiB')")
        raise SizeError(f"{text!r} is not a size (write e.g. '512MiB' or '2GiB')")
    number, unit = match.groups()
    multiplier = _UNIT_BYTES.get(unit.lower())
    if multiplier is None:
        raise SizeError(f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, TiB)")
    value = float(number) * multiplier if "." in number else int(number) * multiplier
    if isinstance(value, float):
        if not value.is_integer():
            raise SizeError(f"{text!r} is not a whole number of bytes")
        value = int(value)
    if value > MAX_SIZE_BYTES:
        raise SizeError(f"{text!r} is larger than the largest size accepted (1TiB x 1024)")
    return value


def parse_size_option(text: str | None, flag: str) -> int | None:
    """A command-line size option (``--min 512MiB``): None if not given; bad input is
    a SizeError naming the flag."""
    if text is None:
        return None
    try:
        return parse_size_bytes(text)
    except SizeError as exc:
        raise SizeError(exc.message, where=flag) from None


def format_size(size_bytes: int) -> str:
    """Render bytes for people: ``268435456 -> '256MiB'``, ``1610612736 -> '1.5GiB'``."""
    sign = "-" if size_bytes < 0 else ""
    magnitude = abs(size_bytes)
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if magnitude >= factor:
            value = magnitude / factor
            text = f"{value:.0f}" if value.is_integer() else f"{value:.1f}"
            return f"{sign}{text}{unit}"
    return f"{sign}{magnitude}B"


def bytes_to_pages(size_bytes: int) -> int:
    """Exact conversion; a byte count that is not whole pages is an error, not a rounding."""
    if size_bytes < 0:
        raise SizeError(f"negative size {size_bytes} bytes")
    pages, rest = divmod(size_bytes, PAGE_SIZE_BYTES)
    if rest:
        raise SizeError(
            f"{format_size(size_bytes)} is not a whole number of {PAGE_SIZE_BYTES}-byte pages"
        )
    return pages


def bytes_to_pages_floor(size_bytes: int) -> int:
    """Whole pages that fit in ``size_bytes`` (for budgets, where rounding down is safe)."""
    if size_bytes < 0:
        raise SizeError(f"negative size {size_bytes} bytes")
    return size_bytes // PAGE_SIZE_BYTES


def pages_to_bytes(pages: int) -> int:
    if pages < 0:
        raise SizeError(f"negative page count {pages}")
    return pages * PAGE_SIZE_BYTES
