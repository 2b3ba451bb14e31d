"""Forgetting tests: what a fine-tune cost the skills a model had, and two ways to pay less (rehearsal, EWC).

Built in notebooks/09_forgetting.ipynb, the course's evaluation chapter.

    before, after = skill_report(base, tok, tasks=("reverse",)), skill_report(tuned, tok, tasks=("reverse",))
    forgetting(before, after)                     # the drop of each base skill, their mean, the perplexity ratio
    fisher = fisher_diagonal(base, batches, max_examples=112)
    train(model, batches, steps=40, lr=1e-3, extra_loss=EWC(fisher, base, lam=1e4))
    rows = replay_mixture(target_rows, {"copy": copy_rows, "general": texts}, fraction=0.1, seed=0)
"""

# Exported from notebooks/09_forgetting.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/09_forgetting.ipynb · 1.1 · A forgetting report
import random

import torch
import torch.nn.functional as F

from course_utils import training
from course_utils.errors import CourseError
from course_utils.evaluation import BASE_SKILLS, skill_report  # noqa: F401  (re-exported: the report's row)
from course_utils.mixtures import MixtureSampler


def forgetting(before: dict, after: dict, skills=None) -> dict:
    """The drop of each skill from `before` to `after` (two skill_report rows), their mean, and
    the perplexity ratio after / before (above 1: general text became less likely).

    skills: which scores are skills the model had; default: the base skills both rows scored
    (the new task is what was learned, not forgotten, so it is left out). A drop is
    before - after, so a skill that got better has a negative drop.
    """
    skills = check_skills(before, after, skills)  # argument checks: next cell
    drops = {s: before[s] - after[s] for s in skills}
    result = {**drops, "mean drop": sum(drops.values()) / len(drops)}
    if "perplexity" in before and "perplexity" in after:
        result["perplexity ratio"] = after["perplexity"] / before["perplexity"]
    return result


def update_norm(model, anchor) -> float:
    """||theta - theta0||: the L2 distance between the weights of two models of the same architecture
    (a fine-tune and its start), over every parameter they share by name."""
    start = dict(anchor.named_parameters())
    moved = [(p.detach().float() - start[n].detach().float()).pow(2).sum() for n, p in model.named_parameters()
             if n in start]
    if not moved:
        raise CourseError("update_norm: the two models share no parameter name; compare a fine-tune with the model "
                          "it started from (a PEFT adapter: merge_and_unload() it first).")
    return float(torch.stack(moved).sum().sqrt())


# %% notebooks/09_forgetting.ipynb · 1.1 · A forgetting report
def _scores(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("model", "perplexity")}


def check_skills(before: dict, after: dict, skills=None) -> list[str]:
    """The skills `forgetting` compares (default: the base skills both rows scored); a CourseError for a skill
    that is neither a base skill nor a score of the rows, or one not scored in both."""
    known = (*BASE_SKILLS, *_scores(before), *_scores(after))
    skills = [s for s in BASE_SKILLS if s in before and s in after] if skills is None else list(skills)
    unknown = [s for s in skills if s not in known]
    if unknown:
        raise CourseError(f"forgetting: unknown skill {unknown}; the skills are {', '.join(BASE_SKILLS)} "
                          f"and any task the rows scored ({', '.join(_scores(before)) or 'none'}).")
    missing = [s for s in skills if s not in before or s not in after]
    if missing or not skills:
        raise CourseError(f"forgetting: {missing or 'no skill'} is not scored in both rows: score the same "
                          "skills before and after (skill_report(..., skills=..., tasks=...)).")
    return skills


# %% notebooks/09_forgetting.ipynb · 1.2 · Which weights mattered: the Fisher diagonal, empirical or sampled
def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p(answer | prompt) of each row: the summed cross-entropy over its labelled tokens, [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                          ignore_index=training.IGNORE_INDEX)
    return nll.sum(dim=1)


