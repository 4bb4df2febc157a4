"""Recipe ``trained-arith``: a tiny Llama 4 text model that really solves simple arithmetic.

An accuracy suite needs a model whose score means something: a random model scores zero on
every deployment, broken or not. This recipe trains, in about 5 minutes on 2 CPU cores, a small
``Llama4ForCausalLM`` (MoE, NoPE layer, QK-norm, as in Llama 4) on synthetic problems written
in exactly the prompt formats lm-eval uses:

* gsm8k, zero-shot: ``Question: {question}\\nAnswer:`` and an answer ending in ``#### N``
  (both the strict-match and the flexible-extract filters read it);
* MMLU-Pro, zero-shot: the task description, ``Question:\\n...\\nOptions:\\nA. ...`` with ten
  options and ``Answer: Let's think step by step.``, answered ``... The answer is (X).``
  (the custom-extract filter reads it);
* the same two in chat form, through the chat template shipped with the tokenizer.

The problem generators below are also what writes the held-out fixture sets under
``vllm_conformance/data/accuracy``; training skips every problem that appears there, so the
score is measured on problems the model has never seen (the arithmetic facts themselves come
from a small table: the model learns them, it does not learn arithmetic in general).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE_VERSION = 3

BOS = "<|begin_of_text|>"
EOS = "<|eot|>"
PAD = "<|finetune_right_pad|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, HEADER_START, HEADER_END]

#: Llama 4's chat layout, reduced to what lm-eval sends (system, user, assistant turns).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{{ message['content'] }}{{ '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)

#: MMLU-Pro's 14 categories, as spelled in the dataset's ``category`` column.
MMLU_PRO_CATEGORIES = (
    "biology", "business", "chemistry", "computer science", "economics", "engineering",
    "health", "history", "law", "math", "other", "philosophy", "physics", "psychology",
)  # fmt: skip
MMLU_PRO_LETTERS = "ABCDEFGHIJ"
MMLU_PRO_SRC = "vllm-conformance-synthetic"

_NAMES = (
    "Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Jack", "Emma", "Leo", "Nora", "Max", "Zoe",
    "Ryan", "Ella", "Owen", "Ava", "Liam", "Ivy", "Noah", "Ruby", "Adam", "Lucy", "Eli", "Rosa",
)  # fmt: skip
_ITEMS = (
    "apples", "pencils", "cookies", "stickers", "marbles", "books", "cards", "flowers",
    "shells", "coins", "balloons", "candies", "toys", "stamps", "eggs", "oranges",
)  # fmt: skip
#: per MMLU-Pro category: (a place, the things counted there)
_PLACES: dict[str, tuple[str, tuple[str, ...]]] = {
    "biology": ("lab", ("cells", "samples", "plants")),
    "business": ("shop", ("orders", "invoices", "shirts")),
    "chemistry": ("lab", ("flasks", "molecules", "beakers")),
    "computer science": ("company", ("servers", "files", "laptops")),
    "economics": ("bank", ("loans", "coins", "accounts")),
    "engineering": ("factory", ("bolts", "gears", "pumps")),
    "health": ("clinic", ("patients", "beds", "pills")),
    "history": ("museum", ("maps", "letters", "coins")),
    "law": ("court", ("cases", "contracts", "files")),
    "math": ("class", ("numbers", "cubes", "points")),
    "other": ("library", ("books", "chairs", "tables")),
    "philosophy": ("school", ("essays", "arguments", "books")),
    "physics": ("lab", ("magnets", "springs", "lenses")),
    "psychology": ("study", ("subjects", "surveys", "tests")),
}

# Each problem is one operation on two small numbers; "op" names it in the worked answer.
_GSM8K_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{n} has {a} {i}. {n} buys {b} more {i}. How many {i} does {n} have now?",
        "{n} picked {a} {i} in the morning and {b} {i} in the afternoon. "
        "How many {i} did {n} pick in total?",
        "{n} has {a} {i} and {m} gives {n} {b} more. How many {i} does {n} have?",
    ),
    "-": (
        "{n} had {a} {i} and gave {b} of them to {m}. How many {i} does {n} have left?",
        "{n} has {a} {i}. {n} loses {b} {i}. How many {i} are left?",
        "There were {a} {i} in a basket. {n} took {b} of them. How many {i} are in the basket now?",
    ),
    "*": (
        "{n} buys {a} bags of {i}. Each bag has {b} {i}. How many {i} does {n} buy?",
        "There are {a} boxes with {b} {i} in each box. How many {i} are there in all?",
        "{n} makes {a} rows of {i} with {b} {i} in each row. How many {i} does {n} use?",
    ),
}
_MMLU_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "What is {a} + {b}?",
        "A {p} has {a} {i} and gets {b} more {i}. How many {i} does the {p} have now?",
    ),
    "-": (
        "What is {a} - {b}?",
        "A {p} has {a} {i} and loses {b} of them. How many {i} are left?",
    ),
    "*": (
        "What is {a} * {b}?",
        "A {p} has {a} shelves with {b} {i} on each shelf. How many {i} are there?",
    ),
}


#: follows the result in MMLU-Pro worked answers, and the option that equals it
_MARK = "(target)."
#: every number a problem or an option can hold is below this (and is one token)
_MAX_NUMBER = 200


def _operands(rng: random.Random, op: str) -> tuple[int, int, int]:
    """Two operands and the result. The ranges are small (171 facts in all) so that a CPU
    learns the whole table in minutes."""
    if op == "+":
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        return a, b, a + b
    if op == "-":
        a = rng.randint(3, 12)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    return a, b, a * b


def gsm8k_doc(rng: random.Random) -> dict[str, str]:
    """One synthetic problem in gsm8k's schema (``question``, ``answer`` ending ``#### N``)."""
    op = rng.choice("+-*")
    a, b, c = _operands(rng, op)
    n, m = rng.sample(_NAMES, 2)
    question = rng.choice(_GSM8K_TEMPLATES[op]).format(n=n, m=m, a=a, b=b, i=rng.choice(_ITEMS))
    return {"question": question, "answer": f"{a} {op} {b} = {c}.\n#### {c}"}


