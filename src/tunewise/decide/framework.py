"""The decide stage: should this project fine-tune at all, and with which method?

Most should not. A knowledge problem wants retrieval (RAG), a prompt problem a better,
measured prompt, a capability problem a stronger model. Fine-tuning earns its place for
behavior: an output format, a style, a narrow high-volume task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    TypeAdapter,
    ValidationError,
)

from tunewise.config import Answers
from tunewise.decide.estimate import Method, estimate_train_memory_gb
from tunewise.errors import TunewiseError

Recommendation = Literal["better_prompt", "rag", "stronger_model", "finetune"]

MIN_EXAMPLES = 100  # fewer examples than this: not worth a fine-tune
FEW_EXAMPLES = 200  # fewer than this: a fine-tune is allowed but fragile
FULL_EXAMPLES = 5000  # full fine-tuning only pays off over LoRA with this many examples
HIGH_VOLUME = 100_000  # requests per day at which a small fine-tuned model pays for itself
CPU_MAX_PARAMS_B = 3.0  # the largest model that LoRA-trains on a CPU in reasonable time
ASK_ATTEMPTS = 4  # the first ask and up to 3 re-asks
EXAMPLE_FILE = "examples/debian-sections/decide-answers.yaml"


@dataclass(frozen=True)
class Question:
    """One question of the decide interview; `key` names the Answers field it fills."""

    key: str
    text: str
    kind: Literal["choice", "bool", "int", "float"]
    choices: tuple[str, ...] = ()
    help: str = ""


QUESTIONS: list[Question] = [
    Question(
        "problem",
        "What does the model get wrong today?",
        "choice",
        ("behavior", "knowledge", "capability", "unsure"),
        "behavior: right facts, wrong format, style or task handling; knowledge: facts it does "
        "not know (your documents, recent events); capability: reasoning it cannot do even "
        "with a good prompt; unsure: you have not sorted its failures yet.",
    ),
    Question(
        "changes_often",
        "Does the requirement, or the knowledge behind it, change weekly or faster?",
        "bool",
        help="New product names every week, a format that is still being negotiated, news.",
    ),
    Question(
        "n_examples",
        "How many good input -> output examples do you have?",
        "int",
        help="Count only examples a person checked and would be happy to see the model copy.",
    ),
    Question(
        "prompt_tried",
        "Have you tried a strong prompt, with few-shot examples, and measured it on held-out "
        "examples?",
        "bool",
        help="Trying it by hand on a few inputs does not count: it must be scored on examples "
        "the prompt was not written from.",
    ),
    Question(
        "prompt_meets_target",
        "Did that prompt reach your quality target?",
        "bool",
        help="Only asked when a prompt was measured.",
    ),
    Question(
        "requests_per_day",
        "How many requests per day will the model serve?",
        "int",
        help="An order of magnitude is enough; 0 if unknown.",
    ),
    Question(
        "latency_sensitive",
        "Does someone wait on each answer, so that response time matters?",
        "bool",
    ),
    Question(
        "private_data",
        "Must the data stay on your own hardware (no hosted model APIs)?",
        "bool",
    ),
    Question(
        "model_params_b",
        "How large is the base model you would fine-tune, in billions of parameters?",
        "float",
        help="0.135 for the embedded SmolLM2-135M, 7 for a 7B model.",
    ),
    Question(
        "gpu_memory_gb",
        "How much memory does your largest GPU have, in GB?",
        "float",
        help="0 if you only have a CPU.",
    ),
]
_QUESTION = {q.key: q for q in QUESTIONS}
_FIELD = {name: TypeAdapter(Annotated[f.annotation, f]) for name, f in Answers.model_fields.items()}

_HEADLINES = {
    "rag": "Use retrieval (RAG), not fine-tuning",
    "better_prompt": "Improve and measure the prompt, not fine-tuning",
    "stronger_model": "Use a stronger model, not fine-tuning",
    "lora": "Fine-tune with LoRA",
    "qlora": "Fine-tune with QLoRA",
    "full": "Fine-tune all weights (full fine-tuning)",
}
_METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}


@dataclass(frozen=True)
class Decision:
    """What to do and why: the content of decision.json."""

    recommendation: Recommendation
    method: Method | None
    reasons: list[str]
    next_steps: list[str]
    warnings: list[str] = field(default_factory=list)
    memory_gb: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The decision as plain JSON-ready values, headline first."""
        return {"headline": self.headline(), **dataclasses.asdict(self)}

    def headline(self) -> str:
        """One line: what to do."""
        return _HEADLINES[self.method if self.recommendation == "finetune" else self.recommendation]


