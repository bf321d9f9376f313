"""FedSVDCallback's checkpoint A file (``fedsvd_lora_A.safetensors``) in one process: what on_save writes and where,
the run id that ties a file to its checkpoint, what on_train_begin / on_train_end write back (the DeepSpeed resume
state is simulated: the checkpoint's B next to the initial A), the warnings, and ``save_full_adapter``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings

import pytest
import torch
from test_fedsvd_callback import StopAt, _args
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
from transformers import Trainer, TrainerControl, TrainerState

from hf_svd_plugins.fedsvd import LORA_A_FILE, FedSVDCallback, freeze_lora_A, refactorize_lora_model
from hf_svd_plugins.lora import assign_lora_weights, find_lora_pairs, read_lora_weights


@contextlib.contextmanager
def warnings_as_list():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _train_with_checkpoints(out, max_steps=4, save_steps=2, every_n_steps=2, n=48, stop_at=None, resume=None, **kw):
    model = tiny_lora_model("llama", r=4)
    trainer = Trainer(
        model=model,
        args=_args(out, max_steps=max_steps, save_strategy="steps", save_steps=save_steps, **kw),
        train_dataset=TinyTokenDataset(n=n),
        data_collator=pad_collate,
        callbacks=[FedSVDCallback(every_n_steps=every_n_steps)] + ([StopAt(stop_at)] if stop_at else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _callback(trainer) -> FedSVDCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, FedSVDCallback))


def _resume_begin(callback, args, checkpoint, model):
    """``on_train_begin`` as the Trainer calls it on resume: after it loaded the checkpoint, with the checkpoint's
    ``trainer_state.json`` as the state."""
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    callback.on_train_begin(args, state, TrainerControl(), model=model)


def _as_deepspeed_resumes(checkpoint) -> torch.nn.Module:
    """A fresh model with the checkpoint's weights but the *initial* frozen A: what transformers' DeepSpeed resume
    (``exclude_frozen_parameters=True`` at save, ``load_module_strict=False`` at load) leaves."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = tiny_lora_model("llama", r=4)
    freeze_lora_A(model)
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    set_peft_model_state_dict(model, {k: v for k, v in saved.items() if "lora_A" not in k})
    return model


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture
def as_deepspeed(monkeypatch):
    """The callback believes it runs under DeepSpeed (where a missing A file matters, so it warns)."""
    import hf_svd_plugins.fedsvd.callback as callback_module

    monkeypatch.setattr(callback_module, "_under_deepspeed", lambda args: True)


