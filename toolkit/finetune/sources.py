"""Where training records come from: JSONL/JSON files, local tables (CSV, Parquet, Arrow) and HF hub datasets.

Each reader returns `(where, record)` pairs, `where` naming the file and line (or row) so a bad
record can be reported exactly; turning records into conversations is `toolkit.finetune.formats`' job.

  train.jsonl                one JSON object per line ("file:LINE")
  train.json                 a JSON array of objects ("file: record N")
  train.csv / .tsv           header row + rows; every value a string ("file:LINE", the row's last line)
  train.parquet / .arrow     pyarrow tables; .arrow is Arrow IPC, file or stream format (what
                             `datasets` writes) ("file: row N")
  hf:org/name[:split]        a hub dataset via `datasets.load_dataset` (split `train` by default),
                             refused in one line when the hub can't be reached
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from toolkit.core.errors import UserError

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow")


def is_hub_id(spec: str) -> bool:
    return str(spec).startswith(HF_PREFIX)


def parse_hub_id(spec: str, field: str = "data") -> tuple[str, str]:
    """`hf:org/name[:split]` → (repo id, split); split defaults to `train`."""
    body = spec[len(HF_PREFIX):]
    repo, _, split = body.partition(":")
    if not repo or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise UserError(f"{field}: {spec!r} is not a dataset id (expected hf:org/name or hf:org/name:split)")
    return repo, split or "train"


def read_records(spec: str | Path, field: str = "data", hub_timeout: float = 3.0) -> list[tuple[str, object]]:
    """All records of a file or `hf:` dataset as (where, record); UserError naming `field` or the file."""
    if is_hub_id(str(spec)):
        return _hub_records(str(spec), field, hub_timeout)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _table_records(path, _read_parquet)
    if suffix == ".arrow":
        return _table_records(path, _read_arrow)
    text = read_text(path)
    # A JSON array whatever the file is named (a .jsonl that holds one), as HF datasets' json loader reads it.
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        return [(f"{path}: record {i}", rec) for i, rec in enumerate(items, 1)]
    out = []
    # Only "\n" ends a line: splitlines() would also split inside strings at the U+2028, U+2029 and
    # U+0085 that JSON leaves unescaped (json.dumps(..., ensure_ascii=False), as recipe new writes).
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return out


def read_text(path: Path) -> str:
    """The file's text, every line ending made LF. A UTF-8 BOM (Notepad, Excel's "CSV UTF-8") is
    dropped; other encodings are refused naming the line of the first byte that isn't UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None


def _csv_records(path: Path, delimiter: str) -> list[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    out = []
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise UserError(f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells for "
                                f"{len(reader.fieldnames or [])} header columns")
            out.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k}))
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: bad CSV: {exc}") from None
    return out


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _read_arrow(path: Path):
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()
    except pa.ArrowInvalid:  # `datasets` writes the streaming format
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()


def _table_records(path: Path, read) -> list[tuple[str, object]]:
    try:
        table = read(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for unreadable files
        raise UserError(f"{path}: cannot read as a {path.suffix[1:]} table: {str(exc).splitlines()[0]}") from None
    return [(f"{path}: row {i}", rec) for i, rec in enumerate(table.to_pylist(), 1)]


def _hub_records(spec: str, field: str, hub_timeout: float) -> list[tuple[str, object]]:
    from toolkit.finetune.base_model import hub_reachable

    repo, split = parse_hub_id(spec, field)
    ok, why = hub_reachable(hub_timeout)
    if not ok:
        raise UserError(f"{field}: {HF_PREFIX}{repo} can't be loaded offline ({why})")
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, split=split)
    except ImportError:
        raise UserError(f"{field}: {spec} needs the `datasets` package (pip install datasets)") from None
    except Exception as exc:  # hub errors (not found, gated, bad split) come as many types
        raise UserError(f"{field}: {spec} can't be loaded: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return [(f"{spec} row {i}", rec) for i, rec in enumerate(ds, 1)]
