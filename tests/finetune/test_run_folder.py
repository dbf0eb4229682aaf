"""The run folder's life on disk: naming, finding a run to resume, renames that never leave half files."""

import json
import os
from pathlib import Path

import pytest

from toolkit.core.errors import UserError
from toolkit.finetune import recipe as recipe_mod
from toolkit.finetune import run_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rec():
    return recipe_mod.load(ROOT / "recipes" / "finance", gpu=False)


def _checkpoint(stage: Path, step: int, complete: bool = True) -> Path:
    ck = stage / "checkpoints" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    if complete:
        (ck / "trainer_state.json").write_text("{}")
    return ck


def test_new_stages_in_the_same_second_get_distinct_names(tmp_path, rec, monkeypatch):
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20260101-000000")
    a = run_folder.open_stage(tmp_path, rec, resume=False)
    b = run_folder.open_stage(tmp_path, rec, resume=False)
    assert a.name == "finance-20260101-000000.incomplete"
    assert b.name == "finance-20260101-000000-2.incomplete"
    # A finished run of that name counts too: its stage would otherwise be renamed onto it.
    a.rename(run_folder.final_path(tmp_path, a))
    b.rename(run_folder.final_path(tmp_path, b))
    c = run_folder.open_stage(tmp_path, rec, resume=False)
    assert c.name == "finance-20260101-000000-3.incomplete"
    assert recipe_mod.dump(rec) == (c / "recipe.yaml").read_text() and (c / "INCOMPLETE").is_file()


def test_latest_checkpoint_orders_steps_as_numbers_and_skips_partial_ones(tmp_path):
    assert run_folder.latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 9)
    want = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 40, complete=False)  # killed while saving: no trainer_state.json yet
    assert run_folder.latest_checkpoint(tmp_path) == want


def test_training_done_reads_the_checkpoint_state(tmp_path):
    """A run of steps ends at the recipe's max_steps; a run of epochs at the count the Trainer recorded."""
    ck = _checkpoint(tmp_path, 6)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 8}))
    assert run_folder.training_done(ck, 6) and not run_folder.training_done(ck, 7)
    assert not run_folder.training_done(ck, -1)  # epochs: 6 of the 8 steps they make
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 8, "max_steps": 8}))
    assert run_folder.training_done(ck, -1)
    assert not run_folder.training_done(_checkpoint(tmp_path / "other", 3), -1)  # no state recorded: resume


def test_resume_errors_name_what_is_missing(tmp_path, rec, monkeypatch):
    with pytest.raises(UserError, match="no interrupted run of finance"):
        run_folder.open_stage(tmp_path, rec, resume=True)
    stage = run_folder.open_stage(tmp_path, rec, resume=False)
    with pytest.raises(UserError, match="has no checkpoint to resume from"):
        run_folder.open_stage(tmp_path, rec, resume=True)
    _checkpoint(stage, 3)
    assert run_folder.open_stage(tmp_path, rec, resume=True) == stage
    assert run_folder.open_stage(tmp_path, rec, resume=str(stage)) == stage
    changed = recipe_mod.load(ROOT / "recipes" / "finance", ["training.seed=7"], gpu=False)
    with pytest.raises(UserError, match="the recipe differs"):
        run_folder.open_stage(tmp_path, changed, resume=True)


def test_resume_from_a_missing_folder_names_it(tmp_path, rec):
    gone = tmp_path / "nonexistent"
    with pytest.raises(UserError) as exc:
        run_folder.open_stage(tmp_path / "runs", rec, resume=str(gone))
    assert str(exc.value).startswith(f"--resume {gone}: no such run folder")
    assert not (tmp_path / "runs").exists()


def test_resumed_elsewhere_finishes_beside_latest(tmp_path):
    stage = tmp_path / "elsewhere" / "finance-20260101-000000.incomplete"
    assert run_folder.final_path(tmp_path / "runs", stage) == tmp_path / "runs" / "finance-20260101-000000"