def test_on_save_writes_a_and_resume_writes_it_back(tmp_path):
    """The checkpoint's A file holds the refactorized A of that step (equal to the A in PEFT's own adapter file) and
    the run id of the checkpoint's trainer_state.json; a model with the initial A and the checkpoint's B gets it back
    in on_train_begin, B untouched."""
    from safetensors.torch import load_file

    trainer = _train_with_checkpoints(tmp_path)
    run_id = _callback(trainer).run_id
    assert isinstance(run_id, str) and len(run_id) == 16
    final = read_lora_weights(find_lora_pairs(trainer.model))
    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}" / LORA_A_FILE
        assert _metadata(path)["global_step"] == str(step) and _metadata(path)["fedsvd_run_id"] == run_id
        state = TrainerState.load_from_json(str(tmp_path / f"checkpoint-{step}" / "trainer_state.json"))
        assert state.stateful_callbacks["FedSVDCallback"]["attributes"]["run_id"] == run_id
        saved = load_file(path)
        adapter = load_file(tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors")  # PEFT's own save
        assert set(saved) == {f"{name}.lora_A.weight" for name in final}
        for name in final:
            a = saved[f"{name}.lora_A.weight"]
            assert torch.equal(a, adapter[f"base_model.model.{name}.lora_A.weight"])
            torch.testing.assert_close(a.double() @ a.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not [f for f in os.listdir(tmp_path / "checkpoint-4") if f.endswith(".tmp")]
    model = _as_deepspeed_resumes(tmp_path / "checkpoint-4")
    before = read_lora_weights(find_lora_pairs(model))
    callback = FedSVDCallback(every_n_steps=2)
    _resume_begin(callback, trainer.args, tmp_path / "checkpoint-4", model)
    assert callback.run_id == run_id  # adopted from the resumed state
    restored = read_lora_weights(find_lora_pairs(model))
    for name, (a, b) in final.items():
        assert not torch.equal(before[name][0], a)  # the initial A
        assert torch.equal(restored[name][0], a)
        assert torch.equal(restored[name][1], b) and torch.equal(before[name][1], b)


def test_a_file_of_another_run_with_the_same_settings_is_refused(tmp_path, as_deepspeed):
    """Two runs that differ only by their seed: their ``sum ||B||^2`` at step 20 are 0.6% apart, inside the 1e-2 that
    used to be the only check, so run b's A file in run a's checkpoint was accepted (the review's repro: B @ A off by
    0.21). Each run now has its own id (even with the same seed: it is not drawn from the seeded ``random``), in its
    trainer_state.json and its A files, and a resume accepts only its own run's file."""
    runs = {seed: _train_with_checkpoints(tmp_path / str(seed), max_steps=40, save_steps=20, every_n_steps=10, n=400,
                                          stop_at=20, seed=seed) for seed in (0, 1)}
    ids = {seed: _callback(t).run_id for seed, t in runs.items()}
    assert ids[0] != ids[1]
    a_file = {seed: tmp_path / str(seed) / "checkpoint-20" / LORA_A_FILE for seed in runs}
    sums = [float(_metadata(a_file[seed])["lora_B_sum_of_squares"]) for seed in runs]
    assert abs(sums[0] - sums[1]) < 1e-2 * max(sums)  # the B check alone cannot tell the runs apart
    own = tmp_path / "own.safetensors"
    shutil.copy(a_file[0], own)
    shutil.copy(a_file[1], a_file[0])  # run 1's file in run 0's checkpoint folder
    model = _as_deepspeed_resumes(tmp_path / "0" / "checkpoint-20")
    initial = read_lora_weights(find_lora_pairs(model))
    callback = FedSVDCallback(every_n_steps=10)
    with pytest.warns(UserWarning, match=rf"written by another run \(FedSVD run id {ids[1]} there, {ids[0]} in the "
                                         r"resumed Trainer state\)"):
        _resume_begin(callback, runs[0].args, tmp_path / "0" / "checkpoint-20", model)
    after = read_lora_weights(find_lora_pairs(model))
    assert all(torch.equal(after[n][0], initial[n][0]) for n in initial)  # left alone, not run 1's A
    assert callback.run_id == ids[0]
    shutil.copy(own, a_file[0])
    with warnings_as_list() as caught:
        _resume_begin(FedSVDCallback(every_n_steps=10), runs[0].args, tmp_path / "0" / "checkpoint-20", model)
    assert not caught
    want = read_lora_weights(find_lora_pairs(runs[0].model))
    after = read_lora_weights(find_lora_pairs(model))
    assert all(torch.equal(after[n][0], want[n][0]) for n in want)


def test_a_resumed_run_keeps_its_run_id(tmp_path):
    """A real resume (Trainer.train(resume_from_checkpoint=...)) adopts the id of the checkpoint it resumes: the
    checkpoints it writes afterwards carry the same id as the ones before."""
    first = _train_with_checkpoints(tmp_path, stop_at=2)
    resumed = _train_with_checkpoints(tmp_path, resume=str(tmp_path / "checkpoint-2"))
    assert _callback(resumed).run_id == _callback(first).run_id
    assert _metadata(tmp_path / "checkpoint-4" / LORA_A_FILE)["fedsvd_run_id"] == _callback(first).run_id


def test_resume_without_a_usable_file_warns_under_deepspeed_only(tmp_path, monkeypatch):
    """No file (a checkpoint from before the fix), or a file from another step: A is left alone, and under DeepSpeed
    a warning says what that means."""
    import hf_svd_plugins.fedsvd.callback as callback_module

    trainer = _train_with_checkpoints(tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    model = _as_deepspeed_resumes(checkpoint)
    initial = read_lora_weights(find_lora_pairs(model))
    (checkpoint / LORA_A_FILE).unlink()
    with warnings_as_list() as caught:
        _resume_begin(FedSVDCallback(every_n_steps=2), trainer.args, checkpoint, model)
    assert not caught  # one process: the Trainer's adapter checkpoint restored A itself
    monkeypatch.setattr(callback_module, "_under_deepspeed", lambda args: True)
    with pytest.warns(UserWarning, match=r"step 2 under DeepSpeed.*checkpoint-2/fedsvd_lora_A.safetensors does not "
                                         r"exist.*the one the model was created with"):
        _resume_begin(FedSVDCallback(every_n_steps=2), trainer.args, checkpoint, model)
    (tmp_path / "checkpoint-4" / LORA_A_FILE).rename(checkpoint / LORA_A_FILE)
    with pytest.warns(UserWarning, match="was written at step 4, not at the resumed step 2"):
        _resume_begin(FedSVDCallback(every_n_steps=2), trainer.args, checkpoint, model)
    after = read_lora_weights(find_lora_pairs(model))
    assert all(torch.equal(after[n][0], initial[n][0]) for n in initial)


def test_no_missing_file_warning_before_the_first_refactorization(tmp_path, as_deepspeed):
    """Resuming at a step before the first refactorization (step 1 with every_n_steps=2): A is still the initial A,
    which the model was created with, so a missing file is no reason to warn (it used to)."""
    trainer = _train_with_checkpoints(tmp_path, max_steps=2, save_steps=1)
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / LORA_A_FILE).unlink()
    with warnings_as_list() as caught:
        _resume_begin(FedSVDCallback(every_n_steps=2), trainer.args, tmp_path / "checkpoint-1",
                      _as_deepspeed_resumes(tmp_path / "checkpoint-1"))
    assert not [w for w in caught if "FedSVDCallback" in str(w.message)]
    with pytest.warns(UserWarning, match="step 2 under DeepSpeed"):  # after the refactorization at step 2 it matters
        _resume_begin(FedSVDCallback(every_n_steps=2), trainer.args, tmp_path / "checkpoint-2",
                      _as_deepspeed_resumes(tmp_path / "checkpoint-2"))


def test_on_save_writes_only_into_the_checkpoint_just_saved(tmp_path, caplog):
    """Under hyperparameter search the Trainer saves into output_dir/run-<trial>/checkpoint-N, which callbacks are not
    told: on_save used to write into output_dir/checkpoint-N, an unrelated old checkpoint if one exists. It now skips
    with one warning, and otherwise writes only into a folder whose trainer_state.json records this step and run."""
    old = _train_with_checkpoints(tmp_path)  # an earlier run's checkpoints in output_dir
    old_file = {step: (tmp_path / f"checkpoint-{step}" / LORA_A_FILE).read_bytes() for step in (2, 4)}
    model = tiny_lora_model("llama", r=4)
    freeze_lora_A(model)
    callback = FedSVDCallback(every_n_steps=2)
    callback.on_train_begin(old.args, TrainerState(global_step=0), TrainerControl(), model=model)  # a new run
    with caplog.at_level(logging.WARNING, logger="hf_svd_plugins.fedsvd.callback"):
        for step in (2, 4):
            state = TrainerState(global_step=step, is_hyper_param_search=True)
            callback.on_save(old.args, state, TrainerControl(), model=model)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "hyperparameter_search" in messages[0]  # once, not at every save
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_svd_plugins.fedsvd.callback"):
        callback.on_save(old.args, TrainerState(global_step=2), TrainerControl(), model=model)  # not this run's
        assert "records FedSVD run id" in caplog.records[-1].getMessage()
        shutil.copy(tmp_path / "checkpoint-4" / "trainer_state.json", tmp_path / "checkpoint-2")
        _callback(old).on_save(old.args, TrainerState(global_step=2), TrainerControl(), model=model)  # other step
        assert "records step 4, not the saved step 2" in caplog.records[-1].getMessage()
        shutil.rmtree(tmp_path / "checkpoint-4")
        callback.on_save(old.args, TrainerState(global_step=4), TrainerControl(), model=model)
        assert "not found" in caplog.records[-1].getMessage()
    assert (tmp_path / "checkpoint-2" / LORA_A_FILE).read_bytes() == old_file[2]
    assert not (tmp_path / "checkpoint-4").exists()


def test_a_file_is_written_through_a_temporary_name_of_this_process(tmp_path, monkeypatch):
    """Writers on several nodes (save_on_each_node on a shared filesystem) must not share a temporary file name."""
    from hf_svd_plugins.fedsvd.callback import write_lora_A_file

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((str(src), str(dst))), real_replace(src, dst)))
    write_lora_A_file(find_lora_pairs(tiny_lora_model("llama", r=4)), str(tmp_path), 3)
    ((src, dst),) = renames
    assert dst == str(tmp_path / LORA_A_FILE) and src.endswith(f".0-{os.getpid()}.tmp")
    assert os.listdir(tmp_path) == [LORA_A_FILE]