_PROMPT_STEPS = [
    "Write a prompt with clear instructions, the exact output format and 3 to 5 few-shot "
    "examples.",
    "Measure it on held-out examples: `tunewise run -c tunewise.yaml` scores zero-shot and "
    "few-shot prompts on the same test set as any fine-tune.",
    "Run decide again with the measured result.",
]
_RAG_STEPS = [
    "Index the documents the answers should come from, and put the top retrieved passages "
    "into the prompt.",
    "Measure answer quality on held-out questions with and without retrieval.",
    "If the answers are then right but in the wrong format or style, that remaining gap is "
    "behavior: run decide again for it.",
]
_STRONGER_STEPS = [
    "Run the same prompt on a larger or reasoning-tuned model and measure it on held-out "
    "examples.",
    "If that model is good enough but too slow or costly, use its checked outputs as training "
    "data for a small model (distillation), and run decide again.",
]


def recommend(answers: Answers) -> Decision:
    """Apply the rules in order; the first that decides returns, each adds its reason."""
    a = answers
    memory = {m: estimate_train_memory_gb(a.model_params_b, m) for m in ("qlora", "lora", "full")}
    for verdict in (_not_a_behavior_problem(a), _prompt_is_enough(a)):
        if verdict is not None:
            recommendation, reasons, steps = verdict
            return Decision(recommendation, None, reasons, steps, [], memory)
    reasons = _why_finetune(a)
    if a.n_examples < MIN_EXAMPLES:
        reasons.append(
            f"You have {a.n_examples:,} good examples; a fine-tune needs at least {MIN_EXAMPLES} "
            f"({FEW_EXAMPLES} or more to be reliable). Collect and check more, and meanwhile use "
            "the best ones as few-shot examples in the prompt."
        )
        return Decision("better_prompt", None, reasons, _PROMPT_STEPS, [], memory)
    warnings: list[str] = []
    if a.n_examples < FEW_EXAMPLES:
        warnings.append(
            f"{a.n_examples} examples is fewer than {FEW_EXAMPLES} training examples: the "
            "fine-tune may overfit or fail to beat the prompt; collect more if the verdict is "
            "close."
        )
    else:
        reasons.append(
            f"You have {a.n_examples:,} examples, enough for a fine-tune "
            f"({FEW_EXAMPLES} or more)."
        )
    method, method_reasons, method_warnings = _choose_method(a, memory)
    steps = [
        "Write a tunewise.yaml (`tunewise init DIR`) pointing at your examples.",
        f"`tunewise run -c tunewise.yaml` validates and splits the data, measures the prompt "
        f"baselines, trains with {_METHOD_NAMES[method]} and evaluates on the same test set.",
        "Ship only if the verdict says SHIP: the fine-tune beat the best baseline on held-out "
        "data, significantly.",
    ]
    return Decision(
        "finetune", method, reasons + method_reasons, steps, warnings + method_warnings, memory
    )


Refusal = tuple[Recommendation, list[str], list[str]]  # what to do instead, why, next steps


def _not_a_behavior_problem(a: Answers) -> Refusal | None:
    """Knowledge, capability, an unsorted problem, a moving requirement or an unmeasured prompt:
    each has a cheaper fix than fine-tuning."""
    if a.problem == "knowledge":
        reasons = [
            "The model is missing facts: retrieval (RAG) puts the right documents into the "
            "prompt at question time, while fine-tuning teaches behavior and is an unreliable, "
            "hallucination-prone way to add facts."
        ]
        if a.changes_often:
            reasons.append(
                "Your knowledge changes weekly or faster, so a fine-tune would go stale within "
                "days; a retrieval index is updated by re-indexing, with no retraining."
            )
        return "rag", reasons, _RAG_STEPS
    if a.problem == "capability":
        return (
            "stronger_model",
            [
                "The model cannot do the reasoning even with a good prompt: fine-tuning teaches "
                "format and style, not new reasoning ability, so a stronger (larger or "
                "reasoning-tuned) model is the fix."
            ],
            _STRONGER_STEPS,
        )
    if a.problem == "unsure":
        return (
            "better_prompt",
            [
                "You are not sure yet what the model gets wrong. Find out cheaply first: measure "
                "zero-shot and few-shot prompts on held-out examples (`tunewise run`) and "
                "sort the failures. Wrong format or style is behavior, wrong or missing facts "
                "are knowledge, wrong reasoning is capability."
            ],
            _PROMPT_STEPS,
        )
    if a.changes_often:
        return (
            "better_prompt",
            [
                "The requirement changes weekly or faster: a prompt can be changed and "
                "re-measured the same day, while a fine-tune needs new data and a new training "
                "run for every change."
            ],
            _PROMPT_STEPS,
        )
    if not a.prompt_tried:
        return (
            "better_prompt",
            [
                "No prompt has been measured yet: a strong prompt with few-shot examples often "
                "closes the gap with no training, and without its score there is nothing for a "
                "fine-tune to beat. tunewise's baselines measure zero-shot and few-shot prompts "
                "for you (`tunewise run`)."
            ],
            _PROMPT_STEPS,
        )
    return None