def test_symlink_and_json_are_replaced_whole(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "latest"
    run_folder.atomic_symlink(link, "a")
    run_folder.atomic_symlink(link, "b")
    assert os.readlink(link) == "b"
    run_folder.write_json(tmp_path / "run.json", {"steps": 1})
    run_folder.write_json(tmp_path / "run.json", {"steps": 2})
    assert json.loads((tmp_path / "run.json").read_text()) == {"steps": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest", "run.json"]


def test_weights_are_recognised_for_adapters_and_full_models(tmp_path):
    assert not run_folder.has_weights(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_folder.has_weights(tmp_path)


def test_unwritable_output_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"output dir {blocker / 'runs'} is not writable"):
        run_folder.check_writable(blocker / "runs")


def test_finish_renames_drops_checkpoints_and_points_latest(tmp_path, rec):
    first = run_folder.finish(tmp_path, _stage_with_checkpoint(tmp_path, rec))
    stage = _stage_with_checkpoint(tmp_path, rec)
    (stage / "adapter").mkdir()
    final = run_folder.finish(tmp_path, stage)
    assert final == run_folder.final_path(tmp_path, stage) and not stage.exists() and first.is_dir()
    assert sorted(p.name for p in final.iterdir()) == ["adapter", "recipe.yaml"]
    assert (tmp_path / "latest").resolve() == final.resolve()


def _stage_with_checkpoint(runs: Path, rec) -> Path:
    stage = run_folder.open_stage(runs, rec, resume=False)
    _checkpoint(stage, 3)
    return stage


def test_a_run_finishes_where_no_symlink_can_be_made(tmp_path, rec, monkeypatch, capsys):
    """Windows makes symbolic links only in Developer Mode or as admin: the run is finished and
    whole without `runs/latest`, and an older `latest` no longer claims to be the newest."""
    first = run_folder.finish(tmp_path, _stage_with_checkpoint(tmp_path, rec))

    def refused(self, target, target_is_directory=False):
        raise OSError(1314, "A required privilege is not held by the client")

    monkeypatch.setattr(Path, "symlink_to", refused)
    final = run_folder.finish(tmp_path, _stage_with_checkpoint(tmp_path, rec))
    assert final.is_dir() and first.is_dir() and not (tmp_path / "latest").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, final.name])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'latest'} not updated" in err and str(final) in err


def test_latest_is_a_folder_link_replaced_as_windows_allows(tmp_path, rec, monkeypatch):
    """Windows (Developer Mode) enters a link to a folder only if it was made as one, and renames
    nothing onto an existing folder link."""
    kinds = []
    symlink_to, replace = Path.symlink_to, os.replace

    def recording(self, target, target_is_directory=False):
        kinds.append(target_is_directory)
        symlink_to(self, target, target_is_directory)

    def windows_replace(src, dst):
        if Path(dst).is_symlink():
            raise PermissionError(5, "Access is denied")
        replace(src, dst)

    monkeypatch.setattr(Path, "symlink_to", recording)
    monkeypatch.setattr(os, "replace", windows_replace)
    run_folder.finish(tmp_path, _stage_with_checkpoint(tmp_path, rec))
    final = run_folder.finish(tmp_path, _stage_with_checkpoint(tmp_path, rec))
    assert (tmp_path / "latest").resolve() == final.resolve() and kinds and all(kinds)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")]


def test_run_files_are_utf8_whatever_the_locale(tmp_path):
    """report.md holds "±" and the user's own text: in the locale's encoding (Windows: cp1252) it
    would be mangled, or not written at all."""
    from tests.ascii_locale import run_python

    text = "0.42 ± 0.01 · café 利息\n"
    proc = run_python("import sys\nfrom pathlib import Path\nfrom toolkit.finetune import run_folder\n"
                      f"run_folder.write_text(Path(sys.argv[1]), {ascii(text)})", str(tmp_path / "r.md"))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == text
