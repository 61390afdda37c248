"""`semu-fast unlearn-llm`: SEMU on a local transformers causal LM, forgetting the texts or question/answer pairs of
a file.

    semu-fast unlearn-llm --model ./my-llama --forget-texts forget.txt --retain-texts retain.txt --out out --lora
    semu-fast unlearn-llm --model ./my-llama --forget-file forget.jsonl --retain-file retain.jsonl --loss npo \
        --retain-loss kl --out out

    semu-fast unlearn-llm --model ./my-llama --forget-file forget.jsonl --retain-file retain.jsonl \
        --holdout-file holdout.jsonl --eval --out out

writes out/adapters (sf.load_adapters), out/metrics.json (forget and retain perplexity before and after, with --eval
the TOFU / MUSE metrics of llm_eval.evaluate_llm before and after, settings, per-layer ranks, the epochs' history and
the one kept), out/report.md (the same as tables) and, with --lora, out/lora (a peft LoRA adapter folder whose
base_model_name_or_path is --model's resolved path, so AutoPeftModelForCausalLM finds it from anywhere). Every
default is in semu_fast.workflows.llm.DEFAULTS. Nothing is downloaded."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ._common import (add_device_flag, add_run_flags, add_training_flags, finish_run, library_error, named_paths,
                      non_negative, positive, require, settings, silence)

log = logging.getLogger("semu_fast")

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
    if all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in texts):
        records = flag.replace("-texts", "-file")
        parser.error(f"argument {flag}: every line of {path} is a JSON object; records are read by {records} (texts "
                     f"are one a line)")
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


def _records(args, kind: str, parser):
    """The records of --{kind}-file, or --{kind}-texts as {"text"} records; None when neither is given."""
    texts, file = getattr(args, f"{kind}_texts", None), getattr(args, f"{kind}_file")
    if file is not None:
        return _read_records(file, f"--{kind}-file", parser)
    if texts is not None:
        return [{"text": text} for text in _read_texts(texts, f"--{kind}-texts", parser)]
    return None


def _is_qa(records) -> bool:
    from ..workflows.llm_data import check_records

    return check_records(records)[1] == "qa"


def _file_flag(split: str) -> str:
    """The flag that names a split's records file: "real_authors" -> "--real-authors-file"."""
    return f"--{split.replace('_', '-')}-file"


OPTION_SPLITS = ("real_authors", "world_facts")  # TOFU's model-utility sets, scored against their wrong options


def _eval_splits(data: dict, parser) -> tuple[dict, str]:
    """({"forget", "retain", "holdout", "real_authors", "world_facts"}: evaluate_llm splits or None, framing) from
    the records: question/answer records are framed as training frames them ("qa"), texts are scored whole
    ("raw")."""
    from ..workflows import llm
    from ..workflows.llm_data import check_records

    kinds = {name: check_records(records)[1] for name, records in data.items() if records is not None}
    if len(set(kinds.values())) > 1:
        got = ", ".join(f"{name}: {'question/answer' if kind == 'qa' else 'texts'}" for name, kind in kinds.items())
        parser.error("argument --eval: the forget, retain, holdout and utility data must be of one kind, "
                     f"question/answer records or texts; got {got}")
    splits = {}
    for name, records in data.items():
        try:
            splits[name] = llm.qa_split(records, options=name in OPTION_SPLITS) if records is not None else None
        except ValueError as err:
            parser.error(f"argument {_file_flag(name)}: {err}")
    return splits, ("qa" if kinds["forget"] == "qa" else "raw")


