"""SEMU inside transformers' Trainer: SEMUTrainer runs the forget-set gradient pass (sf.prepare) at the start of
train(), once, then the Trainer's own loop (optimizer, scheduler, gradient accumulation, clipping, mixed precision,
logging) on the k x k cores R only, with any objective of llm_losses; save_model writes the adapter folder, or the
merged weights.

    from semu_fast.workflows.llm import llm_config
    from semu_fast.workflows.llm_trainer import SEMUTrainer, unbatch

    forget = unbatch(make_qa_batches(tokenizer, forget_records, alternate=True))     # examples, as a Dataset holds
    retain = unbatch(make_batches(tokenizer, retain_texts))
    trainer = SEMUTrainer(model, TrainingArguments("out", learning_rate=1e-2, num_train_epochs=20,
                                                   per_device_train_batch_size=8, gradient_accumulation_steps=2),
                          train_dataset=forget, retain_dataset=retain, forget_loss="npo",
                          semu_config=llm_config(model, "all-linear", gamma=0.95, seed=0))   # the default
    trainer.train()                  # sf.prepare(model, forget) once, then the Trainer's loop on R
    trainer.save_model()             # args.output_dir: the adapter folder, for sf.load_adapters(model, folder)
    base = trainer.semu_model.unload()   # the original model, bit for bit

Data: train_dataset is the forget set, retain_dataset (optional) the retain set; each is any indexable dataset of
examples (dicts with "input_ids", optionally "attention_mask", "labels" (-100: not learned) and "alternate", the
same question with another answer, for the IDK objectives), e.g. unbatch(llm_data batches), a list, or a
datasets.Dataset. Every forget batch is paired with a retain batch of the same size (each forget example with a
retain example drawn at random, seeded by args.seed, as open-unlearning's ForgetRetainDataset pairs them), and each
step's loss is forget objective + retain objective (their weight / alpha fields scale them). The default collator
(`collate`) pads on the right with -100 labels; a data_collator given to the trainer collates the forget and the
retain examples separately. The gradient pass reads train_dataset in order, in batches of prepare_batch_size (default
args.per_device_train_batch_size), with llm_losses.nll_loss.

The Trainer's model stays the transformers model, with the targeted layers swapped for adapters in place; the
SEMUModel around it is trainer.semu_model (None before train()), and the objectives run on it (NPO, IdkDPO, KL and
RMU take their reference from its disabled adapters; objectives given by name or as llm_losses objects get
cache_bytes=0, because the Trainer's batches are new dicts at every step). Gradient accumulation divides each
step's loss by the number of accumulation steps, as for a per-batch mean.

Not supported, each refused with an error: several processes or GPUs (DDP, DeepSpeed, FSDP, DataParallel, a
torch.distributed group initialised by hand: use sf.unlearn's torch.distributed mode), an optimizer created before
train() (it would hold the base weights; give optimizer_cls_and_kwargs, or subclass create_optimizer), model_init,
compute_loss_func, resuming from a Trainer checkpoint and load_best_model_at_end (checkpoints hold adapters, not
model weights).

transformers is imported only when SEMUTrainer is first used (semu_trainer_class()), so importing this module, and
semu_fast, works without it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn as nn

from .._checks import check_positive_int
from ..config import SEMUConfig
from ..distributed import resolve as resolve_group
from ..layers import select_layers
from ..pipeline import prepare
from .llm import DEFAULTS, check_objectives_fit, llm_config, resolve_objectives
from .llm_data import IGNORE_INDEX, Batch, check_batch
from .llm_losses import nll_loss

__all__ = ["SEMUTrainer", "collate", "merged_state_dict", "semu_trainer_class", "unbatch"]


# ---- examples and batches ----------------------------------------------------------------------------------------

def _ids(example: Mapping, key: str, where: str) -> torch.Tensor:
    value = example.get(key)
    try:
        tensor = torch.as_tensor(value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where}[{key!r}] must be a sequence of ints, got {type(value).__name__}") from None
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"{where}[{key!r}] must be a non-empty 1-D sequence of ints, got shape {tuple(tensor.shape)}")
    return tensor


def collate(examples: Sequence[Mapping], pad_id: int = 0) -> Batch:
    """Right-padded batch from examples: {"input_ids", "attention_mask", "labels"}, each (B, T) int64, labels -100
    on padding (and wherever an example's own labels say so; without labels, every token of the example is one).
    An example's attention_mask, when given, must be all ones (examples are unpadded: unbatch gives them so).
    Examples that all carry "alternate" give batch["alternate"], their alternates collated the same way."""
    if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or not examples:
        raise ValueError(f"examples must be a non-empty list of dicts with 'input_ids', got {type(examples).__name__}")
    rows = []
    for i, example in enumerate(examples):
        where = f"examples[{i}]"
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(f"{where} must be a dict with 'input_ids' (and optionally 'labels', 'attention_mask'), "
                             f"got {type(example).__name__}")
        ids = _ids(example, "input_ids", where)
        labels = _ids(example, "labels", where) if example.get("labels") is not None else ids
        if labels.shape != ids.shape:
            raise ValueError(f"{where}: 'labels' has {labels.numel()} entries, 'input_ids' {ids.numel()}")
        if example.get("attention_mask") is not None and not bool((_ids(example, "attention_mask", where) == 1).all()):
            raise ValueError(f"{where}: 'attention_mask' holds zeros: give unpadded examples (collate pads them)")
        rows.append((ids, labels))
    width = max(ids.numel() for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)}
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, :ids.numel()] = ids
        batch["attention_mask"][row, :ids.numel()] = 1
        batch["labels"][row, :ids.numel()] = labels
    alternates = [example.get("alternate") for example in examples]
    if any(a is not None for a in alternates):
        if any(a is None for a in alternates):
            raise ValueError("examples: some carry 'alternate' and some do not; give it to all of them or none")
        batch["alternate"] = collate(alternates, pad_id)
    return batch


def unbatch(batches: Sequence[Batch]) -> list[dict]:
    """The examples of llm_data batches (make_batches, make_qa_batches, make_record_batches), in order: dicts of
    1-D int64 tensors "input_ids" and "labels" without the padding: the tokens attention_mask keeps, so left-padded
    batches work too (and "alternate", likewise, when the batches carry it). collate(unbatch(batches)[i:j]) gives
    back batches of the same rows (right-padded)."""
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or not batches:
        raise ValueError(f"batches must be a non-empty list of batches (dicts from llm_data), got "
                         f"{type(batches).__name__}")
    examples = []
    for b, batch in enumerate(batches):
        try:
            check_batch(batch)
        except (TypeError, ValueError) as err:
            raise ValueError(f"batches[{b}]: {err}") from None
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        alternate = unbatch([batch["alternate"]]) if isinstance(batch.get("alternate"), dict) else None
        if alternate is not None and len(alternate) != ids.shape[0]:
            raise ValueError(f"batches[{b}]['alternate'] holds {len(alternate)} rows, the batch {ids.shape[0]}")
        for row in range(ids.shape[0]):
            # the row's tokens: those its attention_mask keeps (right or left padding alike); a mask with a gap
            # between kept tokens is not padding, and is refused rather than cut
            keep = mask[row].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
            kept = torch.nonzero(keep).flatten()
            if kept.numel() and int(kept[-1] - kept[0]) + 1 != kept.numel():
                raise ValueError(f"batches[{b}] row {row}: its attention_mask has zeros between ones; give padded "
                                 f"batches (padding on one side only)")
            example = {"input_ids": ids[row][keep].clone()}
            if labels is not None:
                example["labels"] = labels[row][keep].clone()
            if alternate is not None:
                example["alternate"] = alternate[row]
            examples.append(example)
    return examples


class _Paired(torch.utils.data.Dataset):
    """{"forget": forget[i]} (and "retain": a retain example drawn at random from a generator seeded by `seed`) for
    every forget index i: open-unlearning's forget-anchored pairing."""

    def __init__(self, forget, retain, seed: int):
        self.forget, self.retain = forget, retain
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index):
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            item["retain"] = self.retain[int(torch.randint(len(self.retain), (1,), generator=self.generator))]
        return item