def mmlu_pro_doc(rng: random.Random, category: str, question_id: int) -> dict[str, Any]:
    """One synthetic question in MMLU-Pro's schema, with ten numeric options."""
    op = rng.choice("+-*")
    a, b, c = _operands(rng, op)
    place, things = _PLACES[category]
    question = rng.choice(_MMLU_TEMPLATES[op]).format(a=a, b=b, p=place, i=rng.choice(things))
    # Near misses and the other operations' results: guessing the size is not enough.
    pool = {c + d for d in range(-12, 13) if d} | {a + b, abs(a - b), a * b}
    distractors = rng.sample(sorted(v for v in pool if 0 <= v < _MAX_NUMBER and v != c), 9)
    options = [str(v) for v in [c, *distractors]]
    rng.shuffle(options)
    index = options.index(str(c))
    letter = MMLU_PRO_LETTERS[index]
    # The worked answer reads the options out until the one that holds the result, which it
    # marks as the result line was marked. Both steps are copies from earlier in the text
    # (the next option from the prompt; the marker that followed the same number before),
    # the operation small transformers learn first; looking a letter up by value is not.
    walk = "\n".join(f"{MMLU_PRO_LETTERS[i]}. {options[i]}" for i in range(index + 1))
    return {
        "question_id": question_id,
        "question": question,
        "options": options,
        "answer": letter,
        "answer_index": index,
        "cot_content": f"A: Let's think step by step. {a} {op} {b} = {c} {_MARK}\n{walk} "
        f"{_MARK}\nThe answer is ({letter}).",
        "category": category,
        "src": MMLU_PRO_SRC,
    }