def register(subparsers) -> None:
    """Add the `unlearn-llm` subcommand to an argparse subparsers object."""
    import argparse

    from ..workflows.llm import AUTO_LOSS, CRITERIA, DEFAULTS, FORGET_LOSSES, RETAIN_LOSSES, RETAIN_MODES

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
                        help="texts to keep, one a line: trained on and guard the choice of the epoch kept (neither "
                        "with --no-train-on-retain, unless --select-best), and their perplexity is reported")
    retain.add_argument("--retain-file", type=Path, default=None, metavar="FILE",
                        help="records to keep, as --forget-file")
    g.add_argument("--max-length", type=positive(int), default=DEFAULTS.max_length,
                   help="tokens per text, at most (and at most the model's positions)")
    g.add_argument("--batch-size", type=positive(int), default=DEFAULTS.batch_size)
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="load the model in this dtype (auto: as saved)")
    add_device_flag(g)
    g = p.add_argument_group("SEMU (defaults: semu_fast.workflows.llm.DEFAULTS)")
    g.add_argument("--target-modules", action="append", default=None, metavar="PATTERN",
                   help="regular expression searched in layer names; repeat for several; or all-linear: every "
                   "Linear / Conv1D but the output head (default "
                   f"{' '.join(DEFAULTS.target_modules)})")
    g.add_argument("--loss", "--forget-loss", dest="forget_loss", choices=(AUTO_LOSS,) + tuple(FORGET_LOSSES),
                   default=DEFAULTS.forget_loss, metavar="LOSS",
                   help="forget objective: ascent (-NLL), random (NLL towards random tokens), graddiff (ascent + "
                   "retain NLL), npo, simnpo, idkdpo/idk and idknll (towards \"I don't know\" answers; need "
                   "--forget-file with questions), rmu (steer one decoder layer's hidden states; set its layer with "
                   f"--loss-arg layer=N); default {DEFAULTS.forget_loss}: idkdpo for question/answer records, npo "
                   "for texts")
    g.add_argument("--loss-arg", type=_loss_arg, action="append", default=None, metavar="KEY=VALUE",
                   help="a hyper-parameter of the forget objective, e.g. beta=0.2 (npo) or layer=3 (rmu); repeat "
                   "for several")
    g.add_argument("--retain-loss", choices=tuple(RETAIN_LOSSES), default=None,
                   help="retain objective, trained on the retain data: nll, kl (KL to the original model) or rmu; "
                   "default: the forget objective's own (nll for most)")
    g.add_argument("--retain-loss-arg", type=_loss_arg, action="append", default=None, metavar="KEY=VALUE",
                   help="a hyper-parameter of --retain-loss, e.g. weight=2 (kl) or layer=3 (rmu); repeat for several")
    g.add_argument("--train-on-retain", action=argparse.BooleanOptionalAction, default=None,
                   help="train R on the retain data too (default: yes when retain data is given); "
                   "--no-train-on-retain only reports it: it neither trains nor, unless --select-best, picks the "
                   "epoch kept (SEMU's data-free setting: the last epoch is kept)")
    g.add_argument("--retain-mode", choices=RETAIN_MODES, default=DEFAULTS.retain_mode,
                   help="how retain data trains: interleave (every forget and every retain batch its own optimizer "
                   "step: an epoch passes over the whole retain set) or paired (open-unlearning's: one step on "
                   "forget + retain loss per forget batch, a retain batch drawn at random; an epoch is as many steps "
                   f"as forget batches); default {DEFAULTS.retain_mode}")
    add_training_flags(g, gamma_default=DEFAULTS.gamma, lr=DEFAULTS.lr, optimizer=DEFAULTS.optimizer)
    g.add_argument("--epochs", type=positive(int), default=DEFAULTS.epochs,
                   help="passes over the forget data (default: enough for about "
                   f"{DEFAULTS.forget_steps} optimizer steps on it, at least {DEFAULTS.min_epochs})")
    g = p.add_argument_group("which epoch to keep")
    g.add_argument("--select-best", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the R of the epoch with the best --criterion among those whose retain perplexity rose "
                   "by at most --retain-tolerance (R = 0, the original model, when none did); default: on with "
                   "retain data that trains (off with --no-train-on-retain)")
    g.add_argument("--criterion", choices=CRITERIA, default=DEFAULTS.criterion,
                   help="forget_nll: the highest forget NLL; forget_prob: the lowest mean forget answer probability "
                   f"(default {DEFAULTS.criterion})")
    g.add_argument("--retain-tolerance", type=non_negative, default=DEFAULTS.retain_tolerance,
                   help="share by which the retain perplexity may rise in a kept epoch (default "
                   f"{DEFAULTS.retain_tolerance:g})")
    g = p.add_argument_group("evaluation (TOFU / MUSE metrics, semu_fast.workflows.llm_eval)")
    g.add_argument("--eval", action="store_true",
                   help="evaluate the model before and after on the forget and retain data. Question/answer records: "
                   "answer probability, ROUGE-L of greedy answers, truth ratio when the records have "
                   "paraphrased_answer and perturbed_answer, model utility, exact memorization, extraction strength. "
                   "Texts (scored whole, nothing generated): each text's probability, exact memorization and "
                   "extraction strength, no ROUGE or truth ratio, so model utility is the retain probability alone. "
                   "Either: membership-inference AUCs with --holdout-file")
    g.add_argument("--holdout-file", type=Path, default=None, metavar="FILE",
                   help="records never trained on, of the kind of the forget data: MIA AUCs of forget vs holdout")
    for name, what in (("real-authors", "real authors"), ("world-facts", "world facts")):
        g.add_argument(f"--{name}-file", type=Path, default=None, metavar="FILE",
                       help=f"TOFU's {what} records (question, answer, perturbed_answer: the wrong options): their "
                       "normalised probability, ROUGE-L and truth ratio join model utility")
    g.add_argument("--reference-model", type=Path, default=None, metavar="FOLDER",
                   help="a model trained without the forget data (local folder): forget quality, and privleak "
                   "with --holdout-file")
    g.add_argument("--max-new-tokens", type=positive(int), default=None,
                   help="greedy answer length for ROUGE-L (default open-unlearning's TOFU setting, 200)")
    g = p.add_argument_group("output")
    add_run_flags(g, "semu_fast_llm_out", "adapters/, metrics.json, report.md and lora/")
    g.add_argument("--lora", action="store_true", help="also export the adapters as a peft LoRA folder out/lora")
    p.set_defaults(func=run, parser=p)


