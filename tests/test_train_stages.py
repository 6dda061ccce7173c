"""Training in stages (llark/train/stages.py): each stage's config from the run's, validated before any
work; a two-stage run under DeepSpeed, killed inside each stage and between them and resumed, gives
the uninterrupted run's losses in both stages; mixtures and validation under DeepSpeed (slow)."""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import write_shards  # noqa: E402
from test_train import DIM, kill_when_logged, losses, run_train, train_args  # noqa: E402

from llark.train import TrainConfigError, load_config  # noqa: E402
from llark.train.stages import stage_configs  # noqa: E402

TWO_STAGES = [
    {"name": "connector", "model": {"mode": "projector"}, "data": {"task_families": ["understanding"]},
     "optim": {"max_steps": 6, "warmup_steps": 1, "projector_lr": 1e-2}},
    {"name": "instruct", "model": {"mode": "lora", "lora": {"r": 4}}, "optim": {"max_steps": 8, "warmup_steps": 1}},
]


def test_each_stage_is_the_runs_settings_with_its_own_written_over_them():
    cfg = load_config(None, {"data.shards": ["shards"], "output_dir": "runs/x", "optim.lr": 3e-4,
                             "model.system_prompt": "You are a music assistant.", "stages": TWO_STAGES})
    first, second = stage_configs(cfg)
    assert (first.stage, first.model.mode, first.data.task_families, first.optim.max_steps) == (
        "connector", "projector", ["understanding"], 6)
    assert (second.stage, second.model.mode, second.model.lora.r, second.data.task_families) == (
        "instruct", "lora", 4, None)
    assert first.optim.lr == second.optim.lr == 3e-4 and first.optim.projector_lr == 1e-2
    assert second.optim.projector_lr is None  # a stage's settings do not leak into the next
    assert first.model.system_prompt == second.model.system_prompt == "You are a music assistant."
    assert first.output_dir == "runs/x/stages/1-connector" and second.output_dir == "runs/x/stages/2-instruct"
    assert first.model.init_from is None and second.model.init_from == "runs/x/stages/1-connector/final"
    assert str(second.final_dir) == "runs/x/final" and str(first.final_dir) == "runs/x/stages/1-connector/final"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "optim": {"lr": -1}}], r"stages\[0\] \(a\): optim.lr: Input should be greater than 0"),
    ([{"name": "a", "model": {"mode": "sideways"}}], r"stages\[0\] \(a\): model.mode"),
    ([{"model": {"mode": "lora"}}], r"stages\[0\]: a stage needs a name"),
    ([{"name": "a"}, {"name": "a"}], r"stages\[1\] \(a\): two stages are called 'a'"),
    ([{"name": "a", "output_dir": "elsewhere"}], r"output_dir is set for the whole run"),
    ([{"name": "a", "model": {"init_from": "x"}}], r"model.init_from is set by the stages"),
    ([{"name": "a", "model": {"quantization": "4bit"}}], r"stages\[0\] \(a\): .*quantization needs model.mode: lora"),
])
def test_an_invalid_stage_is_refused_when_the_config_is_read(stages, message):
    with pytest.raises(TrainConfigError, match=message):
        load_config(None, {"data.shards": ["shards"], "stages": stages})


# ---------------------------------------------------------------------------------------------
# Under DeepSpeed (slow)