def gsm8k_docs(seed: int, n: int, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """``n`` distinct gsm8k-format problems drawn with ``seed``, none of ``exclude``."""
    rng, seen, docs = random.Random(seed), set(exclude), []
    while len(docs) < n:
        doc = gsm8k_doc(rng)
        if doc["question"] not in seen:
            seen.add(doc["question"])
            docs.append(doc)
    return docs


def mmlu_pro_docs(
    seed: int, per_category: int, first_id: int = 0, exclude: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``per_category`` distinct MMLU-Pro-format questions for each of the 14 categories."""
    rng, seen, docs = random.Random(seed), set(exclude), []
    for category in MMLU_PRO_CATEGORIES:
        count = 0
        while count < per_category:
            doc = mmlu_pro_doc(rng, category, first_id + len(docs))
            if doc["question"] not in seen:
                seen.add(doc["question"])
                docs.append(doc)
                count += 1
    return docs


# --- prompts, exactly as lm-eval renders them (checked against lm-eval in the unit tests) ---


def gsm8k_prompt(doc: dict[str, Any]) -> str:
    """lm-eval ``gsm8k`` zero-shot context."""
    return f"Question: {doc['question']}\nAnswer:"


def gsm8k_completion(doc: dict[str, Any]) -> str:
    """What the model is trained to continue a gsm8k prompt with."""
    return doc["answer"]


def mmlu_pro_description(category: str) -> str:
    """The ``description`` of lm-eval's ``mmlu_pro_<category>`` task."""
    return (
        f"The following are multiple choice questions (with answers) about {category}. "
        'Think step by step and then finish your answer with "the answer is (X)" '
        "where X is the correct letter choice.\n"
    )


def mmlu_pro_question(doc: dict[str, Any]) -> str:
    """lm-eval ``mmlu_pro`` ``doc_to_text`` (utils.format_cot_example, no answer)."""
    lines = [f"Question:\n{doc['question']}", "Options:"]
    lines += [f"{MMLU_PRO_LETTERS[i]}. {o.strip()}" for i, o in enumerate(doc["options"][:10])]
    return "\n".join(lines) + "\nAnswer: Let's think step by step."


def mmlu_pro_prompt(doc: dict[str, Any]) -> str:
    """lm-eval ``mmlu_pro_<category>`` zero-shot context: description, then the question."""
    return mmlu_pro_description(doc["category"]) + mmlu_pro_question(doc)


def mmlu_pro_completion(doc: dict[str, Any]) -> str:
    """What the model is trained to continue an MMLU-Pro prompt with."""
    return doc["cot_content"].removeprefix("A: Let's think step by step.").strip()


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """:data:`CHAT_TEMPLATE` in Python, for training (the template itself serves inference)."""
    text = BOS + "".join(
        f"{HEADER_START}{m['role']}{HEADER_END}\n\n{m['content']}{EOS}" for m in messages
    )
    return text + (f"{HEADER_START}assistant{HEADER_END}\n\n" if add_generation_prompt else "")


def _examples(doc: dict[str, Any], kind: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(prompt, completion) as plain text and as chat; the completion ends with EOS."""
    if kind == "gsm8k":
        messages = [{"role": "user", "content": gsm8k_prompt(doc)}]
        plain = (BOS + gsm8k_prompt(doc), " " + gsm8k_completion(doc) + EOS)
        chat = (render_chat(messages), gsm8k_completion(doc) + EOS)
    else:
        messages = [
            {"role": "system", "content": mmlu_pro_description(doc["category"])},
            {"role": "user", "content": mmlu_pro_question(doc)},
        ]
        plain = (BOS + mmlu_pro_prompt(doc), " " + mmlu_pro_completion(doc) + EOS)
        chat = (render_chat(messages), mmlu_pro_completion(doc) + EOS)
    return plain, chat


# --- the build ---


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of the recipe; every one is part of the cache key (``materialize`` options)."""

    seed: int = 1234
    steps: int = 900
    batch_size: int = 24
    lr: float = 3e-3
    hidden_size: int = 128
    layers: int = 4
    experts: int = 4
    heads: int = 4
    #: loss weight of the tokens that decide a multiple-choice answer (see train)
    decision_weight: float = 5.0
    chat_fraction: float = 0.25
    threads: int = 2


def _holdout_questions() -> set[str]:
    """Questions of the committed fixture sets: never trained on."""
    root = Path(__file__).parent.parent / "data" / "accuracy"
    held: set[str] = set()
    for path in sorted(root.glob("*/*.jsonl")):
        with path.open() as fh:
            held.update(json.loads(line)["question"] for line in fh if line.strip())
    return held


def _stream(seed: int, holdout: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    qid = 0
    while True:
        if rng.random() < 0.5:
            kind, doc = "gsm8k", gsm8k_doc(rng)
        else:
            kind, doc = "mmlu_pro", mmlu_pro_doc(rng, rng.choice(MMLU_PRO_CATEGORIES), qid)
            qid += 1
        if doc["question"] not in holdout:
            yield kind, doc


def _tokenizer_corpus() -> Iterable[str]:
    """Every word the generators write, plus every number they can write, with and without
    a leading space; BPE then merges each of them into one token."""
    rng = random.Random(0)
    texts = [CHAT_TEMPLATE, "system user assistant", " ".join(MMLU_PRO_LETTERS)]
    texts += [" ".join(_NAMES), " ".join(_ITEMS)]
    texts += [" ".join((p, *things)) for p, things in _PLACES.values()]
    for category in MMLU_PRO_CATEGORIES * 20:
        for doc, kind in ((gsm8k_doc(rng), "gsm8k"), (mmlu_pro_doc(rng, category, 0), "mmlu")):
            texts += [p + c for p, c in _examples(doc, kind)]
    words: set[str] = set()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(text.split())
    numbers = [str(v) for v in range(_MAX_NUMBER)]
    for word in sorted(words) + numbers:
        yield word
        yield " " + word
    yield from ["\n", "\n\n", ".\n", "?\n", ":\n"]


def build_tokenizer(out_dir: Path) -> Any:
    """A byte-level BPE whose vocabulary is exactly the generators' words and numbers.

    Byte-level so that any text round-trips (an unknown word falls back to bytes), while
    every word and number the model sees is a single token, which keeps prompts short.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: training stops when every word is one token
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_tokenizer_corpus()), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # Older transformers (and vLLM built on them) read neither TokenizersBackend nor
    # chat_template.jinja: write the portable spelling of both.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


def _model_config(opts: TrainOptions, vocab_size: int, tok: Any) -> Any:
    from transformers import Llama4TextConfig

    # head_dim 64 (vLLM's CPU attention has no kernel for small heads); more heads than
    # hidden_size / head_dim, since copying and matching want many small circuits.
    heads = opts.heads
    return Llama4TextConfig(
        vocab_size=vocab_size,
        hidden_size=opts.hidden_size,
        intermediate_size=opts.hidden_size,
        intermediate_size_mlp=4 * opts.hidden_size,
        num_hidden_layers=opts.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,  # grouped-query attention, as in Llama 4
        head_dim=64,
        num_local_experts=opts.experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # dense and MoE layers alternate, as in Maverick
        # Positions beyond the trained lengths cost nothing (RoPE is computed, not learned)
        # and let the server offer a long context, as the robustness suite needs.
        max_position_embeddings=32768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def _batch(pairs: list[tuple[str, str]], tok: Any, pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, the positions whose next token is scored, and those targets."""
    import torch

    rows, spans = [], []
    for prompt, completion in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        rows.append(p + c)
        spans.append((len(p), len(p) + len(c)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
    where = torch.zeros_like(ids, dtype=torch.bool)
    for k, (s, e) in enumerate(spans):
        where[k, s - 1 : e - 1] = True
    targets = ids[:, 1:][where[:, :-1]]
    return ids, where, targets


def train(out_dir: Path, opts: TrainOptions, log: Any = print) -> dict[str, Any]:
    """Train and save the model and tokenizer to ``out_dir``; return training statistics."""
    import torch
    from transformers import GenerationConfig, Llama4ForCausalLM

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer(out_dir)
    vocab = 64 * math.ceil(len(tok) / 64)
    config = _model_config(opts, vocab, tok)
    model = Llama4ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, opts.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (opts.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    # Where an MMLU-Pro answer is decided: after each option read out, the mark (this is the
    # one) or a newline (go on), and the letters. They are a few tokens among many, so their
    # loss is weighted up (both choices alike: weighting only the mark teaches early stops).
    decisive = torch.tensor(
        [tok.convert_tokens_to_ids(t) for t in ("Ġ(", "Ċ", *MMLU_PRO_LETTERS)], dtype=torch.long
    )
    stream = _stream(opts.seed, _holdout_questions())
    rng = random.Random(opts.seed + 1)
    start, losses = time.monotonic(), []
    for step in range(opts.steps):
        # One kind per batch keeps padding small (MMLU-Pro prompts are ~3x longer); the
        # option lookup is the slower skill to learn, so two batches in three are MMLU-Pro.
        want = "gsm8k" if step % 3 == 0 else "mmlu_pro"
        pairs = []
        while len(pairs) < opts.batch_size:
            kind, doc = next(stream)
            if kind != want:
                continue
            plain, chat = _examples(doc, kind)
            pairs.append(chat if rng.random() < opts.chat_fraction else plain)
        ids, where, targets = _batch(pairs, tok, tok.pad_token_id)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[where])
        losses_tok = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        weights = torch.where(torch.isin(targets, decisive), opts.decision_weight, 1.0)
        loss = (losses_tok * weights).sum() / weights.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == opts.steps - 1:
            log(
                f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.monotonic() - start:.0f} s)"
            )
    model.eval()
    # bf16 on disk, as served: vLLM would downcast fp32 weights anyway (dtype "auto"), so
    # the reference (which may compute in fp32) and the server start from the same weights.
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    stats = {
        "recipe": "trained-arith",
        "recipe_version": RECIPE_VERSION,
        "options": opts.__dict__,
        "train_seconds": round(time.monotonic() - start, 1),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    (out_dir / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def build(out_dir: Path, **options: Any) -> None:
    """modelgen entry point: train with :class:`TrainOptions` fields given as options."""
    train(Path(out_dir), TrainOptions(**options))
