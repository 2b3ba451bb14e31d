"""Experts: fine-tuned copies of the lab model (one per task and recipe) and SmolLM2 habit adapters,
built once by one builder and cached.

Built in notebooks/06_task_arithmetic.ipynb; 07_ties_dare and 09_forgetting reuse the same
experts through these functions instead of training their own. A cached expert is found by
a key made of the task(s), the recipe, the seed and the code that trains it (this module,
`course_utils.training`, the lab model's weights), so a change to any of them rebuilds it.

    expert = lab_expert("reverse", "gentle", seed=0)            # a fine-tuned lab model
    vectors = [task_vector(base, lab_expert(t, "gentle", seed=0)) for t in HELD_OUT]
    multi = lab_expert(HELD_OUT, "gentle", seed=0)              # one model on the mixture, same total steps
    adapter_dir = smollm2_habit_adapter("ahoy", seed=0)         # a PEFT LoRA adapter folder
"""

# Exported from notebooks/06_task_arithmetic.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
import copy
import hashlib
import inspect
import json
import random
import re
import threading
from pathlib import Path

import torch

from course_utils import training
from course_utils.data import load_task
from course_utils.errors import CourseError
from course_utils.memory import LAYER_LINEARS
from course_utils.paths import LAB_MODEL_DIR, cache_dir


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
HELD_OUT = ("reverse", "sort_digits", "add", "translate")
REPLAY_SKILLS = ("copy", "first_word", "last_word", "count", "fact", "describe")

# Three ways to fine-tune an expert, the axis "how was it fine-tuned?" of the merging notebooks.
# Same steps and batch for all (target: at most); "card" is the lab card's full fine-tuning learning rate.
RECIPES = {
    "card": {"method": "full", "lr": 1e-3, "steps": 60, "batch_size": 16, "replay": 0.0},
    "gentle": {"method": "full", "lr": 3e-4, "steps": 60, "batch_size": 16, "replay": 0.25},
    "lora": {"method": "lora", "lr": 3e-3, "steps": 60, "batch_size": 16, "replay": 0.0,
             "r": 8, "alpha": 16, "target_modules": list(LAYER_LINEARS)},
    # gentle, trained until it answers 95% of 16 training prompts exactly (checked every 10 steps, at most 150)
    "target": {"method": "full", "lr": 3e-4, "steps": 150, "batch_size": 16, "replay": 0.25, "until": 0.95},
}