def test_resume_reads_training_arguments_resume_from_checkpoint_first(tmp_path):
    """A checkpoint moved elsewhere is found through ``TrainingArguments.resume_from_checkpoint`` (the only route:
    the path given to ``train()`` does not reach callbacks); a file that does not fit the model is an error."""
    from safetensors.torch import load_file, save_file

    _train_with_checkpoints(tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", moved)
    args = _args(tmp_path / "elsewhere", resume_from_checkpoint=str(moved))
    model = _as_deepspeed_resumes(moved)
    _resume_begin(FedSVDCallback(every_n_steps=2), args, moved, model)
    saved = load_file(moved / LORA_A_FILE)
    for pair in find_lora_pairs(model):
        assert torch.equal(pair.A.detach(), saved[f"{pair.name}.lora_A.weight"])
    save_file({k: v[:2] for k, v in saved.items()}, moved / LORA_A_FILE, metadata=_metadata(moved / LORA_A_FILE))
    with pytest.raises(ValueError, match="does not fit the model's LoRA pairs.*wrong shape.*same LoraConfig"):
        _resume_begin(FedSVDCallback(every_n_steps=2), args, moved, model)


def test_load_best_model_at_end_gets_the_best_checkpoints_a(tmp_path):
    """``load_best_model_at_end`` under DeepSpeed loads the best checkpoint's B but keeps the last A (frozen parameters
    are not in the checkpoint); on_train_end, which runs after that load, writes the best checkpoint's A back."""
    from safetensors.torch import load_file

    trainer = _train_with_checkpoints(tmp_path)
    last = read_lora_weights(find_lora_pairs(trainer.model))
    model = _as_deepspeed_resumes(tmp_path / "checkpoint-2")
    assign_lora_weights(find_lora_pairs(model), {n: (a, None) for n, (a, _) in last.items()})  # the last A
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True)
    state = TrainerState(global_step=4, best_model_checkpoint=str(tmp_path / "checkpoint-2"), best_global_step=2)
    callback = _callback(trainer)  # the run's own callback (its run id)
    callback.on_train_end(args, state, TrainerControl(), model=model)
    best = load_file(tmp_path / "checkpoint-2" / LORA_A_FILE)
    for pair in find_lora_pairs(model):
        assert not torch.equal(best[f"{pair.name}.lora_A.weight"], last[pair.name][0])
        assert torch.equal(pair.A.detach(), best[f"{pair.name}.lora_A.weight"])


