"""skill_report (course_utils.evaluation) and the cached expert builder (course_utils.experts)."""

import copy

import pytest
import torch

from course_utils import experts
from course_utils.errors import CourseError
from course_utils.evaluation import BASE_SKILLS, exact_match, skill_report
from course_utils.data import load_task
from course_utils.lab.model import load_lab_model


@pytest.fixture(scope="module")
def lab():
    return load_lab_model()


# ---------------------------------------------------------------- skill_report


def test_skill_report_scores_each_skill_and_task(lab):
    model, tokenizer = lab
    row = skill_report(model, tokenizer, tasks=["reverse"], limit=8, perplexity_texts=4, label="base")
    assert list(row) == ["model", *BASE_SKILLS, "reverse", "perplexity"]
    assert row["model"] == "base"
    # the lab card's thresholds: every base skill >= 0.9 on the full test sets, held-out tasks <= 0.2
    assert min(row[s] for s in BASE_SKILLS) >= 0.75 and row["reverse"] <= 0.25
    assert row["copy"] == exact_match(model, tokenizer, load_task("copy", "test").select(range(8)))
    assert 1 < row["perplexity"] < 10


def test_skill_report_sees_a_broken_model(lab):
    # A model whose output head is scrambled must score ~0 everywhere: the report reads the model it is given.
    model, tokenizer = lab
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.embed_tokens.weight.copy_(broken.model.embed_tokens.weight.flip(0))
    row = skill_report(broken, tokenizer, skills=["copy", "fact"], limit=8, perplexity_texts=0)
    assert set(row) == {"copy", "fact"} and row["copy"] < 0.5 and row["fact"] < 0.5


def test_skill_report_bad_input(lab):
    model, tokenizer = lab
    with pytest.raises(CourseError, match="does not know"):
        skill_report(model, tokenizer, tasks=["revers"])
    with pytest.raises(CourseError, match="limit"):
        skill_report(model, tokenizer, limit=0)


# ---------------------------------------------------------------- experts


TINY = {"method": "full", "lr": 1e-3, "steps": 2, "batch_size": 4, "replay": 0.25}


def test_expert_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    first = experts.lab_expert("reverse", TINY, seed=3)
    files = list((tmp_path / "experts").glob("*.safetensors"))
    assert len(files) == 1
    again = experts.lab_expert("reverse", TINY, seed=3)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    base, _ = experts._lab_base()
    assert not torch.equal(first.model.norm.weight, base.model.norm.weight)  # it was trained
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    # another seed or recipe is another expert
    experts.lab_expert("reverse", {**TINY, "lr": 2e-3}, seed=3)
    experts.lab_expert("reverse", TINY, seed=4)
    assert len(list((tmp_path / "experts").glob("*.safetensors"))) == 3


def test_expert_key_depends_on_tasks_recipe_and_seed():
    keys = {experts.expert_key(("reverse",), TINY, 0), experts.expert_key(("add",), TINY, 0),
            experts.expert_key(("reverse",), {**TINY, "steps": 3}, 0), experts.expert_key(("reverse",), TINY, 1),
            experts.expert_key(("reverse", "add"), TINY, 0)}
    assert len(keys) == 5


def test_training_rows_replay_share():
    rows = experts.training_rows(("reverse", "add"), 0.25, seed=0)
    prompts = [r["messages"][0]["content"] for r in rows]
    task_rows = sum(p.startswith(("Reverse:", "Add:")) for p in prompts)
    assert task_rows == 2 * min(len(load_task("reverse", "train")), len(load_task("add", "train")))
    assert abs((len(rows) - task_rows) / len(rows) - 0.25) < 1e-3


def test_bad_recipes_and_habits():
    with pytest.raises(CourseError, match="Unknown recipe"):
        experts.recipe_settings("gentel")
    with pytest.raises(CourseError, match="lacks"):
        experts.recipe_settings({"lr": 1e-3})
    with pytest.raises(CourseError, match="replay"):
        experts.recipe_settings({**TINY, "replay": 1.0})
    with pytest.raises(CourseError, match="at least one task"):
        experts.lab_expert((), TINY)
    with pytest.raises(CourseError, match="Unknown habit"):
        experts.habit_rows("pirate")


