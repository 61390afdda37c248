"""`semu-fast unlearn-llm`: SEMU on a local transformers causal LM, forgetting the texts or question/answer pairs of
a file.

    semu-fast unlearn-llm --model ./my-llama --forget-texts forget.txt --retain-texts retain.txt --out out --lora
    semu-fast unlearn-llm --model ./my-llama --forget-file forget.jsonl --retain-file retain.jsonl --loss npo \
        --retain-loss kl --out out

writes out/adapters (sf.load_adapters), out/metrics.json (forget and retain perplexity before and after, settings,
per-layer ranks) and, with --lora, out/lora (a peft LoRA adapter folder). Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import (add_device_flag, add_run_flags, add_training_flags, finish_run, positive, require, settings,
                      silence)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _read_texts(path: Path, flag: str, parser) -> list:
    """One text per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as err:
        parser.error(f"argument {flag}: cannot read {path} ({err})")
    texts = [line for line in lines if line.strip()]
    if not texts:
        parser.error(f"argument {flag}: {path} holds no text (one text per line)")
    return texts


def _loss_arg(text: str) -> tuple:
    """KEY=VALUE, the value read as JSON when it parses (numbers, true/false) and as a string otherwise."""
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. beta=0.2), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _read_records(path: Path, flag: str, parser) -> list:
    from ..workflows.llm_data import load_records

    try:
        return load_records(path)
    except ValueError as err:
        parser.error(f"argument {flag}: {err}")


def _batches(tokenizer, args, kind: str, parser, alternate: bool):
    """Batches from --{kind}-texts or --{kind}-file (None when neither is given)."""
    from ..workflows import llm

    texts, file = getattr(args, f"{kind}_texts"), getattr(args, f"{kind}_file")
    if file is not None:
        records = _read_records(file, f"--{kind}-file", parser)
        return llm.make_record_batches(tokenizer, records, args.max_length, args.batch_size,
                                       alternate=alternate and kind == "forget", seed=args.seed)
    if texts is not None:
        return llm.make_batches(tokenizer, _read_texts(texts, f"--{kind}-texts", parser), args.max_length,
                                args.batch_size)
    return None


def register(subparsers) -> None:
    """Add the `unlearn-llm` subcommand to an argparse subparsers object."""
    from ..workflows.llm import FORGET_LOSSES, RETAIN_LOSSES

    p = subparsers.add_parser("unlearn-llm", help="forget texts from a local transformers causal LM with SEMU",
                              description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=Path, required=True, help="local folder of a transformers causal LM (and its "
                   "tokenizer), as save_pretrained writes it")
    forget = g.add_mutually_exclusive_group(required=True)
    forget.add_argument("--forget-texts", type=Path, metavar="FILE", help="texts to forget, one a line")
    forget.add_argument("--forget-file", type=Path, metavar="FILE", help="records to forget, JSONL (one object a "
                        "line) or JSON (a list): {\"question\", \"answer\"} pairs (the loss on the answer only; "
                        "optional \"alternate\" answers) or {\"text\"}")
    retain = g.add_mutually_exclusive_group()
    retain.add_argument("--retain-texts", type=Path, default=None, metavar="FILE",
                        help="texts to keep, one a line: their perplexity is reported (and trained on with "
                        "--train-on-retain, --retain-loss or a loss that needs them)")
    retain.add_argument("--retain-file", type=Path, default=None, metavar="FILE",
                        help="records to keep, as --forget-file")
    g.add_argument("--max-length", type=positive(int), default=256, help="tokens per text, at most")
    g.add_argument("--batch-size", type=positive(int), default=8)
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="load the model in this dtype (auto: as saved)")
    add_device_flag(g)
    g = p.add_argument_group("SEMU")
    g.add_argument("--target-modules", action="append", default=None, metavar="PATTERN",
                   help="regular expression searched in layer names; repeat for several (default mlp.down_proj)")
    g.add_argument("--loss", "--forget-loss", dest="forget_loss", choices=tuple(FORGET_LOSSES), default="ascent",
                   metavar="LOSS", help="forget objective: ascent (-NLL), random (NLL towards random tokens), graddiff (ascent + "
                   "retain NLL), npo, simnpo, idkdpo/idk and idknll (towards \"I don't know\" answers; need "
                   "--forget-file with questions), rmu (steer one decoder layer's hidden states; set its layer with "
                   "--loss-arg layer=N); default ascent")
    g.add_argument("--loss-arg", type=_loss_arg, action="append", default=None, metavar="KEY=VALUE",
                   help="a hyper-parameter of the forget objective, e.g. beta=0.2 (npo) or layer=3 (rmu); repeat "
                   "for several")
    g.add_argument("--retain-loss", choices=tuple(RETAIN_LOSSES), default=None,
                   help="retain objective, trained on the retain data: nll, kl (KL to the original model) or rmu; "
                   "default: the forget objective's own (nll for most)")
    g.add_argument("--train-on-retain", action="store_true", help="also train R on the retain data")
    add_training_flags(g, gamma_default=0.9, lr=1e-4, epochs=3, optimizer="adam",
                       epochs_help="passes over the forget texts")
    g = p.add_argument_group("output")
    add_run_flags(g, "semu_fast_llm_out", "adapters/, metrics.json and lora/")
    g.add_argument("--lora", action="store_true", help="also export the adapters as a peft LoRA folder out/lora")
    p.set_defaults(func=run, parser=p)