@pytest.mark.slow
def test_two_stages_killed_inside_each_and_between_resume_to_the_uninterrupted_losses(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, n_samples=24, n_shards=4, dim=DIM, frames=(3, 6), pairs=(1, 2))
    settings = {"stages": TWO_STAGES, "save_every": 2, "data.num_workers": 1}
    straight = tmp_path / "straight"
    result = run_train(straight, shards, **settings)
    assert "train: stage 1/2 (connector): mode projector, 6 steps" in result.stdout
    assert "train: stage 2/2 (instruct): mode lora, 8 steps" in result.stdout
    stage_1, stage_2 = (straight / "stages" / name for name in ("1-connector", "2-instruct"))
    assert sorted(losses(stage_1)) == list(range(1, 7)) and sorted(losses(stage_2)) == list(range(1, 9))
    assert json.loads((stage_1 / "stage.json").read_text())["steps"] == 6
    assert (straight / "final" / "llark_config.json").is_file()
    state = json.loads(sorted((stage_2 / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["config"]["stage"] == "instruct"

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "llark.train"] + train_args(killed, shards, **settings)
    kill_when_logged(command, killed / "stages" / "1-connector" / "metrics.jsonl", 4)  # inside stage 1
    kill_when_logged(command, killed / "stages" / "1-connector" / "stage.json", 1)  # as stage 1 ends
    kill_when_logged(command, killed / "stages" / "2-instruct" / "metrics.jsonl", 4)  # inside stage 2
    result = run_train(killed, shards, **settings)
    assert "train: stage 1/2 (connector): done earlier (6 steps" in result.stdout
    for name in ("1-connector", "2-instruct"):
        assert losses(killed / "stages" / name) == losses(straight / "stages" / name), name


# ---------------------------------------------------------------------------------------------
# Validation during training


def test_validation_answers_are_shared_out_by_rank_and_scored_as_evaluate_scores_them(tmp_path):
    from test_evaluate_run import OracleModel, make_eval_set

    from llark.evaluate.run import build_items
    from llark.train.validation import answer_metrics, answer_rows

    class Counted(OracleModel):
        def answer(self, questions, audios, settings=None):
            self.batches = getattr(self, "batches", 0) + 1
            return super().answer(questions, audios, settings)

    clips, embeddings = make_eval_set(tmp_path)
    items = build_items(clips, embeddings, ["key", "tempo", "metre"], ["valid", "test"])[:17]
    one = answer_rows(OracleModel(), items, 0, 1, 2, -(-len(items) // 2))
    models = [Counted(), Counted()]
    ranks = [answer_rows(models[r], items, r, 2, 2, -(-len(items[0::2]) // 2)) for r in (0, 1)]
    assert sorted(r["item"] for r in ranks[0] + ranks[1]) == sorted(r["item"] for r in one) == sorted(
        i.item for i in items)
    # Rank 1 has 8 items, rank 0 nine: both answer five batches, and rank 1 keeps nothing of its fifth.
    assert [m.batches for m in models] == [5, 5] and [len(r) for r in ranks] == [9, 8]
    scores = answer_metrics(ranks[0] + ranks[1], items)
    assert scores == answer_metrics(one, items)
    assert scores["tempo/demo/acc2"] == scores["key/demo/accuracy"] == scores["metre/demo/accuracy"] == 1.0


@pytest.mark.parametrize("settings, message", [
    ({"validation.tasks": ["key"]}, "validation.tasks needs validation.clips and validation.embeddings"),
    ({"validation.best": "tempo/demo/acc2"}, "is a task metric: set validation.tasks"),
])
def test_validation_settings_are_checked_when_the_config_is_read(settings, message):
    with pytest.raises(TrainConfigError, match=message):
        load_config(None, {"data.shards": ["shards"], **settings})


# Under DeepSpeed (slow)


@pytest.mark.slow
def test_validation_loss_is_logged_is_the_same_on_two_ranks_and_exports_the_best(tmp_path):
    shards, held_out = tmp_path / "shards", tmp_path / "valid"
    write_shards(shards, n_samples=24, n_shards=4, dim=DIM, frames=(3, 6), pairs=(1, 2))
    write_shards(held_out, n_samples=10, n_shards=1, dim=DIM, frames=(3, 6), pairs=(1, 2), seed=5, split="valid")
    from test_evaluate_run import make_eval_set

    clips, embeddings = make_eval_set(tmp_path / "eval")  # 3 valid clips with labels, as llark evaluate reads them
    settings = {"validation.every": 2, "validation.split": "valid", "validation.shards": [str(held_out)],
                "validation.max_examples": 9, "optim.max_steps": 4, "save_every": 4, "model.projector_init": "default",
                "data.num_workers": 1, "optim.lr": 1e-12, "optim.projector_lr": 1e-12, "export": False,
                "validation.tasks": ["key", "tempo"], "validation.clips": str(clips),
                "validation.embeddings": str(embeddings)}
    scores = lambda out: [{k: v for k, v in m.items() if "/" in k}  # noqa: E731
                          for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    val = lambda out: {m["step"]: m["val_loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if "val_loss" in m}
    one = tmp_path / "one"
    result = run_train(one, shards, **settings, **{"validation.export_best": True})
    assert "validation: step 2 loss" in result.stdout and "(best val_loss so far)" in result.stdout
    assert sorted(val(one)) == [2, 4] and all(v > 0 for v in val(one).values())
    assert (one / "best" / "llark_config.json").is_file()
    two = tmp_path / "two"
    run_train(two, shards, nproc=2, **settings, **{"global_batch": 4, "micro_batch": 1})
    # The weights hardly move at this learning rate: two ranks, each with its share, give the same mean.
    for step in (2, 4):
        assert val(two)[step] == pytest.approx(val(one)[step], rel=1e-4)
    # The evaluation tasks' scores at each validation, the same from one rank or two.
    assert len(scores(one)) == 2 and all(set(s) >= {"key/demo/mirex", "key/demo/accuracy", "tempo/demo/acc1",
                                                      "tempo/demo/acc2"} for s in scores(one))
    assert all(0 <= x <= 1 for s in scores(one) for x in s.values()) and scores(two) == scores(one)


# ---------------------------------------------------------------------------------------------
# A mixture of task families under DeepSpeed (slow)


@pytest.mark.slow
def test_a_mixture_is_logged_and_resumes_exactly(tmp_path):
    """Families and datasets weighed together; musiccaps' understanding set has one shard for the two
    loader workers, which share it out."""
    shards = tmp_path / "shards"
    for dataset, family, n, n_shards in (("fma", "understanding", 24, 4), ("musiccaps", "understanding", 6, 1),
                                         ("musiccaps", "captioning", 8, 2)):
        write_shards(shards, n_samples=n, n_shards=n_shards, dim=DIM, frames=(3, 6), pairs=(1, 2), family=family,
                     name=dataset, dataset=dataset, seed=n)
    settings = {"data.mixture": {"understanding": 1.0, "captioning": 1.0},
                "data.dataset_weights": {"fma": 1.0, "musiccaps": 2.0}, "optim.max_steps": 10, "save_every": 2,
                "data.num_workers": 2, "export": False}
    straight = tmp_path / "straight"
    result = run_train(straight, shards, **settings)
    assert ("train: realised mixture over the 40 examples of this run: fma/understanding" in result.stdout
            and "musiccaps/captioning" in result.stdout and "(asked 40.0%)" in result.stdout), result.stdout[-2000:]
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(set(m["mixture"]) == {"fma/understanding", "musiccaps/understanding", "musiccaps/captioning"}
               for m in lines)
    killed = tmp_path / "killed"
    kill_when_logged([sys.executable, "-m", "llark.train"] + train_args(killed, shards, **settings),
                     killed / "metrics.jsonl", 5)
    run_train(killed, shards, **settings)
    assert losses(killed) == losses(straight)