def _check_flags(args, parser, forget_loss) -> None:
    alternate = bool(getattr(forget_loss, "needs_alternate", False))
    if alternate and args.forget_file is None:
        parser.error(f"argument --loss: {args.forget_loss} needs question/answer records: give --forget-file")
    has_retain = args.retain_texts is not None or args.retain_file is not None
    if args.train_on_retain and not has_retain:
        parser.error("argument --train-on-retain: needs --retain-texts or --retain-file")
    if args.retain_mode == "paired" and (not has_retain or args.train_on_retain is False):
        parser.error("argument --retain-mode: paired pairs each forget batch with a retain batch it trains on: needs "
                     "--retain-texts or --retain-file, without --no-train-on-retain")
    if args.retain_loss is not None and not has_retain:
        parser.error("argument --retain-loss: needs --retain-texts or --retain-file")
    if getattr(forget_loss, "needs_retain", False) and not has_retain:
        parser.error(f"argument --loss: {args.forget_loss} trains on retain data: give --retain-texts or "
                     f"--retain-file")
    if args.select_best and not has_retain:
        parser.error("argument --select-best: needs --retain-texts or --retain-file (the retain perplexity guards "
                     "the choice)")
    for flag, value in (("--holdout-file", args.holdout_file), ("--reference-model", args.reference_model),
                        ("--real-authors-file", args.real_authors_file), ("--world-facts-file", args.world_facts_file)):
        if value is not None and not args.eval:
            parser.error(f"argument {flag}: only used with --eval")