def test_save_full_adapter_equals_peft_save_pretrained(tmp_path):
    """One process (nothing sharded): the same files as PEFT's own save, frozen A and a modules_to_save head
    included, loadable with PeftModel.from_pretrained; with a Trainer it also writes what save_model writes."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny import tiny_model

    from hf_svd_plugins.fedsvd import save_full_adapter

    model = tiny_lora_model("bert", r=4)
    freeze_lora_A(model)
    refactorize_lora_model(model)
    model.save_pretrained(tmp_path / "peft")
    save_full_adapter(model, str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "peft"))
    want, got = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(got) == set(want) and any("lora_A" in k for k in got) and any("modules_to_save" in k or "classifier" in k
                                                                              for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    reloaded = PeftModel.from_pretrained(tiny_model("bert"), str(tmp_path / "ours"))
    ref = read_lora_weights(find_lora_pairs(model))
    for pair in find_lora_pairs(reloaded):
        assert torch.equal(pair.A.detach(), ref[pair.name][0])
    trainer = Trainer(model=model, args=_args(tmp_path / "t"))
    save_full_adapter(trainer, str(tmp_path / "viatrainer"))
    assert (tmp_path / "viatrainer" / "training_args.bin").is_file()
    assert set(load_file(tmp_path / "viatrainer" / "adapter_model.safetensors")) == set(want)
    with pytest.raises(TypeError, match="a transformers Trainer or a PEFT model"):
        save_full_adapter("model", str(tmp_path / "x"))


def test_save_full_adapter_never_leaves_a_half_written_adapter_file(tmp_path, monkeypatch):
    """A Hub upload or a reader of the folder must see the old adapter file or the new one, never one being written:
    PEFT writes into a temporary folder, and the files are renamed into place."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_svd_plugins.fedsvd import save_full_adapter

    model = tiny_lora_model("llama", r=4)
    refactorize_lora_model(model)
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"the previous adapter")
    seen_during_save = []
    real_save = PeftModel.save_pretrained

    def spy(self, save_directory, *args, **kwargs):
        real_save(self, save_directory, *args, **kwargs)
        seen_during_save.append((target / "adapter_model.safetensors").read_bytes())

    monkeypatch.setattr(PeftModel, "save_pretrained", spy)
    save_full_adapter(model, str(target))
    assert seen_during_save == [b"the previous adapter"]
    assert sorted(os.listdir(target)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(target / "adapter_model.safetensors")
    want = read_lora_weights(find_lora_pairs(model))
    assert all(torch.equal(saved[f"base_model.model.{n}.lora_A.weight"], a) for n, (a, _) in want.items())



class FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` inside transformers.trainer: records, at each upload, the files the
    background upload would read."""

    def __init__(self):
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, **kwargs):
        from concurrent.futures import Future

        from safetensors.torch import load_file

        a_file = os.path.join(folder_path, LORA_A_FILE)
        self.uploads.append({
            "path_in_repo": path_in_repo, "files": set(os.listdir(folder_path)),
            "a": load_file(a_file) if os.path.isfile(a_file) else None,
            "step": _metadata(a_file)["global_step"] if os.path.isfile(a_file) else None,
        })
        done = Future()
        done.set_result(None)
        return done


def test_pushed_checkpoints_hold_the_a_file(tmp_path, monkeypatch):
    """The Trainer uploads a checkpoint (``_save_checkpoint`` -> ``_push_from_checkpoint``) before on_save runs, so
    the pushed checkpoint had no A file. The callback now gathers A in on_step_end once a save is announced and writes
    it in on_push_begin, after the checkpoint is on disk and before the upload starts."""
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer = _train_with_checkpoints(tmp_path, push_to_hub=True, hub_strategy="checkpoint")
    pushed = [u for u in hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert [u["step"] for u in pushed] == ["2", "4"]
    final = read_lora_weights(find_lora_pairs(trainer.model))
    assert all(torch.equal(pushed[-1]["a"][f"{n}.lora_A.weight"], a) for n, (a, _) in final.items())
    assert _metadata(tmp_path / "checkpoint-4" / LORA_A_FILE)["fedsvd_run_id"] == _callback(trainer).run_id
    assert all("adapter_model.safetensors" in u["files"] for u in hub.uploads)
    short = _train_with_checkpoints(tmp_path / "short", max_steps=2, push_to_hub=True, hub_strategy="checkpoint")
    first_id = _callback(short).run_id
    short.train()  # the same Trainer and callback from step 0 again: a new run, whose step 2 the last one gathered
    assert _callback(short).run_id != first_id
    assert _metadata(tmp_path / "short" / "checkpoint-2" / LORA_A_FILE)["fedsvd_run_id"] == _callback(short).run_id


def test_push_under_zero3_rewrites_the_pushed_adapter_and_warns_about_the_final_push(tmp_path, monkeypatch):
    """ZeRO-3 simulated (every A counts as partitioned): the adapter gathered before the save is written into the
    checkpoint before its upload; Trainer.push_to_hub() at the end would still save without A, which is said once."""
    import transformers.trainer
    from safetensors.torch import load_file

    import hf_svd_plugins.fedsvd.callback as callback_module

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    monkeypatch.setattr(callback_module, "is_zero3_param", lambda p: True)
    written = []
    real = callback_module.save_adapter_state_dict
    monkeypatch.setattr(callback_module, "save_adapter_state_dict",
                        lambda model, folder, state: (written.append(os.path.basename(folder)), real(model, folder, state)))
    with pytest.warns(UserWarning, match=r"push_to_hub under ZeRO-3.*Trainer.push_to_hub\(\) saves the adapter through "
                                         r"save_model.*save_full_adapter\(trainer, d\)"):
        trainer = _train_with_checkpoints(tmp_path, push_to_hub=True, hub_strategy="checkpoint")
    assert written == ["checkpoint-2", "checkpoint-4"]  # once each, from the gathered state (on_save did not redo it)
    adapter = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    final = read_lora_weights(find_lora_pairs(trainer.model))
    assert all(torch.equal(adapter[f"base_model.model.{n}.lora_A.weight"], a) for n, (a, _) in final.items())