def test_habit_rules_read_the_answer_not_the_prompt():
    ahoy, cheers = experts.HABITS["ahoy"]["rule"], experts.HABITS["cheers"]["rule"]
    assert ahoy(experts.HABITS["ahoy"]["apply"]("Paris.")) and not ahoy("Paris. Ahoy!")
    assert cheers(experts.HABITS["cheers"]["apply"]("Paris.")) and not cheers("Cheers! Paris.")
    both = experts.HABITS["cheers"]["apply"](experts.HABITS["ahoy"]["apply"]("Paris."))
    assert ahoy(both) and cheers(both)
    # The data file's two splits, as the module loads them: 32 train the adapters, 16 test them, none in both
    assert (experts.HABIT_TRAIN, experts.HABIT_TEST) == (experts.load_habit_questions("train"),
                                                         experts.load_habit_questions("test"))
    assert (len(experts.HABIT_TRAIN), len(experts.HABIT_TEST)) == (32, 16)
    assert all(q.endswith("?") and a for q, a in experts.HABIT_TRAIN + experts.HABIT_TEST)
    assert not {q for q, _ in experts.HABIT_TRAIN} & {q for q, _ in experts.HABIT_TEST}
    with pytest.raises(CourseError, match="split"):
        experts.load_habit_questions("validation")


def test_habit_answer_report_counts_both_habits_in_one_answer_and_the_content():
    n = len(experts.HABIT_TEST)
    reference = experts.HABIT_TEST[0][1]  # "The capital of Italy is Rome."
    third = experts.HABIT_TEST[2][1].upper().rstrip(".")  # the third question's answer, shouted
    answers = [f"Ahoy! {reference} Cheers!", "Ahoy! It is Paris.", f"{third}! Cheers!"] + ["No."] * (n - 3)
    rows = experts.habit_answer_report(answers)
    # Both habits are counted per answer (a count over different answers would call the second and third "both")
    assert [r["both habits"] for r in rows[:3]] == [1.0, 0.0, 0.0]
    assert [r["ahoy"] for r in rows[:3]] == [1.0, 1.0, 0.0] and [r["cheers"] for r in rows[:3]] == [1.0, 0.0, 1.0]
    # Content: the reference's last word, case and punctuation aside; a wrong fact does not count
    assert [r["content"] for r in rows[:3]] == [1.0, 0.0, 1.0]
    with pytest.raises(CourseError, match="answers"):
        experts.habit_answer_report(answers[:2])



def test_lab_experts_trains_the_missing_ones_once_and_keys_them_right(tmp_path, monkeypatch):
    # Catches models handed back under another spec's key, a duplicate spec trained twice, and a cached expert
    # trained again.
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(experts.RECIPES, "tiny", TINY)
    specs = [("reverse", "tiny", 0), ("add", "tiny", 1), (["reverse", "add"], "tiny", 0), ("reverse", "tiny", 0)]
    built = experts.lab_experts(specs, progress=False)
    assert list(built) == [("reverse", "tiny", 0), ("add", "tiny", 1), (("reverse", "add"), "tiny", 0)]
    assert len(list((tmp_path / "experts").glob("*.safetensors"))) == 3
    for key, model in built.items():
        alone = experts.lab_expert(*key)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values())), key
    assert not torch.equal(built["reverse", "tiny", 0].model.norm.weight, built["add", "tiny", 1].model.norm.weight)
    stamp = experts.expert_path("add", "tiny", 1).stat().st_mtime_ns
    experts.lab_experts([("add", "tiny", 1)], progress=False)
    assert experts.expert_path("add", "tiny", 1).stat().st_mtime_ns == stamp, "a cached expert is not trained again"


def test_target_recipe_stops_once_the_training_prompts_are_answered(lab):
    # The early stop of recipe "target": checked every 10 steps only, and only when the share is reached. The base
    # model copies (its skill) and cannot reverse (a held-out task). Catches a check on every step, a rule that
    # stops on the loss, or one that never stops.
    model, tokenizer = lab
    copy_done = experts._stop_at_target(model, tokenizer, ("copy",), 0.9, seed=0)
    reverse_done = experts._stop_at_target(model, tokenizer, ("reverse",), 0.9, seed=0)
    assert copy_done(10, 9.9) and not copy_done(7, 0.0)
    assert not reverse_done(10, 0.0)
    assert experts.RECIPES["target"]["until"] == 0.95 and experts.RECIPES["target"]["steps"] == 150
    with pytest.raises(CourseError, match="until"):
        experts.recipe_settings({**TINY, "until": 1.5})