def run(args, parser) -> int:
    import torch

    require(parser, "transformers")
    from ..lora import export_lora
    from ..workflows import llm, results

    if args.quiet:
        silence("transformers")
    targets = list(args.target_modules or ("mlp.down_proj",))
    overrides = dict(args.loss_arg or ())
    if args.forget_loss == "rmu":  # its control vector follows --seed unless a seed is given
        overrides.setdefault("seed", args.seed)
    try:
        forget_loss = llm.make_loss(args.forget_loss, **overrides)
    except ValueError as err:
        parser.error(f"argument --loss-arg: {err}")
    alternate = bool(getattr(forget_loss, "needs_alternate", False))
    if alternate and args.forget_file is None:
        parser.error(f"argument --loss: {args.forget_loss} needs question/answer records: give --forget-file")
    has_retain = args.retain_texts is not None or args.retain_file is not None
    if args.train_on_retain and not has_retain:
        parser.error("argument --train-on-retain: needs --retain-texts or --retain-file")
    if args.retain_loss is not None and not has_retain:
        parser.error("argument --retain-loss: needs --retain-texts or --retain-file")
    if getattr(forget_loss, "needs_retain", False) and not has_retain:
        parser.error(f"argument --loss: {args.forget_loss} trains on retain data: give --retain-texts or "
                     f"--retain-file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model, tokenizer = llm.load_causal_lm(args.model, dtype=dtype, device=device)
    except (FileNotFoundError, OSError, ValueError) as err:
        parser.error(f"argument --model: {err}")
    try:
        forget = _batches(tokenizer, args, "forget", parser, alternate)
        retain = _batches(tokenizer, args, "retain", parser, False)
        semu_model, report, metrics = llm.unlearn_llm(
            model, forget, retain, target_modules=tuple(targets), gamma=args.gamma, forget_loss=forget_loss,
            retain_loss=args.retain_loss, train_on_retain=True if args.train_on_retain else None,
            optimizer=args.optimizer, lr=args.lr, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    except ValueError as err:
        parser.error(str(err))
    files = results.write_run(args.out, semu_model, report, metrics, {**settings(args), "target_modules": targets})
    if args.lora:
        export_lora(semu_model, args.out / "lora", str(args.model), skip_conv=True, task_type="CAUSAL_LM")
        files.append("lora/")
    rows = [("forget", "forget_ppl_before", "forget_ppl_after")]
    if retain is not None:
        rows.append(("retain", "retain_ppl_before", "retain_ppl_after"))
    summary = [f"{'perplexity':10s} {'before':>12s} {'after':>12s}"]
    summary += [f"{label:10s} {metrics[before]:12.4g} {metrics[after]:12.4g}" for label, before, after in rows]
    summary.append(f"trainable: {metrics['trainable_params']} parameters ({metrics['trainable_share']:.4f}%) in "
                   f"{len(report.layers)} layers")
    return finish_run(args.out, files, summary)
