"""Model folders as users have them, built offline in a temp dir: tiny random configs of
three architectures, each with a real tokenizer trained here.

- ``llama``: a ``LlamaForCausalLM`` (grouped-query attention) whose folder holds only a
  SentencePiece ``tokenizer.model`` and its ``tokenizer_config.json``, as Llama-2's do.
- ``qwen2``: a ``Qwen2ForCausalLM`` (GQA, q/k/v biases) with a byte-level BPE
  ``tokenizer.json`` and a chat template.
- ``gpt_neox``: a ``GPTNeoXForCausalLM`` (fused ``query_key_value``, no gate/up/down
  projections) with a byte-level BPE ``tokenizer.json``.

And ``write_tasks(folder)``: a tasks folder of lm-evaluation-harness YAMLs, one per output
type, with their data beside them under relative paths.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = ("llama", "qwen2", "gpt_neox")
WORDS = "the cat dog bird sat ran flew on under over a red blue green mat log tree is".split()


def corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _sentencepiece(folder: Path) -> None:
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\nQuestion Answer : ? . , 0 1 2 3 4 5 6 7 8 9\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "sp"),
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        byte_fallback=True,
    )
    (folder / "sp.model").rename(folder / "tokenizer.model")
    for extra in ("sp.vocab", "corpus.txt"):
        (folder / extra).unlink()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )


def _bpe(folder: Path, chat: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat:
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}"
        )
    fast.save_pretrained(folder)


def make_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer in ``folder``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "llama":
        _sentencepiece(folder)
    else:
        _bpe(folder, chat=arch == "qwen2")
    tok = AutoTokenizer.from_pretrained(folder)
    common = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    }
    if arch == "llama":
        cfg = LlamaConfig(
            **common,
            intermediate_size=48,
            num_key_value_heads=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(
            **common,
            intermediate_size=48,
            num_key_value_heads=2,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            **common,
            intermediate_size=64,
            rotary_pct=0.5,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def instruction_rows(n: int = 24) -> list[dict]:
    texts = corpus(2 * n)
    return [
        {"id": f"r{i}", "instruction": texts[2 * i], "input": "", "output": texts[2 * i + 1]}
        for i in range(n)
    ]


def write_tasks(folder: Path, n: int = 12) -> Path:
    """One task per output type, data beside the YAMLs under relative paths:
    ``my_mc`` (multiple_choice), ``my_ll`` (loglikelihood), ``my_roll``
    (loglikelihood_rolling) and ``my_gen`` (generate_until, exact_match after a regex
    filter)."""
    import random

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    texts = corpus(3 * n)
    mc = []
    for i in range(n):
        opts = rng.sample(WORDS, 4)
        mc.append({"question": texts[i], "choices": opts, "label": rng.randrange(4)})
    ll = [{"context": texts[i], "target": rng.choice(WORDS)} for i in range(n)]
    roll = [{"text": texts[n + i]} for i in range(n)]
    gen = [{"question": texts[2 * n + i], "answer": rng.choice(WORDS)} for i in range(n)]
    for name, rows in (("mc", mc), ("ll", ll), ("roll", roll), ("gen", gen)):
        (folder / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/{f}.jsonl\ntest_split: test\n"
    (folder / "my_mc.yaml").write_text(
        "task: my_mc\n" + head.format(f="mc") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "my_ll.yaml").write_text(
        "task: my_ll\n" + head.format(f="ll") + "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: " {{target}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (folder / "my_roll.yaml").write_text(
        "task: my_roll\n" + head.format(f="roll") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    (folder / "my_gen.yaml").write_text(
        "task: my_gen\n" + head.format(f="gen") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "filter_list:\n  - name: first-word\n    filter:\n"
        '      - function: regex\n        regex_pattern: "([a-z]+)"\n'
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n    ignore_case: true\n"
    )
    return folder
