"""Exporting another quant into a folder that already holds an export: the new GGUF and its
Modelfile are added, README.md and export.json list every quant, and the existing GGUFs are
never touched without --force."""

from __future__ import annotations

import hashlib
import json

import pytest

from toolkit.cli import main
from toolkit.core.errors import UserError


def _record(name="m", quants=("q8_0",)):
    files = {q: f"{name}-{q}.gguf" for q in quants}
    mfs = {q: ("Modelfile" if i == 0 else f"Modelfile.{q}") for i, q in enumerate(quants)}
    return {"name": name, "quants": list(quants), "files": files, "modelfiles": mfs, "created": "2026-01-01",
            "fallback_notes": {q: "" for q in quants}, "seconds": {"total": 1.0},
            "verification": [{"quant": q, "old": True} for q in quants]}


def _folder(tmp_path, rec):
    out = tmp_path / "out"
    out.mkdir()
    for q in rec["quants"]:
        (out / rec["files"][q]).write_text(f"old {q}")
        (out / rec["modelfiles"][q]).write_text(f"FROM ./{rec['files'][q]}")
    (out / "README.md").write_text("old readme")
    (out / "export.json").write_text(json.dumps(rec))
    return out


def test_planned_files_keep_modelfile_for_the_first_quant():
    from toolkit.export.pipeline import planned_files

    assert planned_files("m", ["q8_0", "f16"]) == {
        "q8_0": "m-q8_0.gguf", "f16": "m-f16.gguf", "modelfile:q8_0": "Modelfile",
        "modelfile:f16": "Modelfile.f16", "readme": "README.md", "json": "export.json"}
    prev = _record("m", ("q8_0", "q4_k_m"))
    files = planned_files("m", ["f16", "q4_k_m"], prev)
    assert files["modelfile:f16"] == "Modelfile.f16"  # `Modelfile` stays q8_0's
    assert files["modelfile:q4_k_m"] == "Modelfile.q4_k_m"  # a re-export keeps its name
    # A previous export without a plain `Modelfile` (it was removed from the record): the new
    # first quant may take it.
    assert planned_files("m", ["f16"], {"modelfiles": {}})["modelfile:f16"] == "Modelfile"


def test_prepare_allows_a_new_quant_beside_an_export_and_refuses_an_existing_one(tmp_path):
    from toolkit.export.pipeline import _prepare_out_dir, planned_files, previous_export

    out = _folder(tmp_path, _record("m", ("q8_0",)))
    prev = previous_export(out, "m")
    assert prev["quants"] == ["q8_0"]
    assert _prepare_out_dir(out, planned_files("m", ["f16"], prev), force=False, previous=prev) is False
    with pytest.raises(UserError, match=r"m-q8_0\.gguf already exists \(use --force"):
        _prepare_out_dir(out, planned_files("m", ["f16", "q8_0"], prev), force=False, previous=prev)
    # Without an export record the README/export.json are someone else's: refused as before.
    (out / "export.json").unlink()
    with pytest.raises(UserError, match=r"out/Modelfile already exists"):
        _prepare_out_dir(out, planned_files("m", ["f16"], None), force=False)
    assert (out / "m-q8_0.gguf").read_text() == "old q8_0"


def test_previous_export_of_another_model_or_unreadable_is_refused(tmp_path):
    from toolkit.export.pipeline import previous_export

    out = _folder(tmp_path, _record("other", ("q8_0",)))
    with pytest.raises(UserError, match="holds an export of 'other', not 'm'; choose another --out"):
        previous_export(out, "m")
    (out / "export.json").write_text("{not json")
    with pytest.raises(UserError, match="export.json: unreadable export record.*--force"):
        previous_export(out, "m")
    assert previous_export(out, "m", force=True) is None
    assert previous_export(tmp_path / "missing", "m") is None


