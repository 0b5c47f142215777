"""Conversations and preference pairs: assistant-only masks checked token by token against golden masks for
three template styles (SmolLM2's ChatML as shipped, a Llama-3-style and a Gemma-style string template), with
system and tool turns and truncation; the launcher's check (the tokenizer's files, no torch) and the ranks'
tokenization (the loaded tokenizer) agree token for token; the row checks name what cannot train.
"""

from __future__ import annotations

import pytest

from launcher.config.recipe import Recipe
from launcher.planning.chat_checks import check_rows, file_encoder
from launcher.planning.conversations import RowProblem, conversation_problem, pair_problem
from launcher.train.model import load_tokenizer
from launcher.train.tasks import IGNORE, hooks

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
    "<|start_header_id|>{{ role }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma folds the system prompt into the first user turn, names the assistant "model", has no tool role, and
# closes a turn with <end_of_turn>, which is not its EOS token (<eos>)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# ChatML with {% generation %} blocks, and a template that shortens earlier assistant turns (as templates that
# drop earlier reasoning do): not prefix-preserving, so only generation blocks can say which tokens are whose
CHATML_TAGGED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHORTENS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{OPEN}{{ (m['content'] if loop.last else '...') + '<|im_end|>' }}{CLOSE}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "calculator(2 + 2)"},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "two plus two is four."},
]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "four."},
    {"role": "user", "content": "And two more?"},
    {"role": "assistant", "content": "six."},
]
CALCULATOR = ["calcul", "ator", "(", "2", "Ġ+", "Ġ", "2", ")"]
ANSWER = ["two", "Ġplus", "Ġtwo", "Ġis", "Ġfour", "."]
# style: (template (None: SmolLM2's own), special tokens, task settings, conversation, golden supervised tokens)
STYLES = {
    "chatml": (None, {}, {}, TOOL_CHAT, [*CALCULATOR, "<|im_end|>", *ANSWER, "<|im_end|>"]),
    "llama3": (
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        {},
        TOOL_CHAT,
        [*CALCULATOR, "<|eot_id|>", *ANSWER, "<|eot_id|>"],
    ),
    "gemma": (
        GEMMA,
        {"bos_token": "<bos>", "eos_token": "<eos>"},
        {"end_of_turn": "<end_of_turn>"},
        TWO_TURNS,
        ["four", ".", "<end_of_turn>", "six", ".", "<end_of_turn>"],
    ),
}
NEW_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>"]
NEW_TOKENS += ["<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def styles(smollm2_tokenizer, tmp_path_factory) -> dict[str, str]:
    """A tokenizer folder per style: SmolLM2's BPE with each family's special tokens and template."""
    from transformers import AutoTokenizer

    folders = {}
    for name, (template, specials, _, _, _) in STYLES.items():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS, **specials})
        if template is not None:
            tokenizer.chat_template = template
        folder = tmp_path_factory.mktemp(name)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def chat_recipe(model: str, task: dict | None = None, **data) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": model},
            "task": {"type": "chat", **(task or {})},
            "data": {"train": "unused.jsonl", "max_length": 128, **data},
            "output_dir": "unused",
        }
    )


def supervised(tokenizer, row: dict) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(t) for t in row["labels"] if t != IGNORE]


@pytest.mark.parametrize("style", list(STYLES))
def test_golden_masks_on_the_ranks_and_in_the_launcher(styles, style):
    _, _, task, conversation, golden = STYLES[style]
    recipe = chat_recipe(styles[style], task)
    tokenizer = load_tokenizer(recipe)
    row = hooks(recipe, tokenizer).tokenize({"messages": conversation})
    assert supervised(tokenizer, row) == golden
    assert row["weight"] == len(golden)
    # the launcher's check renders and tokenizes the same tokens from the files alone
    seq = file_encoder(recipe, styles[style]).conversation(conversation)
    assert seq.ids == row["input_ids"]
    assert [t if m else IGNORE for t, m in zip(seq.ids, seq.mask)] == row["labels"]
    # last_assistant: only the final answer
    last = hooks(chat_recipe(styles[style], {**task, "train_on": "last_assistant"}), tokenizer)
    assert supervised(tokenizer, last.tokenize({"messages": conversation})) == golden[golden.index(golden[-1]) + 1 :]


