"""`semu-fast unlearn-llm`: SEMU on a local transformers causal LM, forgetting the texts of a file.

    semu-fast unlearn-llm --model ./my-llama --forget-texts forget.txt --retain-texts retain.txt --out out --lora

writes out/adapters (sf.load_adapters), out/metrics.json (forget and retain perplexity before and after, settings,
per-layer ranks) and, with --lora, out/lora (a peft LoRA adapter folder). Nothing is downloaded."""
from __future__ import annotations

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


def register(subparsers) -> None:
    """Add the `unlearn-llm` subcommand to an argparse subparsers object."""
    from ..workflows.llm import FORGET_LOSSES

    p = subparsers.add_parser("unlearn-llm", help="forget texts from a local transformers causal LM with SEMU",
                              description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=Path, required=True, help="local folder of a transformers causal LM (and its "
                   "tokenizer), as save_pretrained writes it")
    g.add_argument("--forget-texts", type=Path, required=True, metavar="FILE", help="texts to forget, one a line")
    g.add_argument("--retain-texts", type=Path, default=None, metavar="FILE",
                   help="texts to keep, one a line: their perplexity is reported (and trained on with "
                   "--train-on-retain)")
    g.add_argument("--max-length", type=positive(int), default=256, help="tokens per text, at most")
    g.add_argument("--batch-size", type=positive(int), default=8)
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="load the model in this dtype (auto: as saved)")
    add_device_flag(g)
    g = p.add_argument_group("SEMU")
    g.add_argument("--target-modules", action="append", default=None, metavar="PATTERN",
                   help="regular expression searched in layer names; repeat for several (default mlp.down_proj)")
    g.add_argument("--forget-loss", choices=FORGET_LOSSES, default="ascent",
                   help="ascent: -NLL on the forget texts; random: NLL towards random tokens != the true ones")
    g.add_argument("--train-on-retain", action="store_true", help="also train R on the retain texts' NLL")
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
    forget_texts = _read_texts(args.forget_texts, "--forget-texts", parser)
    retain_texts = _read_texts(args.retain_texts, "--retain-texts", parser) if args.retain_texts else None
    if args.train_on_retain and retain_texts is None:
        parser.error("argument --train-on-retain: needs --retain-texts")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model, tokenizer = llm.load_causal_lm(args.model, dtype=dtype, device=device)
    except (FileNotFoundError, OSError, ValueError) as err:
        parser.error(f"argument --model: {err}")
    try:
        forget = llm.make_batches(tokenizer, forget_texts, args.max_length, args.batch_size)
        retain = llm.make_batches(tokenizer, retain_texts, args.max_length, args.batch_size) if retain_texts else None
        semu_model, report, metrics = llm.unlearn_llm(
            model, forget, retain, target_modules=tuple(targets), gamma=args.gamma,
            forget_loss=args.forget_loss, train_on_retain=args.train_on_retain, optimizer=args.optimizer, lr=args.lr,
            epochs=args.epochs, seed=args.seed, progress=not args.quiet)
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