def _prompt_is_enough(a: Answers) -> Refusal | None:
    """A measured prompt that meets the target, with no serving reason for a small model of one's own."""
    if not a.prompt_meets_target or _serving_reasons(a):
        return None
    return (
        "better_prompt",
        [
            "Your measured prompt already meets the quality target, and neither volume "
            f"(over {HIGH_VOLUME:,} requests per day), latency nor private data calls "
            "for a small model of your own: a fine-tune would add training, hosting "
            "and upkeep for no gain."
        ],
        [
            "Ship the prompt, and keep the held-out examples as a regression test for "
            "every prompt change.",
            f"Run decide again if volume passes {HIGH_VOLUME:,} requests per day, "
            "latency starts to matter, or the data must move onto your own hardware.",
        ],
    )


def _why_finetune(a: Answers) -> list[str]:
    """The first reasons of a fine-tune: serving (the prompt already meets the target) or quality."""
    if a.prompt_meets_target:
        return [
            "Your measured prompt already meets the quality target, so a fine-tune is for "
            "serving, not quality: a small fine-tuned model can replace the big prompted one."
        ] + _serving_reasons(a)
    return [
        "Your measured prompt misses the quality target and the problem is behavior, the "
        "kind of gap fine-tuning closes."
    ]


def _serving_reasons(a: Answers) -> list[str]:
    """Why a small fine-tuned model could replace a prompt that already meets the target."""
    reasons = []
    if a.requests_per_day > HIGH_VOLUME:
        reasons.append(
            f"At {a.requests_per_day:,} requests per day (over {HIGH_VOLUME:,}), a small "
            "fine-tuned model costs far less per request than a big prompted one."
        )
    if a.latency_sensitive:
        reasons.append(
            "Response time matters: a small fine-tuned model with a short prompt answers faster "
            "than a big model with a long few-shot prompt."
        )
    if a.private_data:
        reasons.append(
            "The data must stay on your own hardware: a small fine-tuned model you host "
            "yourself can replace a big hosted one."
        )
    return reasons


def _choose_method(
    a: Answers, memory: dict[str, float]
) -> tuple[Method, list[str], list[str]]:
    """The training method that fits the hardware: (method, reasons, warnings)."""
    size, gpu = f"{a.model_params_b:g}B", a.gpu_memory_gb
    lora, qlora, full = memory["lora"], memory["qlora"], memory["full"]
    if gpu == 0:
        if a.model_params_b <= CPU_MAX_PARAMS_B:
            return "lora", [
                f"With no GPU, training runs on the CPU: LoRA needs about {lora:g} GB of memory "
                f"for a {size} model, and models up to {CPU_MAX_PARAMS_B:g}B parameters train "
                "with LoRA on a CPU in reasonable time."
            ], []
        return "qlora", [
            f"A {size} model is too large to train on a CPU (practical up to "
            f"{CPU_MAX_PARAMS_B:g}B parameters); on a GPU, QLoRA is the cheapest method."
        ], [
            f"Training a {size} model needs stronger hardware: QLoRA needs a GPU with about "
            f"{qlora:g} GB (LoRA about {lora:g} GB). Rent one, or pick a base model of "
            f"{CPU_MAX_PARAMS_B:g}B parameters or less to train on the CPU."
        ]
    if full <= gpu and a.n_examples >= FULL_EXAMPLES:
        return "full", [
            f"Full fine-tuning needs about {full:g} GB for a {size} model; your GPU has "
            f"{gpu:g} GB, and {a.n_examples:,} examples ({FULL_EXAMPLES:,} or more) are enough "
            "to update all weights without overfitting."
        ], []
    if lora <= gpu:
        if full <= gpu:
            other = (
                f" Full fine-tuning would fit too (about {full:g} GB), but with fewer than "
                f"{FULL_EXAMPLES:,} examples LoRA does as well, trains faster and overfits less."
            )
        else:
            other = f" Full fine-tuning would need about {full:g} GB."
        return "lora", [
            f"LoRA needs about {lora:g} GB for a {size} model; your GPU has {gpu:g} GB." + other
        ], []
    if qlora <= gpu:
        return "qlora", [
            f"LoRA needs about {lora:g} GB for a {size} model, more than your GPU's {gpu:g} GB; "
            f"QLoRA keeps the base weights in 4 bits and needs about {qlora:g} GB."
        ], []
    return "qlora", [
        f"Even QLoRA needs about {qlora:g} GB for a {size} model; your GPU has {gpu:g} GB."
    ], [
        f"Even QLoRA does not fit on your GPU ({qlora:g} GB needed, {gpu:g} GB available): "
        f"pick a smaller base model, or a GPU with at least {qlora:g} GB."
    ]


