"""Byte sizes. GPU makers' "GB" is GiB (a "12GB" RTX 3060 has 12288 MiB), and so is ours."""

MIB = 1024**2
GIB = 1024**3


def gib(n_bytes: float, digits: int = 2) -> str:
    """`n_bytes` as "1.23 GiB"."""
    return f"{n_bytes / GIB:.{digits}f} GiB"