def _check_dataset(name: str, dataset) -> None:
    if dataset is None:
        return
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or isinstance(dataset, (str, Mapping)):
        raise ValueError(f"{name} must be an indexable dataset of examples (a list of dicts with 'input_ids', "
                         f"unbatch(...) of llm_data batches, or a datasets.Dataset), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: give at least one example")


def _uncached(objective):
    """An llm_losses objective with its reference cache off (the Trainer's batches are new at every step, so a cache
    would only fill up); other callables as they are."""
    if dataclasses.is_dataclass(objective) and any(f.name == "cache_bytes" for f in dataclasses.fields(objective)):
        return dataclasses.replace(objective, cache_bytes=0)
    return objective


def merged_state_dict(semu_model) -> dict:
    """The wrapped model's state dict with the adapters merged in (the weights as merge writes them), under the
    original layers' keys (no R, U, Vh, no ".base_layer"): what from_pretrained loads as a plain model."""
    adapters = semu_model.adapters
    prefixes = {f"{name}.": name for name in adapters}
    out = {}
    for key, value in semu_model.model.state_dict().items():
        layer = next((name for prefix, name in prefixes.items() if key.startswith(prefix)), None)
        if layer is None:
            out[key] = value
            continue
        rest = key[len(layer) + 1:]
        if rest in ("R", "U", "Vh"):
            continue
        if rest == "base_layer.weight":
            out[f"{layer}.weight"] = adapters[layer].merged_weight()
        elif rest.startswith("base_layer."):
            out[f"{layer}.{rest[len('base_layer.'):]}"] = value
    return out