def test_previous_export_of_another_model_with_the_same_folder_name_is_refused(tmp_path):
    """exports/<folder name>/ is shared by every folder called `final`: the record's source_id
    tells them apart (a record from before it existed is taken by its name, as before)."""
    from toolkit.core.models import resolve
    from toolkit.export.pipeline import previous_export
    from toolkit.export.report import source_id

    a, b = tmp_path / "m1" / "final", tmp_path / "m2" / "final"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    ida, idb = source_id(resolve(str(a))), source_id(resolve(str(b)))
    assert ida != idb and ida == source_id(resolve(str(tmp_path / "m1" / ".." / "m1" / "final")))
    assert source_id(resolve("embedded")) == "embedded"
    out = _folder(tmp_path, {**_record("final"), "source_id": ida})
    with pytest.raises(UserError, match=f"holds an export of {ida}, not of {idb}.*choose another --out"):
        previous_export(out, "final", source=idb)
    assert previous_export(out, "final", source=ida)["source_id"] == ida
    (out / "export.json").write_text(json.dumps(_record("final")))
    assert previous_export(out, "final", source=idb) is not None


def test_merge_lists_every_quant_and_replaces_a_reexported_one():
    from toolkit.export.report import merge

    prev = _record("m", ("q8_0", "q4_k_m"))
    new = _record("m", ("f16", "q4_k_m"))
    new["created"] = "2026-02-02"
    new["modelfiles"] = {"f16": "Modelfile.f16", "q4_k_m": "Modelfile.q4_k_m"}
    new["verification"] = [{"quant": "f16", "old": False}, {"quant": "q4_k_m", "old": False}]
    m = merge(prev, new)
    assert m["quants"] == ["q8_0", "q4_k_m", "f16"]
    assert m["files"] == {"q8_0": "m-q8_0.gguf", "q4_k_m": "m-q4_k_m.gguf", "f16": "m-f16.gguf"}
    assert m["modelfiles"]["q8_0"] == "Modelfile" and m["modelfiles"]["f16"] == "Modelfile.f16"
    assert [(v["quant"], v["old"]) for v in m["verification"]] == [("q8_0", True), ("q4_k_m", False),
                                                                   ("f16", False)]
    assert m["history"] == [{"created": "2026-01-01", "quants": ["q8_0", "q4_k_m"]},
                            {"created": "2026-02-02", "quants": ["f16", "q4_k_m"]}]
    assert merge(m, _record("m", ("bf16",)))["history"][:2] == m["history"]  # history accumulates


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_adds_a_quant_to_an_existing_export(tmp_path, embedded_dir, capsys):
    out = tmp_path / "exp"
    assert main(["export", "embedded", "--quant", "q8_0", "--out", str(out)]) == 0
    q8 = out / "smollm2-135m-instruct-q8_0.gguf"
    before = (_sha(q8), q8.stat().st_mtime_ns, (out / "Modelfile").read_text())
    capsys.readouterr()

    assert main(["export", "embedded", "--quant", "f16", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "wrote smollm2-135m-instruct-f16.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "Modelfile", "Modelfile.f16", "README.md", "export.json", q8.name, "smollm2-135m-instruct-f16.gguf"])
    assert (_sha(q8), q8.stat().st_mtime_ns, (out / "Modelfile").read_text()) == before  # untouched
    assert (out / "Modelfile.f16").read_text().startswith("FROM ./smollm2-135m-instruct-f16.gguf")
    rec = json.loads((out / "export.json").read_text())
    assert rec["quants"] == ["q8_0", "f16"] and set(rec["files"]) == {"q8_0", "f16"}
    assert [v["quant"] for v in rec["verification"]] == ["q8_0", "f16"]
    assert [h["quants"] for h in rec["history"]] == [["q8_0"], ["f16"]]
    readme = (out / "README.md").read_text()
    assert "| q8_0 | `smollm2-135m-instruct-q8_0.gguf` | `Modelfile` |" in readme
    assert "| f16 | `smollm2-135m-instruct-f16.gguf` | `Modelfile.f16` |" in readme
    assert "Added f16" in readme

    # The existing quant again: refused without --force, nothing changed.
    assert main(["export", "embedded", "--quant", "q8_0", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert _sha(q8) == before[0] and json.loads((out / "export.json").read_text()) == rec
