"""The lab's tiny base model: a word-level tokenizer and a ``LlamaForCausalLM``
pretrained from scratch on the lab corpus with the ``transformers`` Trainer.

Saved with ``save_pretrained``, it loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` like any real model, chat template included, so every
code path (LoRA targets ``gate_proj, up_proj, down_proj``, chat formatting) is the same as
for a real Llama.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from dtm import threads

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# One chat format for every instruction family (as TULU's is common to its sources). Its
# role markers are ordinary words, as Llama-2's [INST] is made of ordinary tokens, and
# the pretraining corpus holds some dialogues in a form close to it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %} system : {{ m['content'] }}"
    "{% elif m['role'] == 'user' %} user : {{ m['content'] }}"
    "{% else %} assistant : {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} assistant :{% endif %}"
)
MODEL_SIZES = {
    "small": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "default": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    },
}


def build_tokenizer(texts: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every space-separated
    word of ``texts`` (sorted, so the same texts give the same ids) plus the specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()} - set(SPECIALS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<system>", "<user>", "<assistant>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, size: str = "default", seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SIZES[size],
    )
    return LlamaForCausalLM(cfg)


def pack_documents(
    docs: list[str], tokenizer, block: int, seed: int, passes: int = 4
) -> list[dict]:
    """Blocks of ``block`` tokens holding whole documents (each ending in ``</s>``), padded
    at the end (pad positions carry label -100). Each pass packs a fresh shuffle."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rng = random.Random(f"pack-{seed}")
    blocks = []
    for _ in range(passes):
        order = list(range(len(docs)))
        rng.shuffle(order)
        cur = [bos]
        for i in order:
            doc = ids[i][: block - 2] + [eos]
            if len(cur) + len(doc) > block:
                blocks.append(cur)
                cur = [bos]
            cur += doc
        blocks.append(cur)
    out = []
    for b in blocks:
        n = len(b)
        out.append(
            {
                "input_ids": b + [pad] * (block - n),
                "attention_mask": [1] * n + [0] * (block - n),
                "labels": b + [-100] * (block - n),
            }
        )
    return out


def pretrain(
    model,
    tokenizer,
    docs: list[str],
    *,
    steps: int,
    batch_size: int = 32,
    block: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    workdir: str | Path,
    progress: Callable[[str, float], None] | None = None,
    stop_at: int | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``docs``; returns the Trainer's log history.
    ``stop_at`` ends it after that many of its ``steps`` (the schedule stays the whole
    run's), for checking a run's beginning against a record of the whole."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    blocks = pack_documents(
        docs,
        tokenizer,
        block,
        seed,
        passes=max(1, math.ceil(steps * batch_size / max(len(docs) // 4, 1))),
    )

    class Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            threads.rebalance()
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True
            if progress and state.global_step % 10 == 0:
                progress("pretraining the base model", state.global_step / steps)

    args = TrainingArguments(
        output_dir=str(workdir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, steps // 10),
        weight_decay=0.01,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=blocks, callbacks=[Report()])
    trainer.remove_callback(PrinterCallback)  # keep stdout for our own report
    trainer.train()
    if progress:
        progress("pretraining the base model", 1.0)
    return trainer.state.log_history