# ---- the Trainer -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def semu_trainer_class():
    """The SEMUTrainer class (a transformers.Trainer subclass), built on first use so that transformers is imported
    only then. `from semu_fast.workflows.llm_trainer import SEMUTrainer` calls this."""
    try:
        from transformers import Trainer
    except ImportError as err:
        raise ImportError(f"SEMUTrainer needs the transformers package (pip install transformers): {err}") from None

    class SEMUTrainer(Trainer):
        """transformers.Trainer that trains only SEMU's cores R (see the module docstring).

        model: the causal LM itself (model_init is not supported). train_dataset: the forget examples (required).
        retain_dataset: retain examples (optional; needed by objectives defined with a retain term, graddiff and
        rmu, and by a retain_loss). semu_config: a SEMUConfig (default: DEFAULTS' gamma and target_modules, seed
        args.seed). forget_loss: an llm_losses FORGET_LOSSES name, make_loss(...), a callable (model, batch,
        generator) -> scalar (generator: a CPU torch.Generator), or "auto" (the default: idkdpo when the forget
        examples carry "alternate" answers, else npo); retain_loss: a RETAIN_LOSSES name, make_retain_loss(...) or
        a callable; None: the forget objective's own retain term, else NLL. save_merged: save_model writes the
        model with W + U R Vh merged in (save_pretrained; from_pretrained loads a plain model) instead of the adapter
        folder. prepare_batch_size: batch size of the gradient pass (default args.per_device_train_batch_size).
        Everything else goes to transformers.Trainer."""

        def __init__(self, model: Optional[nn.Module] = None, args=None, *, train_dataset=None, retain_dataset=None,
                     semu_config: Optional[SEMUConfig] = None, forget_loss=DEFAULTS.forget_loss, retain_loss=None,
                     save_merged: bool = False, prepare_batch_size: Optional[int] = None, data_collator=None,
                     **kwargs):
            if kwargs.get("model_init") is not None:
                raise ValueError("model_init: SEMUTrainer adapts the model it is given; pass model instead")
            if not isinstance(model, nn.Module):
                raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got "
                                 f"{type(model).__name__}")
            if kwargs.get("compute_loss_func") is not None:
                raise ValueError("compute_loss_func: SEMUTrainer's loss is forget_loss + retain_loss; give those")
            optimizers = kwargs.get("optimizers")
            if optimizers is not None and any(o is not None for o in optimizers):
                raise ValueError("optimizers: an optimizer made before train() would hold the base weights, not R "
                                 "(which the gradient pass creates); give optimizer_cls_and_kwargs, or subclass "
                                 "create_optimizer")
            if train_dataset is None:
                raise ValueError("train_dataset (the forget examples) is required")
            _check_dataset("train_dataset", train_dataset)
            _check_dataset("retain_dataset", retain_dataset)
            if semu_config is not None and not isinstance(semu_config, SEMUConfig):
                raise ValueError(f"semu_config must be a SEMUConfig, got {type(semu_config).__name__}")
            if not isinstance(save_merged, bool):
                raise ValueError(f"save_merged must be True or False, got {save_merged!r}")
            check_positive_int("prepare_batch_size", prepare_batch_size, optional=True)
            if args is not None and getattr(args, "load_best_model_at_end", False):
                raise ValueError("args.load_best_model_at_end: SEMUTrainer's checkpoints hold adapters, which the "
                                 "Trainer cannot load as model weights; keep it False")
            seed = args.seed if args is not None else 42  # TrainingArguments' default seed
            semu_config = semu_config if semu_config is not None else llm_config(
                model, DEFAULTS.target_modules, DEFAULTS.gamma, seed)
            select_layers(model, semu_config)  # bad target_modules fail here, not in train()
            first = train_dataset[0]
            has_alternate = isinstance(first, Mapping) and "alternate" in first
            forget_fn, retain_fn, what = resolve_objectives(forget_loss, retain_loss, seed, has_alternate)
            check_objectives_fit(model, forget_fn, retain_fn)
            if getattr(forget_fn, "needs_alternate", False) and not has_alternate:
                raise ValueError(f"{what} needs alternate answers: train_dataset[0] has no 'alternate' (build the "
                                 f"examples with unbatch(make_qa_batches(..., alternate=True)))")
            if retain_dataset is None and getattr(forget_fn, "needs_retain", False):
                raise ValueError(f"{what} needs retain_dataset: it is defined with a retain term")
            if retain_dataset is None and retain_loss is not None:
                raise ValueError(f"retain_loss={retain_loss!r} needs retain_dataset")
            processing = kwargs.get("processing_class", kwargs.get("tokenizer"))
            candidates = (getattr(processing, "pad_token_id", None), getattr(processing, "eos_token_id", None),
                          getattr(getattr(model, "config", None), "pad_token_id", None))
            pad_id = next((i for i in candidates if i is not None), 0)  # padding is masked: any id does
            self.custom_collator = data_collator is not None
            super().__init__(model=model, args=args, train_dataset=train_dataset,
                             data_collator=data_collator if data_collator is not None else
                             functools.partial(collate, pad_id=pad_id), **kwargs)
            self.semu_config = semu_config
            self.retain_dataset = retain_dataset
            self.forget_objective, self.retain_objective = _uncached(forget_fn), _uncached(retain_fn)
            self.save_merged = save_merged
            self.prepare_batch_size = prepare_batch_size
            self.semu_model = None
            self._generator = torch.Generator().manual_seed(self.args.seed)
            # Our losses are per-batch means: the Trainer must divide them by the accumulation steps itself (it
            # skips that for models that take num_items_in_batch, and where loss_is_scaled_for_ga says so).
            self.model_accepts_loss_kwargs = False
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = False

        # -- training --

        def _check_one_process(self) -> None:
            if self.args.world_size > 1 or self.args.n_gpu > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("args: SEMUTrainer trains in one process on one device (no DDP, DataParallel, "
                                 "DeepSpeed or FSDP); for several processes use sf.unlearn, whose gradient pass and "
                                 "training of R run under torch.distributed")
            # A group the user initialised (mp.spawn, a notebook) sets no environment variable, so args.world_size
            # stays 1: prepare would then sum the gradients over the ranks and R train on each unsynchronised.
            group = resolve_group(None)
            if group is not None:
                raise RuntimeError(f"SEMUTrainer trains in one process, and torch.distributed is initialised with "
                                   f"{group.size} processes: the gradient pass would run across them and R train on "
                                   f"each rank apart; for several processes use sf.unlearn, whose gradient pass and "
                                   f"training of R run under torch.distributed")

        def prepare_semu(self):
            """sf.prepare on train_dataset (once; train() calls it): installs the adapters in self.model and returns
            trainer.semu_model."""
            if self.semu_model is not None:
                return self.semu_model
            self._check_one_process()
            loader = torch.utils.data.DataLoader(
                self.train_dataset, batch_size=self.prepare_batch_size or self.args.per_device_train_batch_size,
                shuffle=False, collate_fn=self.data_collator)
            semu_model = prepare(self.model, loader, loss_fn=nll_loss, config=self.semu_config)
            if not semu_model.trainable_parameters():
                semu_model.unload()
                raise ValueError("train_dataset: the forget gradient is zero in every targeted layer, so SEMU "
                                 "installed no adapter and there is nothing to train")
            self.semu_model = semu_model
            return semu_model

        def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
            """sf.prepare on train_dataset (the first time), then transformers.Trainer.train on R. When the first
            train() fails, the adapters it installed are taken out again (the model as it came in)."""
            if resume_from_checkpoint not in (None, False):
                raise ValueError("resume_from_checkpoint: SEMUTrainer does not resume Trainer checkpoints (they hold "
                                 "adapters, not model weights); sf.unlearn(checkpoint_dir=...) resumes")
            fresh = self.semu_model is None
            self.prepare_semu()
            try:
                return super().train(trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
            except BaseException:  # as sf.unlearn: a run that fails (Ctrl-C included) leaves the model as it came
                if fresh and self.semu_model is not None and self.semu_model._detached_by is None:
                    self.semu_model.unload()
                    self.semu_model = None
                    self.optimizer = self.lr_scheduler = None  # they hold the R just taken out: a retry makes new ones
                raise

        def get_train_dataloader(self):
            """Forget batches paired with retain batches (see _Paired), shuffled by a generator seeded by
            args.data_seed (else args.seed)."""
            if self.train_dataset is None:
                raise ValueError("train_dataset (the forget examples) is required")
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            dataset = _Paired(self.train_dataset, self.retain_dataset, seed)
            collator = self.data_collator

            def collate_pairs(items):
                batch = {"forget": collator([item["forget"] for item in items])}
                if "retain" in items[0]:
                    batch["retain"] = collator([item["retain"] for item in items])
                return batch

            loader = torch.utils.data.DataLoader(
                dataset, batch_size=self._train_batch_size, collate_fn=collate_pairs,
                sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
                drop_last=self.args.dataloader_drop_last, num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Training batches ({"forget", "retain"}): forget objective + retain objective on trainer.semu_model.
            Anything else (evaluation batches): the Trainer's own loss, the model's mean token NLL."""
            if not (isinstance(inputs, Mapping) and "forget" in inputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs)
            if self.semu_model is None:
                raise RuntimeError("SEMUTrainer: call train() (it runs the gradient pass) before computing its loss")
            loss = self.forget_objective(self.semu_model, inputs["forget"], self._generator)
            if inputs.get("retain") is not None:
                loss = loss + self.retain_objective(self.semu_model, inputs["retain"], self._generator)
            return (loss, None) if return_outputs else loss

        # -- saving --

        def _save(self, output_dir: Optional[str] = None, state_dict=None):
            """The adapter folder (sf.load_adapters(model, output_dir)), or with save_merged the merged model
            (save_pretrained), plus the tokenizer and the training arguments; before train(), the Trainer's own."""
            if self.semu_model is None:
                return super()._save(output_dir, state_dict=state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return None
            os.makedirs(output_dir, exist_ok=True)
            if self.save_merged:
                self.model.save_pretrained(output_dir, state_dict=merged_state_dict(self.semu_model))
            else:
                self.semu_model.save_adapters(output_dir)
            processing = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
            if processing is not None and hasattr(processing, "save_pretrained"):
                processing.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return None

    SEMUTrainer.__module__ = __name__
    return SEMUTrainer


def __getattr__(name: str):
    if name == "SEMUTrainer":  # built (and transformers imported) on first use
        return semu_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
