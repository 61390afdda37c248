"""LLM unlearning on a tiny Llama trained here (issue 5): does SEMU raise the forget texts' perplexity while the
retain texts' stays put? No LLM weights are available offline, so the model is a small LlamaForCausalLM trained
for a few minutes on synthetic facts ("p17 lives in c3 and works as j8 ."), one fact per person; the forget set
is the facts of 10% of the people. Reports forget and retain perplexity before and after for each forget loss,
with and without training on the retain texts, next to the trainable share.

    python benchmarks/quality/llm_tiny.py [--seed 0] [--people 300] [--train-steps 1500] [--json F]

The tokenizer is word-level over the facts' vocabulary (tokenizers' WordLevel), saved with the model so that
the run goes through the same load_causal_lm path as a real local model."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import Table, device_name, parser as make_parser  # noqa: E402
from semu_fast._utils import default_cache  # noqa: E402
from semu_fast.workflows import llm  # noqa: E402

CITIES, JOBS = 20, 20


def facts(people: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    city = torch.randint(0, CITIES, (people,), generator=gen).tolist()
    job = torch.randint(0, JOBS, (people,), generator=gen).tolist()
    return [f"p{i} lives in c{city[i]} and works as j{job[i]} ." for i in range(people)]


def save_tiny_llama(folder: Path, people: int, seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["lives", "in", "and", "works", "as", "."] + [f"p{i}" for i in range(people)] + \
        [f"c{i}" for i in range(CITIES)] + [f"j{i}" for i in range(JOBS)]
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=2,
                         eos_token_id=3, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train(model, batches, steps: int, seed: int) -> None:
    """Plain next-token training until the facts are memorised (AdamW, cosine decay)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        batch = batches[int(torch.randint(0, len(batches), (1,), generator=gen))]
        loss = llm.nll_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def fact_recall(model, tokenizer, batches) -> float:
    """Percent of city and job tokens the model predicts (argmax) from the text before them: what it remembers."""
    fact_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"c{i}" for i in range(CITIES)] +
                                                            [f"j{i}" for i in range(JOBS)]))
    hits = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        is_fact = torch.isin(targets, fact_ids)
        hits += int((logits.argmax(-1) == targets)[is_fact].sum())
        total += int(is_fact.sum())
    return 100.0 * hits / total


def main(argv=None):
    parser = make_parser(__doc__, repeats=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="one run per learning rate")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target-modules", nargs="+", default=["mlp.down_proj"])
    parser.add_argument("--cache-dir", type=Path, default=default_cache())
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.people, args.train_steps, args.epochs = 20, 2, 1
        args.cache_dir = args.cache_dir / "quick"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    texts = facts(args.people, args.seed)
    n_forget = args.people // 10
    forget_texts, retain_texts = texts[:n_forget], texts[n_forget:]
    folder = args.cache_dir / f"tiny-llama-facts-seed{args.seed}-people{args.people}-steps{args.train_steps}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")  # trained and saved whole, then renamed
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_llama(tmp, args.people, args.seed)
        model, tokenizer = llm.load_causal_lm(tmp)
        start = time.perf_counter()
        train(model, llm.make_batches(tokenizer, texts, 32, 32), args.train_steps, args.seed)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s")
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    model, tokenizer = llm.load_causal_lm(folder, device=device)
    forget = llm.make_batches(tokenizer, forget_texts, 32, 8)
    retain = llm.make_batches(tokenizer, retain_texts, 32, 8)
    print(f"trained model: forget ppl {llm.perplexity(model, forget):.3f}, retain ppl "
          f"{llm.perplexity(model, retain):.3f}, fact recall forget {fact_recall(model, tokenizer, forget):.1f}% "
          f"retain {fact_recall(model, tokenizer, retain):.1f}%")
    table = Table(f"SEMU on a tiny Llama trained on synthetic facts, {device_name(device)}", args.json)
    for lr in args.lr:
        for forget_loss in ("ascent", "random"):
            for on_retain in (False, True):
                model, _ = llm.load_causal_lm(folder, device=device)  # the trained model again, untouched
                start = time.perf_counter()
                semu_model, report, metrics = llm.unlearn_llm(
                    model, forget, retain, target_modules=tuple(args.target_modules), gamma=args.gamma,
                    forget_loss=forget_loss, train_on_retain=on_retain, lr=lr, epochs=args.epochs,
                    seed=args.seed, progress=False)
                row = {"lr": lr, "forget_loss": forget_loss, "train_on_retain": on_retain,
                       "forget_recall": fact_recall(semu_model, tokenizer, forget),
                       "retain_recall": fact_recall(semu_model, tokenizer, retain),
                       "seconds": time.perf_counter() - start, "ranks": [layer.k for layer in report.layers],
                       **{key: metrics[key] for key in ("forget_ppl_before", "forget_ppl_after",
                                                        "retain_ppl_before", "retain_ppl_after",
                                                        "trainable_share")}}
                table.add({k: v for k, v in row.items() if k != "ranks"})
                print(f"lr {lr:g} {forget_loss:6s} retain-trained={str(on_retain):5s}: forget ppl "
                      f"{row['forget_ppl_before']:.3f} -> {row['forget_ppl_after']:.4g}, retain ppl "
                      f"{row['retain_ppl_before']:.3f} -> {row['retain_ppl_after']:.4g}, recall forget "
                      f"{row['forget_recall']:.1f}% retain {row['retain_recall']:.1f}%, trainable "
                      f"{row['trainable_share']:.4f}% (ranks {row['ranks']}), {row['seconds']:.1f} s")
    table.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