def trainable_named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what an optimizer would update (tied weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def sample_labels(model, batch: dict, generator: torch.Generator) -> dict:
    """The batch with every labelled token replaced by one drawn from the model's own prediction at that
    place (given the data's prefix): the labels of the sampled (true) Fisher."""
    probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float().softmax(-1)
    drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    labels = batch["labels"].clone()
    scored = labels[:, 1:] != training.IGNORE_INDEX
    labels[:, 1:][scored] = drawn[scored]
    return {**batch, "labels": labels}


# %% notebooks/09_forgetting.ipynb · 1.2 · Which weights mattered: the Fisher diagonal, empirical or sampled
def fisher_diagonal(model, batches, *, max_examples: int | None = None, labels: str = "empirical",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """The diagonal Fisher at the model's current weights: for every trainable parameter, the mean over
    examples of the squared gradient of the example's log-likelihood.

    labels="empirical": the data's own answer; "sampled": each labelled token drawn from the model (the
    true Fisher, one draw per example, drawn with `seed`). batches: as course_utils.training.collate makes
    them (labels -100 off the answer); each row is one example, its gradient taken alone. A finite list is
    read to the end; an endless generator (chat_batches, row_batches) needs max_examples.
    """
    if labels not in ("empirical", "sampled"):
        raise CourseError(f"labels={labels!r}: use 'empirical' (the data's answers) or 'sampled' (drawn from the model).")
    params = trainable_named_parameters(model)
    if not params:
        raise CourseError("The model has no trainable parameters: set requires_grad=True on the ones EWC "
                          "should protect (e.g. model.requires_grad_(True)).")
    if iter(batches) is batches and max_examples is None:
        raise CourseError("An endless batch generator needs max_examples=... (or pass a list of batches).")
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    count, was_training = 0, model.training
    generator = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    model.eval()  # no dropout: the Fisher of the model as it is
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            if max_examples is not None and count >= max_examples:
                break
            row = {k: v[i:i + 1] for k, v in batch.items()}
            row = sample_labels(model, row, generator) if labels == "sampled" else row
            grads = torch.autograd.grad(sequence_nll(model, row)[0], list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:  # a weight this example does not reach has gradient 0
                    fisher[name] += grad.detach() ** 2
            count += 1
        if max_examples is not None and count >= max_examples:
            break
    model.train(was_training)
    if count == 0:
        raise CourseError("fisher_diagonal got no examples.")
    return {name: f / count for name, f in fisher.items()}


# %% notebooks/09_forgetting.ipynb · 1.3 · EWC: a pull back, weighted by the Fisher
class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017):
    penalty(model) = (lam / 2) * sum_i F_i (theta_i - anchor_i)^2 over the trainable parameters.

    fisher: {name: F} from fisher_diagonal; anchor: the model (or its state dict) whose weights to
    keep, usually the one the Fisher was computed on. Pass the object, or its .penalty, as
    train(..., extra_loss=...).
    """

    def __init__(self, fisher: dict, anchor, lam: float):
        if not isinstance(lam, (int, float)) or not lam >= 0:
            raise CourseError(f"lam={lam!r}: EWC's strength must be a number >= 0 (0 turns it off).")
        state = anchor.state_dict() if isinstance(anchor, torch.nn.Module) else anchor
        missing = [name for name in fisher if name not in state]
        if missing:
            raise CourseError(f"The anchor has no weights named {missing[:3]}...: use the model the Fisher was computed on.")
        self.fisher = {name: f.detach() for name, f in fisher.items()}
        self.anchor = {name: state[name].detach().clone() for name in fisher}
        self.lam = float(lam)

    def penalty(self, model) -> torch.Tensor:
        params = trainable_named_parameters(model)
        if set(params) != set(self.fisher):
            extra, lacking = sorted(set(params) - set(self.fisher)), sorted(set(self.fisher) - set(params))
            raise CourseError(f"The Fisher's keys do not match the model's trainable parameters (not in the Fisher: "
                              f"{extra[:3]}, not trainable: {lacking[:3]}): compute fisher_diagonal on a model with "
                              "the same trainable parameters.")
        total = sum((self.fisher[name] * (p - self.anchor[name]) ** 2).sum() for name, p in params.items())
        return 0.5 * self.lam * total

    __call__ = penalty


# %% notebooks/09_forgetting.ipynb · 1.4 · Rehearsal: a replay mixture
def replay_count(n_target: int, fraction: float) -> int:
    """How many replayed rows make `fraction` of the mixture with n_target target rows (the nearest whole number)."""
    return round(n_target * fraction / (1 - fraction))


def replay_mixture(target_rows, replay_rows, fraction: float, seed: int = 0, *, weights: dict | None = None) -> list:
    """The target rows plus replayed rows making up `fraction` of the result, shuffled.

    replay_rows: a list of rows, or {source: rows} to draw from several sources (with `weights`,
    equal by default) through course_utils.mixtures.MixtureSampler; a source is cycled if the
    share asks for more rows than it has.
    """
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise CourseError(f"fraction={fraction!r} is the replayed share of the mixture: it must be in [0, 1) "
                          "(0.1 = one row in ten is replayed).")
    target_rows = list(target_rows)
    if not target_rows:
        raise CourseError("replay_mixture got no target rows.")
    sources = dict(replay_rows) if isinstance(replay_rows, dict) else {"replay": list(replay_rows)}
    n_replay = replay_count(len(target_rows), fraction)
    replayed = []
    if n_replay:
        weights = weights if weights is not None else {name: 1 / len(sources) for name in sources}
        replayed = [row for _, row in MixtureSampler(sources, weights, seed=seed).take(n_replay)]
    rows = target_rows + replayed
    random.Random(seed).shuffle(rows)
    return rows


def tokenize_row(tokenizer, row: dict) -> dict[str, list[int]]:
    """A chat row ({"messages"}) labelled on the assistant's tokens; a text row ({"text"}) on every token."""
    if "messages" in row:
        return training.tokenize_chat(tokenizer, row["messages"])
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    raise CourseError(f"A training row needs 'messages' (a chat) or 'text', not {sorted(row)}.")


def row_batches(tokenizer, rows, *, batch_size: int, seed: int = 0):
    """Endless shuffled batches of chat and text rows alike (as training.chat_batches does for chats)."""
    tokenized = [tokenize_row(tokenizer, row) for row in rows]
    if len(tokenized) < batch_size:
        raise CourseError(f"row_batches got {len(tokenized)} rows, fewer than one batch of {batch_size}.")
    return training.shuffled_batches(tokenized, batch_size=batch_size, pad_token_id=training.pad_token_id(tokenizer),
                                     seed=seed)


# %% notebooks/09_forgetting.ipynb · 1.5 · Scoring a run along the way
@torch.no_grad()
def greedy_matches(model, batch: dict) -> torch.Tensor:
    """Per row of a collated batch (labels on the answer): would greedy decoding write the answer exactly? [B] bools.

    One forward pass with the reference as prefix: greedy decoding reproduces it iff at every labelled
    position (answer and end-of-turn token) the model's most likely token is the reference token."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    model.train(was_training)
    labels = batch["labels"][:, 1:]
    return ((logits.argmax(-1) == labels) | (labels == training.IGNORE_INDEX)).all(dim=1)


def at_level(curve, level: float, *, x: str = "target", y: str = "mean drop") -> float:
    """`y` where a run's `x` first reaches `level`: linear between the checkpoint before and the one that
    reached it. curve: the run's checkpoints in step order (dicts, or a DataFrame); NaN if it never does."""
    points = curve.to_dict("records") if hasattr(curve, "to_dict") else list(curve)
    if not points:
        raise CourseError("at_level got an empty curve: pass the run's checkpoints in step order.")
    for before, now in zip([None, *points[:-1]], points):
        if now[x] >= level:
            if before is None:
                return float(now[y])
            w = (level - before[x]) / (now[x] - before[x])  # before[x] < level <= now[x]
            return float(before[y] + w * (now[y] - before[y]))
    return float("nan")


# %% notebooks/09_forgetting.ipynb · 4 · SmolLM2: what a LoRA habit costs (full fine-tuning beside it on a GPU)
def load_instructions(path=None) -> list[dict]:
    """The course's instruction set ({"prompt", "any_of"}): questions SmolLM2-135M-Instruct answers right."""
    import json

    from course_utils.paths import DATA_DIR

    path = DATA_DIR / "smollm2_instructions.jsonl" if path is None else path
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def load_english(path=None) -> list[str]:
    """Held-out English sentences (written for the course) for perplexity."""
    from course_utils.paths import DATA_DIR

    path = DATA_DIR / "english_heldout.txt" if path is None else path
    return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]


def follows_rule(answer: str, any_of) -> bool:
    """An answer passes if it contains one of the words (case-insensitive)."""
    return any(word.lower() in answer.lower() for word in any_of)


def instruction_report(model, tokenizer, *, system: str | None = None, max_new_tokens: int = 24,
                       return_answers: bool = False):
    """{"instructions": share of the instruction set answered right, "perplexity": on the English texts}."""
    from course_utils.evaluation import generate, perplexity

    items = load_instructions()
    prompts = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": i["prompt"]}]
               for i in items]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    row = {"instructions": sum(follows_rule(a, i["any_of"]) for a, i in zip(answers, items)) / len(items),
           "perplexity": perplexity(model, tokenizer, load_english())}
    return (row, answers) if return_answers else row
