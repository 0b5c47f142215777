"""Conversations and preference pairs: rendered with a chat template, masked to the assistant's tokens.

One implementation serves both sides of the launcher/rank line: the launcher checks every row before any
process starts (with the tokenizer's own files, read without torch: `planning.chat_files`), and the ranks
tokenize with the same functions and their loaded tokenizer (`train.tasks`), so what was checked is what
trains.

A conversation is a list of OpenAI-format messages (`role`: system, user, assistant or tool; `content`).
The supervised tokens of an assistant turn come from the template's `{% generation %}` blocks when it has
them, otherwise from rendering the conversation turn by turn and taking what each assistant turn adds,
which is only sound when the template is prefix-preserving (rendering more turns never changes the text of
the earlier ones); a template that is not must mark its assistant turns with `{% generation %}`.

Every supervised turn must end with the end-of-turn token inside its mask (trl#5988: a model trained
without it never stops); a row whose answer is truncated away entirely has nothing to learn from
(`RowProblem.empty`: data.on_missing decides).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# text, add_special_tokens → (token ids, (start, end) character offsets of each token in text)
Encoder = Callable[[str, bool], tuple[list[int], list[tuple[int, int]]]]


class RowProblem(ValueError):
    """Why one row cannot be trained on. `empty`: valid, but no answer token is left within max_length."""

    def __init__(self, reason: str, *, field: str, empty: bool = False):
        super().__init__(reason)
        self.field, self.empty = field, empty


def _turn_problem(messages: Any, what: str, *, needs_answer: bool) -> str | None:
    """What is wrong with a list of messages, or None."""
    if not isinstance(messages, list) or not messages:
        return f"{what} is not a non-empty list of messages"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"{what}: message {number} is not an object with a 'role'"
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            return f"{what}: message {number} has the unknown role {role!r} (roles: {', '.join(ROLES)})"
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            return f"{what}: message {number} ({role}) has no content"
        if content is not None and not isinstance(content, (str, list)):
            return f"{what}: message {number} ({role}) has a content that is neither text nor a list of parts"
    if needs_answer and not any(m["role"] == "assistant" for m in messages):
        return f"{what} has no assistant turn: there is nothing to learn"
    if needs_answer and messages[-1]["role"] == "tool":
        return f"{what} ends with a tool turn: the assistant's answer to the tool result is missing"
    return None


def conversation_problem(messages: Any) -> str | None:
    """A conversation to train on: known roles, contents, an assistant turn, and not a tool turn last."""
    return _turn_problem(messages, "the conversation", needs_answer=True)


def pair_problem(row: dict) -> str | None:
    """A preference pair: a prompt, and two different answers (each a text or assistant messages)."""
    for name in ("prompt", "chosen", "rejected"):
        value = row[name]
        if isinstance(value, list):
            problem = _turn_problem(value, name, needs_answer=name != "prompt")
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"{name} is {type(value).__name__}, expected a text or a list of messages"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are the same answer: the pair says nothing"
    return None


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and what it needs: the tokenizer's special tokens, and the token that ends a turn."""

    template: str
    variables: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as the template sees them
    end_of_turn: str = ""

    @property
    def tagged(self) -> bool:
        """The template marks assistant turns with {% generation %} blocks."""
        return bool(GENERATION_TAG.search(self.template))

    def _render(self, messages: list[dict], *, generation_prompt: bool = False, track: bool = False):
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # torch-free

        try:
            texts, blocks = render_jinja_template(
                [messages],
                chat_template=self.template,
                add_generation_prompt=generation_prompt,
                return_assistant_tokens_mask=track,
                **self.variables,
            )
        except TemplateError as exc:
            raise RowProblem(f"the chat template refused it: {exc}", field="task.chat_template_file") from None
        return texts[0], (blocks[0] if track else [])

    def render(self, messages: list[dict], *, generation_prompt: bool = False) -> str:
        return self._render(messages, generation_prompt=generation_prompt)[0]

    def spans(self, messages: list[dict], supervised: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each supervised message (by index)."""
        if self.tagged:
            text, blocks = self._render(messages, track=True)
            assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if len(blocks) != len(assistants):
                raise RowProblem(
                    f"the template's {{% generation %}} blocks ({len(blocks)}) do not match the "
                    f"{len(assistants)} assistant turns",
                    field="task.chat_template_file",
                )
            chosen = [blocks[k] for k, i in enumerate(assistants) if i in supervised]
        else:
            text, chosen = self.render(messages), []
            for i in supervised:
                before = self.render(messages[:i], generation_prompt=True)
                upto = self.render(messages[: i + 1])
                if not (text.startswith(upto) and upto.startswith(before)):
                    raise RowProblem(
                        f"the chat template renders turn {i + 1} differently once later turns follow (it is not "
                        "prefix-preserving), so the assistant's tokens cannot be found by rendering turn by turn; "
                        "give a template that marks them with {% generation %}...{% endgeneration %} "
                        "(task.chat_template_file)",
                        field="task.chat_template_file",
                    )
                chosen.append((len(before), len(upto)))
        return text, [self._through_end_of_turn(text, span) for span in chosen]

    def _through_end_of_turn(self, text: str, span: tuple[int, int]) -> tuple[int, int]:
        """A turn's span ends with its end-of-turn token: what the template writes after it (a newline) is not
        the model's to learn."""
        start, end = span
        cut = text.rfind(self.end_of_turn, start, end) if self.end_of_turn else -1
        if cut >= 0 and not text[cut + len(self.end_of_turn) : end].strip():
            return start, cut + len(self.end_of_turn)
        return span


@dataclass
class Encoded:
    """One token sequence and which of its tokens carry the loss (the assistant's)."""

    ids: list[int]
    mask: list[bool]

    @property
    def num_targets(self) -> int:
        """Supervised next-token targets (the first position predicts nothing)."""
        return sum(self.mask[1:])


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens overlapping a span (transformers' rule for return_assistant_tokens_mask)."""
    return [any(start < end_ and stop > start_ for start_, end_ in spans) for start, stop in offsets]


@dataclass
class PairEncoder:
    """Turns rows into masked token sequences, raising RowProblem for what cannot train; built per recipe with
    a ChatFormat (None: no template) and an Encoder, on the launcher (checks) and on the ranks (tokenize)."""

    fmt: ChatFormat | None
    encode: Encoder
    max_length: int
    last_assistant_only: bool = False
    template_for_text: bool = False  # format text prompt/answers as a user and an assistant turn
    eos_id: int | None = None
    end_of_turn_id: int | None = None

    def conversation(self, messages: list[dict], supervised: Sequence[int] | None = None) -> Encoded:
        """A rendered conversation; the loss on `supervised` (message indices; default: per train_on)."""
        if supervised is None:
            assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            supervised = assistants[-1:] if self.last_assistant_only else assistants
        if self.fmt is None:
            raise RowProblem(
                "messages need a chat template and the tokenizer has none; give one with task.chat_template_file",
                field="task.chat_template_file",
            )
        text, spans = self.fmt.spans(messages, supervised)
        ids, offsets = self.encode(text, False)
        mask = _mask(offsets, spans)
        for number, (start, end) in enumerate(spans, start=1):
            inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
            if not inside or ids[inside[-1]] != self.end_of_turn_id:
                tail = text[max(start, end - 24) : end]
                raise RowProblem(
                    f"supervised turn {number} does not end with the end-of-turn token {self.fmt.end_of_turn!r} "
                    f"inside its mask (it ends with {tail!r}), so the model would never learn to stop; set "
                    "task.end_of_turn to the token the template closes an assistant turn with",
                    field="task.end_of_turn",
                )
        return self._truncated(ids, mask)

    def plain(self, prompt: str, answer: str) -> Encoded:
        """Text without a template: the prompt (with the tokenizer's special tokens), the answer, EOS."""
        prompt_ids = self.encode(prompt, True)[0]
        answer_ids = self.encode(answer, False)[0] + ([self.eos_id] if self.eos_id is not None else [])
        return self._truncated(prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids))

    def answer(self, prompt: str | list[dict], answer: str | list[dict]) -> Encoded:
        """One side of a preference pair: the prompt followed by one answer, the loss on the answer."""
        if isinstance(prompt, str) and isinstance(answer, str) and not self.template_for_text:
            return self.plain(prompt, answer)
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        reply = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
        messages = turns + reply
        supervised = [i for i in range(len(turns), len(messages)) if messages[i]["role"] == "assistant"]
        return self.conversation(messages, supervised)

    def pair(self, row: dict) -> tuple[Encoded, Encoded]:
        chosen, rejected = self.answer(row["prompt"], row["chosen"]), self.answer(row["prompt"], row["rejected"])
        if chosen.ids == rejected.ids:
            raise RowProblem(
                f"chosen and rejected are the same within data.max_length={self.max_length}",
                field="data.max_length",
                empty=True,
            )
        return chosen, rejected

    def _truncated(self, ids: list[int], mask: list[bool]) -> Encoded:
        kept = Encoded(ids[: self.max_length], mask[: self.max_length])
        if not kept.num_targets:
            first = mask.index(True) if True in mask else len(mask)
            raise RowProblem(
                f"no answer token is left within data.max_length={self.max_length} (the answer starts at token "
                f"{first + 1} of {len(ids)})",
                field="data.max_length",
                empty=True,
            )
        return kept


def single_token(encode: Encoder, token: str, what: str) -> int:
    """The id of a special token that must be exactly one token (EOS, the end-of-turn token)."""
    ids = encode(token, False)[0]
    if len(ids) != 1:
        raise RowProblem(f"{what} {token!r} is {len(ids)} tokens for this tokenizer, not one", field="task.end_of_turn")
    return ids[0]


TEMPLATE_LIMIT = 1_000_000  # bytes: a chat template file is a few kB


def recipe_template(recipe) -> str | None:
    """The text of task.chat_template_file (which replaces the tokenizer's template), if the recipe names one."""
    path = recipe.task.chat_template_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(TEMPLATE_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise RowProblem(f"cannot read {path}: {exc}", field="task.chat_template_file") from None
    if len(text) > TEMPLATE_LIMIT:
        raise RowProblem(f"{path} is over {TEMPLATE_LIMIT} bytes: not a chat template", field="task.chat_template_file")
    return text


def pair_encoder(recipe, template: str | None, variables: dict, encode: Encoder, eos_token: str | None) -> PairEncoder:
    """The recipe's row encoder over a tokenizer seen as `encode`, its special tokens and its own template
    (the recipe's task.chat_template_file wins). Raises RowProblem for what no row can get past."""
    task = recipe.task
    template = recipe_template(recipe) or template
    eos_id = single_token(encode, eos_token, "the EOS token") if eos_token else None
    fmt = end_of_turn_id = None
    if template is not None:
        end_of_turn = task.end_of_turn or eos_token
        if not end_of_turn:
            raise RowProblem(
                "the tokenizer has no EOS token to end assistant turns with; set task.end_of_turn",
                field="task.end_of_turn",
            )
        fmt = ChatFormat(template, dict(variables), end_of_turn)
        end_of_turn_id = single_token(encode, end_of_turn, "the end-of-turn token")
    elif task.spec.rows == "conversation" or task.chat_template:
        raise RowProblem(
            "the tokenizer has no chat template; give one with task.chat_template_file", field="task.chat_template_file"
        )
    return PairEncoder(
        fmt,
        encode,
        recipe.data.max_length,
        last_assistant_only=task.train_on == "last_assistant",
        template_for_text=task.chat_template,
        eos_id=eos_id,
        end_of_turn_id=end_of_turn_id,
    )