@pytest.mark.parametrize("style", list(STYLES))
def test_truncation_keeps_the_supervised_tokens_that_fit(styles, style):
    _, _, task, conversation, golden = STYLES[style]
    full = hooks(chat_recipe(styles[style], task), load_tokenizer(chat_recipe(styles[style], task)))
    ids, labels = (full.tokenize({"messages": conversation})[k] for k in ("input_ids", "labels"))
    last_answer = max(i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    recipe = chat_recipe(styles[style], task, max_length=last_answer + 2)  # 2 tokens of the last answer fit
    tokenizer = load_tokenizer(recipe)
    row = hooks(recipe, tokenizer).tokenize({"messages": conversation})
    first_answer = golden.index(golden[-1]) + 1
    assert supervised(tokenizer, row) == golden[:first_answer] + golden[first_answer : first_answer + 2]
    assert row["input_ids"] == ids[: last_answer + 2]


def test_generation_blocks_give_the_diffed_mask_and_are_needed_when_the_template_re_renders(smollm2_tokenizer):
    from transformers import AutoTokenizer

    recipe = chat_recipe(smollm2_tokenizer)
    tokenizer = load_tokenizer(recipe)
    by_diff = hooks(recipe, tokenizer).tokenize({"messages": TOOL_CHAT})
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    tokenizer.chat_template = CHATML_TAGGED  # the same text as SmolLM2's own (a system turn is given)
    by_tags = hooks(recipe, tokenizer).tokenize({"messages": TOOL_CHAT})
    assert by_tags["input_ids"] == by_diff["input_ids"] and by_tags["labels"] == by_diff["labels"]
    tokenizer.chat_template = SHORTENS.replace("{OPEN}", "").replace("{CLOSE}", "")
    with pytest.raises(RowProblem, match="not prefix-preserving.*generation"):
        hooks(recipe, tokenizer).tokenize({"messages": TWO_TURNS})
    tokenizer.chat_template = SHORTENS.replace("{OPEN}", "{% generation %}").replace("{CLOSE}", "{% endgeneration %}")
    row = hooks(recipe, tokenizer).tokenize({"messages": TWO_TURNS})
    assert "".join(supervised(tokenizer, row)) == "...<|im_end|>six.<|im_end|>"


def test_a_turn_that_does_not_end_with_the_end_of_turn_token_is_refused(styles):
    """Gemma closes turns with <end_of_turn>, not its EOS: without task.end_of_turn nothing would teach the
    model to stop (trl#5988), so the row is refused naming the setting."""
    recipe = chat_recipe(styles["gemma"])
    with pytest.raises(RowProblem, match="does not end with the end-of-turn token '<eos>'") as caught:
        file_encoder(recipe, styles["gemma"]).conversation(TWO_TURNS)
    assert caught.value.field == "task.end_of_turn"


def test_structure_problems_are_named():
    assert conversation_problem(TOOL_CHAT) is None
    assert "no assistant turn" in conversation_problem(TOOL_CHAT[:2])
    assert "ends with a tool turn" in conversation_problem(TOOL_CHAT[:4])
    assert "unknown role 'bot'" in conversation_problem([{"role": "bot", "content": "hi"}])
    assert "message 2 (user) has no content" in conversation_problem([TOOL_CHAT[0], {"role": "user"}])
    assert conversation_problem([]) is not None and conversation_problem("hello") is not None
    assert pair_problem({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) is None
    assert "the same answer" in pair_problem({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."})
    assert "chosen has no assistant turn" in pair_problem(
        {"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}
    )


def test_rows_with_nothing_left_after_truncation_follow_on_missing(smollm2_tokenizer):
    """An over-long system prompt leaves no assistant token within max_length: an error naming the row, or
    (data.on_missing=drop) dropped and counted."""
    long = [{"role": "system", "content": "Rules. " * 200}, *TOOL_CHAT[1:]]
    rows = [{"messages": TOOL_CHAT}, {"messages": long}, {"messages": TOOL_CHAT[:2]}]
    recipe = chat_recipe(smollm2_tokenizer, max_length=64)
    kept, problems, dropped = check_rows(rows, recipe, "train file t.jsonl", file_encoder(recipe, smollm2_tokenizer))
    assert kept == rows[:1] and dropped == 0
    assert {p.path for p in problems} == {"data.messages_field", "data.on_missing"}
    text = " ".join(p.message for p in problems)
    assert "row 3: the conversation has no assistant turn" in text
    assert "row 2: no answer token is left within data.max_length=64" in text
    recipe = chat_recipe(smollm2_tokenizer, max_length=64, on_missing="drop")
    kept, problems, dropped = check_rows(rows[:2], recipe, "t", file_encoder(recipe, smollm2_tokenizer))
    assert kept == rows[:1] and problems == [] and dropped == 1


def test_preference_pairs_share_the_prompt_and_mask_each_answer(word_llama, tmp_path):
    recipe = Recipe.model_validate(
        {
            "model": {"path": word_llama},
            "task": {"type": "preference", "chat_template": True},
            "data": {"train": "unused.jsonl", "max_length": 64},
            "output_dir": str(tmp_path),
        }
    )
    tokenizer = load_tokenizer(recipe)
    task = hooks(recipe, tokenizer)
    row = task.tokenize({"prompt": "Describe the cat.", "chosen": "The cat is kind.", "rejected": "The cat is rude."})
    tokens = {side: tokenizer.convert_ids_to_tokens(row[f"{side}_input_ids"]) for side in ("chosen", "rejected")}
    assert tokens["chosen"] == [
        "<user>",
        "describe",
        "the",
        "cat",
        ".",
        "</s>",
        "<assistant>",
        "the",
        "cat",
        "is",
        "kind",
        ".",
        "</s>",
    ]
    assert tokens["rejected"][:7] == tokens["chosen"][:7]
    for side, word in (("chosen", "kind"), ("rejected", "rude")):
        assert supervised(tokenizer, {"labels": row[f"{side}_labels"]}) == ["the", "cat", "is", word, ".", "</s>"]
    batch = task.collate([row, row], lambda rows: {"n": len(rows), "first": rows[0]["labels"]})
    assert batch["n"] == 4 and batch["first"] == row["chosen_labels"]  # [chosen, chosen, rejected, rejected]