def load_answers(path: str | Path) -> Answers:
    """Read an answer file (YAML, one key per Answers field); TunewiseError on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise TunewiseError(
            "answer file not found", file=path, fix=f"check the path, or copy {EXAMPLE_FILE}"
        )
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise TunewiseError(f"not UTF-8 text ({err.reason})", file=path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise TunewiseError(
            f"not valid YAML: {getattr(err, 'problem', None) or err}",
            file=path,
            line=mark.line + 1 if mark else None,
            fix=f"write one `key: value` per line, as in {EXAMPLE_FILE}",
        ) from None
    if not isinstance(data, dict):
        raise TunewiseError(
            f"expected a mapping of answers (`key: value` lines), got {type(data).__name__}",
            file=path,
            fix=f"write one `key: value` per line, as in {EXAMPLE_FILE}",
        )
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    try:
        return Answers.model_validate(data)
    except ValidationError as err:
        raise _answer_error(err.errors()[0], path, lines) from None


def _answer_error(error: Any, path: Path, lines: dict[str, int]) -> TunewiseError:
    """One pydantic error on an answer file, as a TunewiseError naming the key."""
    if not error["loc"]:  # a cross-field check
        return TunewiseError(
            error["msg"].removeprefix("Value error, "), file=path, fix=f"see {EXAMPLE_FILE}"
        )
    key = str(error["loc"][0])
    where: dict[str, Any] = {"file": path, "line": lines.get(key), "field": key}
    if error["type"] == "extra_forbidden":
        return TunewiseError(
            f"unknown key '{key}'",
            **where,
            fix="valid keys are: " + ", ".join(Answers.model_fields),
        )
    expected = _expected(_QUESTION[key])
    if error["type"] == "missing":
        return TunewiseError("missing answer", **where, fix=f"add `{key}:` with {expected}")
    return TunewiseError(
        f"expected {expected}, got {error['input']!r}", **where, fix=f"set `{key}:` to {expected}"
    )


def ask(prompt: Callable[[Question], str]) -> Answers:
    """Ask each question through `prompt` (show it, return the reply) and collect the answers.

    A reply that does not parse is explained and asked again, up to 3 times, then
    TunewiseError. `prompt_meets_target` is asked only when a prompt was tried.
    """
    values: dict[str, Any] = {}
    for q in QUESTIONS:
        if q.key == "prompt_meets_target" and not values["prompt_tried"]:
            continue
        values[q.key] = _ask_one(prompt, q)
    return Answers(**values)


def _ask_one(prompt: Callable[[Question], str], q: Question) -> Any:
    """The parsed reply to one question, re-asking on bad input."""
    for _ in range(ASK_ATTEMPTS):
        reply = prompt(q)
        try:
            return _parse(q, reply)
        except ValueError:
            print(f"  {reply!r} is not {_expected(q)}; please try again.")
    raise TunewiseError(
        f"no valid answer after {ASK_ATTEMPTS} tries", field=q.key, fix=f"answer {_expected(q)}"
    )


_BOOL_WORDS = {"yes": True, "y": True, "true": True, "no": False, "n": False, "false": False}


def _parse(q: Question, reply: str) -> Any:
    """The reply as a value of the question's field; ValueError if it is not one."""
    text = reply.strip().lower()
    if q.kind == "bool":
        if text not in _BOOL_WORDS:
            raise ValueError(text)
        value: Any = _BOOL_WORDS[text]
    elif q.kind == "int":
        value = int(text.replace(",", "").replace("_", ""))
    elif q.kind == "float":
        value = float(text)
    else:
        value = text
    return _FIELD[q.key].validate_python(value)  # checks choices and bounds


def _expected(q: Question) -> str:
    """What a valid answer to q looks like, in words."""
    if q.kind == "choice":
        return "one of: " + ", ".join(q.choices)
    if q.kind == "bool":
        return "yes or no (true or false)"
    noun = "a whole number" if q.kind == "int" else "a number"
    for bound in Answers.model_fields[q.key].metadata:  # annotated_types.Gt / Ge
        if getattr(bound, "gt", None) is not None:
            return f"{noun} greater than {bound.gt}"
        if getattr(bound, "ge", None) is not None:
            return f"{noun}, {bound.ge} or more"
    return noun