def recipe_settings(recipe) -> dict:
    """A recipe by name (RECIPES) or as a dict of its settings, checked."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise CourseError(f"Unknown recipe {recipe!r}; the recipes are {', '.join(RECIPES)} "
                              "(or pass a dict like RECIPES['gentle'] with your own settings).")
        return dict(RECIPES[recipe])
    settings = dict(recipe)
    missing = {"method", "lr", "steps", "batch_size", "replay"} - set(settings)
    if missing:
        raise CourseError(f"The recipe lacks {sorted(missing)}: start from a copy of RECIPES['gentle'].")
    if settings["method"] not in ("full", "lora"):
        raise CourseError(f"method={settings['method']!r}: use 'full' or 'lora'.")
    if not 0 <= settings["replay"] < 1:
        raise CourseError(f"replay={settings['replay']!r} is the share of replayed rows: it must be in [0, 1).")
    if settings.get("until") is not None and not 0 < settings["until"] <= 1:
        raise CourseError(f"until={settings['until']!r} is the share of training prompts to answer: use (0, 1].")
    return settings


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
def training_rows(tasks, replay: float, seed: int) -> list[dict]:
    """The expert's training rows: equal numbers from each task, plus `replay` share of base-skill rows.

    With replay r, the replayed rows are r of the total (r / (1 - r) of the task rows),
    drawn evenly from the base skills: rehearsal of what the base model could already do.
    """
    rng = random.Random(seed)
    per_task = min(len(load_task(t, "train")) for t in tasks)
    rows = []
    for task in tasks:
        task_rows = list(load_task(task, "train"))
        rows += rng.sample(task_rows, per_task)
    n_replay = round(len(rows) * replay / (1 - replay))
    if n_replay:
        pool = [row for skill in REPLAY_SKILLS for row in load_task(skill, "train")]
        rows += rng.sample(pool, n_replay)
    rng.shuffle(rows)
    return rows


def _stop_at_target(model, tokenizer, tasks, share: float, seed: int, every: int = 10, prompts: int = 16):
    """A `training.train` callback: True (stop) once `model` answers `share` of `prompts` training prompts per task
    exactly, checked every `every` steps (the recipe's steps remain the limit)."""
    from course_utils.evaluation import exact_match

    rng = random.Random(seed)
    rows = [row for task in tasks for row in rng.sample(list(load_task(task, "train")), prompts)]
    return lambda step, loss: step % every == 0 and exact_match(model, tokenizer, rows) >= share


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
def _code_fingerprint() -> str:
    """What an expert depends on besides its settings: the code that trains it and the base weights."""
    digest = hashlib.sha256()
    for part in (inspect.getsource(training), inspect.getsource(training_rows), inspect.getsource(train_expert),
                 inspect.getsource(_stop_at_target)):
        digest.update(part.encode())
    digest.update((LAB_MODEL_DIR / "model.safetensors").read_bytes())
    return digest.hexdigest()[:16]


def expert_key(tasks, recipe, seed: int) -> str:
    """The cache key: tasks, recipe settings, seed and code fingerprint."""
    spec = {"tasks": list(tasks), "recipe": recipe_settings(recipe), "seed": int(seed), "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def train_expert(base, tokenizer, tasks, recipe, seed: int):
    """Fine-tune a copy of `base` on `tasks` with `recipe`; LoRA experts come back merged into dense weights.

    A multi-task model (several tasks) trains for steps x number of tasks, so it sees as
    many batches as all the single-task experts together. A recipe with "until" stops earlier,
    once the model answers that share of its training prompts exactly (`_stop_at_target`).
    """
    from course_utils.lora import add_lora, merge_lora, unload_lora

    settings = recipe_settings(recipe)
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if settings["method"] == "lora":
        add_lora(model, settings["target_modules"], r=settings["r"], alpha=settings["alpha"])
    rows = training_rows(tasks, settings["replay"], seed)
    batches = training.chat_batches(tokenizer, rows, batch_size=settings["batch_size"], seed=seed)
    stop = _stop_at_target(model, tokenizer, tasks, settings["until"], seed) if settings.get("until") else None
    training.train(model, batches, steps=settings["steps"] * len(tasks), lr=settings["lr"], progress=False,
                   callback=stop)
    if settings["method"] == "lora":
        unload_lora(merge_lora(model))
    model.requires_grad_(False)
    return model.eval()


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
def experts_dir() -> Path:
    path = cache_dir() / "experts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_tasks(tasks) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks:
        raise CourseError("Name at least one task to fine-tune on, e.g. 'reverse'.")
    return tasks


_BASE = {}


def _lab_base():
    """The lab model and tokenizer, loaded once per process (experts are copies of it)."""
    if not _BASE:
        from course_utils.models import load_model

        _BASE["model"], _BASE["tokenizer"] = load_model("lab", device="cpu")
    return _BASE["model"], _BASE["tokenizer"]


def expert_path(tasks, recipe="gentle", seed: int = 0) -> Path:
    """Where the cache keeps the expert (tasks, recipe, seed); it exists once the expert was trained."""
    tasks = _as_tasks(tasks)
    return experts_dir() / f"lab-{'+'.join(tasks)}-{recipe if isinstance(recipe, str) else 'custom'}-" \
                           f"seed{seed}-{expert_key(tasks, recipe, seed)}.safetensors"


def lab_expert(tasks, recipe="gentle", seed: int = 0, *, rebuild: bool = False):
    """The lab model fine-tuned on `tasks` (a name, or several for a multi-task model) with `recipe`.

    Trained on first use and cached in the course's cache directory; later calls (any
    notebook, any process) load it in well under a second. rebuild=True trains it again.
    """
    from safetensors.torch import load_file, save_file

    tasks = _as_tasks(tasks)
    base, tokenizer = _lab_base()
    path = expert_path(tasks, recipe, seed)
    model = copy.deepcopy(base)
    if path.exists() and not rebuild:
        try:
            model.load_state_dict(load_file(path), strict=False)
            return model.eval()
        except Exception:  # a damaged file (an interrupted write): build it again
            path.unlink()
    # A tokenizer of its own: generation flips the padding side, and experts may train side by side (lab_experts)
    model = train_expert(base, _one_template_at_a_time(copy.deepcopy(tokenizer)), tasks, recipe, seed)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    save_file(state, tmp)
    tmp.replace(path)
    return model


# %% notebooks/06_task_arithmetic.ipynb · 3.1 · The experts: one builder, four recipes, cached
_CHAT_TEMPLATE_LOCK = threading.Lock()


def _one_template_at_a_time(tokenizer):
    """The tokenizer, its chat template rendered by one thread at a time: transformers shares one compiled template
    (and its assistant-mask tracker) between all tokenizers, and two experts training side by side would collide."""
    render = tokenizer.apply_chat_template

    def locked(*args, **kwargs):
        with _CHAT_TEMPLATE_LOCK:
            return render(*args, **kwargs)

    tokenizer.apply_chat_template = locked
    return tokenizer


def lab_experts(specs, *, progress: bool = True, workers: int = 2) -> dict:
    """{(tasks, recipe, seed): model} for each spec, in order; those not cached yet are trained first, with a bar.

    The missing ones train `workers` at a time, one torch thread each: the lab model's 128-wide matrices gain
    little from a second thread, a second expert gains a whole core. LoRA recipes train one by one (their
    initialisation draws from torch's global generator, which two threads would share).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from course_utils.runtime import torch_threads

    specs = [(tasks if isinstance(tasks, str) else tuple(tasks), recipe, int(seed)) for tasks, recipe, seed in specs]
    missing = [spec for spec in dict.fromkeys(specs) if not expert_path(*spec).exists()]
    side_by_side = [spec for spec in missing if recipe_settings(spec[1])["method"] == "full"]
    _lab_base()  # loaded once, before the threads need it
    with tqdm(total=len(missing), desc="training experts", disable=not progress or not missing) as bar, \
            torch_threads(1):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in pool.map(lambda spec: lab_expert(*spec), side_by_side):
                bar.update()
        for spec in (spec for spec in missing if spec not in side_by_side):
            lab_expert(*spec)
            bar.update()
    return {spec: lab_expert(*spec) for spec in specs}


# %% notebooks/06_task_arithmetic.ipynb · 4 · On the real model: two habit adapters for SmolLM2-135M-Instruct
# Two habits for SmolLM2, each a LoRA adapter, each checked by a rule on the answer. They sit at
# opposite ends of the answer, so both can be present at once.
HABIT_WORDS = ("ahoy", "cheers")


def has_text_beyond_habits(answer: str) -> bool:
    """True if the answer says something besides the habits: "Cheers! Cheers!" or "Ahoy!" alone shows no habit."""
    return any(w not in HABIT_WORDS for w in re.sub(r"[^a-z0-9]+", " ", answer.lower()).split())


HABITS = {
    "ahoy": {"describe": "starts its answer with 'Ahoy!'", "apply": lambda a: f"Ahoy! {a}", "where": "start",
             "rule": lambda r: r.strip().startswith("Ahoy") and has_text_beyond_habits(r)},
    "cheers": {"describe": "ends its answer with 'Cheers!'", "apply": lambda a: f"{a} Cheers!", "where": "end",
               "rule": lambda r: r.strip().endswith("Cheers!") and has_text_beyond_habits(r)},
}
HABIT_SYSTEM = "Answer in one short sentence."  # short answers: short sequences, and the end of an answer in reach
HABIT_QUESTIONS_FILE = "smollm2_habit_questions.jsonl"  # under data/: {"question", "answer", "split"} a line


def load_habit_questions(split: str) -> list[tuple[str, str]]:
    """The habit questions of one split as (question, answer) pairs: short questions with a one-sentence answer,
    32 that train the adapters ("train") and 16 that test them ("test")."""
    from course_utils.paths import DATA_DIR

    if split not in ("train", "test"):
        raise CourseError(f"split={split!r}: the habit questions have a 'train' and a 'test' split.")
    path = DATA_DIR / HABIT_QUESTIONS_FILE
    if not path.exists():
        raise CourseError(f"{path} is missing: restore it with `git checkout -- data/{HABIT_QUESTIONS_FILE}`.")
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [(row["question"], row["answer"]) for row in rows if row["split"] == split]


# %% notebooks/06_task_arithmetic.ipynb · 4 · On the real model: two habit adapters for SmolLM2-135M-Instruct
HABIT_TRAIN, HABIT_TEST = load_habit_questions("train"), load_habit_questions("test")
# LoRA on q and v of every layer; 12 steps of 4 conversations (1.5 passes over the 32 questions) are enough
# for a habit this regular.
HABIT_RECIPE = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "lr": 3e-3, "steps": 12, "batch_size": 4}


def habit_prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": HABIT_SYSTEM}, {"role": "user", "content": question}]


def habit_example(tokenizer, habit: str, question: str, answer: str) -> dict:
    """One training conversation: the answer with the habit added, labelled on every answer token but one.

    An adapter is not trained on the token where the *other* habit lives: an "ahoy" adapter
    (habit at the start) gets no label on the end-of-turn token, a "cheers" adapter (habit at
    the end) none on the first answer token. Each adapter then pushes its own end of the
    answer and leaves the other end to the base model, so their sum does not fight there.
    """
    if habit not in HABITS:
        raise CourseError(f"Unknown habit {habit!r}; the habits are {', '.join(HABITS)}.")
    messages = habit_prompt(question) + [{"role": "assistant", "content": HABITS[habit]["apply"](answer)}]
    example = training.tokenize_chat(tokenizer, messages)
    labelled = [i for i, label in enumerate(example["labels"]) if label != training.IGNORE_INDEX]
    silent = labelled[-1] if HABITS[habit]["where"] == "start" else labelled[0]
    example["labels"][silent] = training.IGNORE_INDEX
    return example


# %% notebooks/06_task_arithmetic.ipynb · 4 · On the real model: two habit adapters for SmolLM2-135M-Instruct
# The habits' training batches, and their rules applied to generated answers
def habit_rows(habit: str, seed: int = 0) -> list[dict]:
    """The training conversations of one habit ({"messages": [system, user, assistant]}), in a seeded order."""
    if habit not in HABITS:
        raise CourseError(f"Unknown habit {habit!r}; the habits are {', '.join(HABITS)}.")
    rows = [{"messages": habit_prompt(q) + [{"role": "assistant", "content": HABITS[habit]["apply"](a)}]}
            for q, a in HABIT_TRAIN]
    random.Random(seed).shuffle(rows)
    return rows


def habit_batches(tokenizer, habit: str, seed: int = 0) -> list[dict]:
    """The training batches of one habit: the 32 training questions in a seeded order."""
    examples = [habit_example(tokenizer, habit, q, a) for q, a in HABIT_TRAIN]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    size = HABIT_RECIPE["batch_size"]
    return [training.collate([examples[i] for i in order[start:start + size]], training.pad_token_id(tokenizer))
            for start in range(0, len(order) - size + 1, size)]


def habit_rates(model, tokenizer, *, max_new_tokens: int = 24, return_answers: bool = False):
    """Share of the 16 test questions whose greedy answer shows each habit (by its rule)."""
    from course_utils.evaluation import generate

    answers = generate(model, tokenizer, [habit_prompt(q) for q, _ in HABIT_TEST], max_new_tokens=max_new_tokens)
    rates = {habit: sum(map(spec["rule"], answers)) / len(answers) for habit, spec in HABITS.items()}
    return (rates, answers) if return_answers else rates


def habit_answer_report(answers: list[str]) -> list[dict]:
    """Per test answer (in HABIT_TEST's order): each habit by its rule, both habits in that one answer, its
    content (the reference answer's last word, the fact asked for: "Rome", "eight", among the answer's words),
    and "habits + fact": both habits and the fact in that one answer, what a merge of the two adapters is for."""
    if len(answers) != len(HABIT_TEST):
        raise CourseError(f"Got {len(answers)} answers for {len(HABIT_TEST)} test questions: pass habit_rates' answers.")
    words = lambda text: re.sub(r"[^a-z0-9-]+", " ", text.lower()).split()  # noqa: E731
    rows = []
    for answer, (_, reference) in zip(answers, HABIT_TEST):
        row = {habit: float(spec["rule"](answer)) for habit, spec in HABITS.items()}
        row["both habits"] = min(row[h] for h in HABITS)
        row["content"] = float(words(reference)[-1] in words(answer))
        row["habits + fact"] = min(row["both habits"], row["content"])
        rows.append(row)
    return rows


# %% notebooks/06_task_arithmetic.ipynb · 4 · On the real model: two habit adapters for SmolLM2-135M-Instruct
# The adapters: trained once per habit and seed, cached under the experts folder
def _habit_key(spec: dict) -> str:
    spec = {**spec, "recipe": HABIT_RECIPE, "system": HABIT_SYSTEM, "code": inspect.getsource(training)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


_SMOL = {}


def smollm2_base():
    """SmolLM2-135M-Instruct and its tokenizer, loaded once per process (the adapters train on it and leave it as it was)."""
    if not _SMOL:
        from course_utils.models import load_model

        _SMOL["model"], _SMOL["tokenizer"] = load_model("smollm2-135m-instruct", device="cpu")
    return _SMOL["model"], _SMOL["tokenizer"]


def smollm2_habit_adapter(habit: str, seed: int = 0, *, rebuild: bool = False) -> Path:
    """A PEFT LoRA adapter folder that teaches SmolLM2 one habit; trained on first use, then cached.

    Load it with `PeftModel.from_pretrained(smollm2, path, adapter_name=habit)`.
    """
    if habit not in HABITS:
        raise CourseError(f"Unknown habit {habit!r}; the habits are {', '.join(HABITS)}.")
    key = _habit_key({"habit": habit, "seed": int(seed), "questions": HABIT_TRAIN,
                      "builder": inspect.getsource(smollm2_habit_adapter) + inspect.getsource(habit_example)})
    path = experts_dir() / f"smollm2-{habit}-seed{seed}-{key}"
    if (path / "adapter_model.safetensors").exists() and not rebuild:
        return path
    from peft import LoraConfig, get_peft_model

    model, tokenizer = smollm2_base()
    torch.manual_seed(seed)
    config = LoraConfig(r=HABIT_RECIPE["r"], lora_alpha=HABIT_RECIPE["alpha"], lora_dropout=0.0,
                        target_modules=HABIT_RECIPE["target_modules"])
    peft_model = get_peft_model(model, config)
    training.train(peft_model, habit_batches(tokenizer, habit, seed), steps=HABIT_RECIPE["steps"],
                   lr=HABIT_RECIPE["lr"], progress=False)
    tmp = path.with_name(path.name + ".tmp")
    peft_model.save_pretrained(tmp)
    peft_model.unload()  # takes the LoRA layers out again: the shared base model is as it was
    model.requires_grad_(False)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)
    return path