def _check_lora_targets(parser, model, targets, args) -> None:
    """--lora before any work: peft's LoRA config has one fan_in_fan_out for all targets, so transformers Conv1D
    layers and nn.Linear ones cannot share a folder (export_lora refused that after the whole run)."""
    import torch

    from ..layers import is_conv1d, select_layers
    from ..workflows import llm

    try:
        chosen = select_layers(model, llm.llm_config(model, targets, args.gamma, args.seed))
    except ValueError as err:
        library_error(parser, err)
    conv1d = sorted(name for name, module in chosen.items() if is_conv1d(module))
    linear = sorted(name for name, module in chosen.items() if isinstance(module, torch.nn.Linear))
    if conv1d and linear:
        parser.error(f"argument --lora: a peft LoRA folder takes transformers Conv1D layers ({conv1d[0]}, ...) or "
                     f"nn.Linear ones ({linear[0]}, ...), not both; narrow --target-modules to one kind, or leave "
                     f"--lora out")


def run(args, parser) -> int:
    import torch

    require(parser, "transformers")
    from .._utils import atomic_write
    from ..lora import export_lora
    from ..workflows import llm, llm_eval, results

    if args.quiet:
        silence("transformers")
    targets = list(args.target_modules or llm.DEFAULTS.target_modules)
    data = {"forget": _records(args, "forget", parser), "retain": _records(args, "retain", parser),
            **{name: _read_records(path, _file_flag(name), parser) if path else None
               for name, path in (("holdout", args.holdout_file), ("real_authors", args.real_authors_file),
                                  ("world_facts", args.world_facts_file))}}
    loss_name = args.forget_loss
    if loss_name == llm.AUTO_LOSS:  # question/answer records get "I don't know" alternates, texts cannot
        loss_name = llm.auto_forget_loss(_is_qa(data["forget"]))
    overrides = dict(args.loss_arg or ())
    if loss_name == "rmu":  # its control vector follows --seed unless a seed is given
        overrides.setdefault("seed", args.seed)
    try:
        forget_loss = llm.make_loss(loss_name, **overrides)
    except ValueError as err:
        parser.error(f"argument --loss-arg: {err}")
    retain_loss = args.retain_loss
    if args.retain_loss_arg:
        if retain_loss is None:
            parser.error("argument --retain-loss-arg: needs --retain-loss (the objective it sets)")
        try:
            retain_loss = llm.make_retain_loss(retain_loss, **dict(args.retain_loss_arg))
        except ValueError as err:
            parser.error(f"argument --retain-loss-arg: {err}")
    _check_flags(args, parser, forget_loss)
    folders = {"--model": args.model, "--reference-model": args.reference_model}
    for flag, folder in folders.items():
        if folder is None:
            continue
        try:  # before the package checks below: a wrong path is the first thing to hear about
            llm.check_model_folder(folder)
        except FileNotFoundError as err:
            parser.error(f"argument {flag}: {err}")
    splits, framing = _eval_splits(data, parser) if args.eval else ({}, "qa")
    if args.eval:  # checked now, not after training: evaluate_llm imports each where it scores with it
        needed = {"rouge_score": framing == "qa",  # ROUGE of generated answers
                  "sklearn": args.holdout_file is not None,  # MIA AUCs
                  "scipy": args.reference_model is not None and "paraphrased_answers" in splits["forget"]}  # KS
        require(parser, *(module for module, used in needed.items() if used), what="--eval")
    if args.max_new_tokens is None:  # recorded in run.json as used
        args.max_new_tokens = llm_eval.GENERATION_DEFAULTS[framing][1]
    device = args.device
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = {}
    for flag, folder in folders.items():
        try:
            loaded[flag] = llm.load_causal_lm(folder, dtype=dtype, device=device) if folder is not None else (None,)
        except (FileNotFoundError, OSError, ValueError) as err:
            parser.error(f"argument {flag}: {err}")
    (model, tokenizer), reference = loaded["--model"], loaded["--reference-model"][0]
    context = llm.context_length(model)
    if context is not None and args.max_length > context:  # recorded in run.json as used
        log.warning("--max-length %d is past the model's %d positions: texts are cut at %d", args.max_length,
                    context, context)
        args.max_length = context
    if args.lora:
        _check_lora_targets(parser, model, targets, args)
    vocab = reference.get_input_embeddings().num_embeddings if reference is not None else None
    if vocab is not None and vocab < len(tokenizer):  # it is scored with --model's tokenizer
        parser.error(f"argument --reference-model: its vocabulary holds {vocab} tokens, the --model's tokenizer "
                     f"{len(tokenizer)}; it must be a model of the same tokenizer")

    def evaluate(which) -> dict:
        return llm_eval.evaluate_llm(which, tokenizer, splits["forget"], retain=splits["retain"],
                                     holdout=splits["holdout"], real_authors=splits.get("real_authors"),
                                     world_facts=splits.get("world_facts"), reference_model=reference, framing=framing,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     max_length=args.max_length, generate=framing == "qa")

    alternate = bool(getattr(forget_loss, "needs_alternate", False))
    try:
        forget = llm.make_record_batches(tokenizer, data["forget"], args.max_length, args.batch_size,
                                         alternate=alternate, seed=args.seed)
        retain = llm.make_record_batches(tokenizer, data["retain"], args.max_length, args.batch_size) \
            if data["retain"] is not None else None
        before = evaluate(model) if args.eval else {}
        semu_model, report, metrics = llm.unlearn_llm(
            model, forget, retain, target_modules=tuple(targets), gamma=args.gamma, forget_loss=forget_loss,
            retain_loss=retain_loss, train_on_retain=args.train_on_retain, retain_mode=args.retain_mode,
            optimizer=args.optimizer, lr=args.lr, epochs=args.epochs, select_best=args.select_best,
            criterion=args.criterion, retain_tolerance=args.retain_tolerance, seed=args.seed, progress=not args.quiet)
        after = evaluate(semu_model.model) if args.eval else {}  # the model with its adapters (it has generate)
    except (ValueError, FloatingPointError) as err:  # FloatingPointError: a NaN loss, its message says what to try
        library_error(parser, err)
    metrics.update({f"{key}_before": value for key, value in before.items()})
    metrics.update({f"{key}_after": value for key, value in after.items()})
    run_settings = {**settings(args), "forget_loss": loss_name, "target_modules": targets, "epochs": metrics["epochs"],
                    **{key: report.training[key] for key in ("select_best", "train_on_retain", "retain_loss",
                                                             "retain_mode")}}
    files = results.write_run(args.out, semu_model, report, metrics, run_settings, "unlearn-llm")
    text = llm.report_markdown(metrics, report, run_settings)
    atomic_write(args.out / "report.md", lambda tmp: Path(tmp).write_text(text))
    files.insert(1, "report.md")
    if args.lora:
        # --model is a local folder: its resolved path finds the base model from any working directory (peft
        # would record the string given, which AutoPeftModel then reads relative to wherever it runs)
        export_lora(semu_model, args.out / "lora", str(args.model.resolve()), skip_conv=True, task_type="CAUSAL_LM")
        files.append("lora/")
    results.record_run(args.out, files, named_paths(args))
    rows = [("forget ppl", "forget_ppl_before", "forget_ppl_after")]
    if retain is not None:
        rows.append(("retain ppl", "retain_ppl_before", "retain_ppl_after"))
    rows += [(key, f"{key}_before", f"{key}_after") for key in before]
    summary = [f"{'':28s} {'before':>12s} {'after':>12s}"]
    summary += [f"{label:28s} {_number(metrics[b])} {_number(metrics[a])}" for label, b, a in rows]
    if "best_epoch" in metrics:
        summary.append(f"kept epoch {metrics['best_epoch']} of {report.training.get('epochs')} (0: the original "
                       f"model)")
    summary.append(f"trainable: {metrics['trainable_params']} parameters ({metrics['trainable_share']:.4f}%) in "
                   f"{len(report.layers)} layers")
    return finish_run(args.out, files, summary)


def _number(value) -> str:
    return f"{value:12.4g}" if value is not None else f"{'n/a':>12s}"
