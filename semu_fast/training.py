"""sf.unlearn: prepare SEMU adapters, then train only R (random-label loss on the forget set by default)."""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed as distributed_setup
from ._checks import check_callable, check_choice, check_number, check_positive_int
from ._utils import set_torch_rng_state, torch_rng_state
from .checkpoint import Checkpoint, buffers_digest, data_identity, model_buffers
from .config import SEMUConfig
from .gradients import LossFn, set_norm_mode
from .layers import select_layers
from .losses import LABEL_RULES, mixed_batch_loss, random_label_loss_for, true_label_loss
from .metrics import accuracy
from .model import SEMUModel, load_adapters
from .pipeline import check_loader, loader_generators, prepare, set_sampler_epoch
from .report import SEMUReport
from .serialization import fingerprint

OPTIMIZERS = ("sgd", "adam")
RETAIN_MODES = ("interleave", "mixed", "score")
TrainLossFn = Callable[[nn.Module, object, torch.Generator], torch.Tensor]


def interleave(forget: Iterable, retain: Optional[Iterable]):
    """("forget", batch) and ("retain", batch) alternately until both loaders are exhausted."""
    streams = [(("forget", b) for b in forget)]
    if retain is not None:
        streams.append((("retain", b) for b in retain))
    for group in itertools.zip_longest(*streams):
        yield from (item for item in group if item is not None)


class _Tagged(torch.utils.data.Dataset):
    """A dataset of (x, y) pairs as (x, y, is_forget) triples."""

    def __init__(self, dataset, is_forget: bool):
        self.dataset, self.is_forget = dataset, is_forget

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        inputs, target = self.dataset[index]
        return inputs, target, self.is_forget


def mixed_batches(forget_loader, retain_loader, seed: int, epoch: int):
    """("mixed", batch) over the shuffled union of both loaders' datasets in batches of the forget loader's size,
    each batch (inputs, targets, is_forget): the official retain variant. The order depends on (seed, epoch) only,
    so a resumed epoch replays it."""
    union = torch.utils.data.ConcatDataset([_Tagged(forget_loader.dataset, True),
                                            _Tagged(retain_loader.dataset, False)])
    order = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 63)
    loader = torch.utils.data.DataLoader(union, batch_size=forget_loader.batch_size, shuffle=True, generator=order)
    return (("mixed", batch) for batch in loader)


def _check_retain_mode(retain_mode, retain_loader, forget_loader, train_loss_fn, retain_loss_fn, group) -> None:
    check_choice("retain_mode", retain_mode, RETAIN_MODES)
    if retain_mode != "interleave" and retain_loader is None:
        raise ValueError(f"retain_mode={retain_mode!r} needs a retain_loader")
    if retain_mode == "score" and retain_loss_fn is not None:
        raise ValueError("retain_mode='score' never trains on retain batches (it only scores epochs by accuracy): "
                         "leave retain_loss_fn None, or use retain_mode='interleave' to train on it")
    if retain_mode != "mixed":
        return
    for name, loader in (("forget_loader", forget_loader), ("retain_loader", retain_loader)):
        if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_size is None:
            raise ValueError(f"retain_mode='mixed' re-batches the loaders' datasets: {name} must be a torch "
                             f"DataLoader with a batch_size, got {type(loader).__name__}")
    if train_loss_fn is not None or retain_loss_fn is not None:
        raise ValueError("retain_mode='mixed' trains on its own mixed-batch loss (random labels by label_rule for "
                         "forget samples, true labels for retain ones): leave train_loss_fn and retain_loss_fn None")
    if group is not None:
        raise ValueError("retain_mode='mixed' runs in one process: its shuffled union ignores distributed samplers")


def check_training_args(optimizer, lr, epochs, momentum, weight_decay):
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_number("lr", lr)
    check_number("momentum", momentum, positive=False)
    check_number("weight_decay", weight_decay, positive=False)
    check_positive_int("epochs", epochs)


def _make_optimizer(params, optimizer: str, lr: float, momentum: float, weight_decay: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class _Trainer:
    """One unlearn run's training state and its steps: the optimizer, the random stream, the run record that
    checkpoints save (epoch, step within it, per-step losses, history, the best R so far)."""

    def __init__(self, semu_model: SEMUModel, opt, generator, losses: dict, checkpoint, group, min_delta: float,
                 max_grad_norm: Optional[float], loaders=(), max_steps: Optional[int] = None):
        """losses: {"forget", "retain", "mixed"} -> train_loss_fn, by the kind of batch. loaders: the data loaders,
        whose shuffling generators a checkpoint keeps. max_steps: the steps of the whole run (None: no limit)."""
        self.model, self.opt, self.generator = semu_model, opt, generator
        self.params = semu_model.trainable_parameters()
        self.losses, self.min_delta, self.max_grad_norm = losses, float(min_delta), max_grad_norm
        self.checkpoint, self.group = checkpoint, group
        self.sharded = any(distributed_setup.is_sharded(p) for p in semu_model.parameters())  # FSDP2
        self.shufflers = loader_generators(*loaders)
        self.max_steps = max_steps
        self.run = {"epoch": 0, "step": 0, "steps_before": 0, "losses": [], "history": [], "best_score": None,
                    "best_epoch": None, "best_state": None}
        self.resumed_rng = None  # a checkpoint's random state, until the point it was saved at is reached again
        self.epoch_start = None  # torch's CPU state and the shufflers' where this epoch began

    def resume(self, state: dict) -> None:
        self.run = self.checkpoint.restore(state, self.model, self.opt, self.generator)
        self.run.setdefault("steps_before", 0)  # a checkpoint of a run without max_steps may lack it
        saved = state.get("rng") or {}
        ranks = saved.get("ranks", [saved] if saved else [])  # one entry per rank that saved it
        rank, size = (self.group.rank, self.group.size) if self.group is not None else (0, 1)
        if len(ranks) != size:  # written by another number of processes: each starts from its own state
            warnings.warn(f"the checkpoint's random state is from {len(ranks)} process(es), this run has {size}: "
                          f"dropout and shuffles continue from this process's own state")
            ranks = [None] * size
        self.resumed_rng = ranks[rank]
        own = ranks[rank] or {}
        if "generator" in own:  # this rank's label stream (the state's top level holds rank 0's)
            self.generator.set_state(own["generator"])
        if "buffers" in own:  # this rank's norm statistics (the state's top level holds rank 0's)
            with torch.no_grad():
                buffers = dict(self.model.named_buffers())
                for name, value in own["buffers"].items():
                    buffers[name].copy_(value)

    def begin_epoch(self) -> None:
        """Before the epoch's batches are drawn (a DataLoader draws its shuffle from its generator, or from torch's
        CPU state without one, when iterated). Fresh: note both, so that a run resumed in this epoch draws the same
        batches. Resumed: put both back where this epoch began (resumed mid-epoch; the state of the step it stopped
        at follows at that step) or where the checkpoint left them (resumed at the epoch's start)."""
        rng = self.resumed_rng
        if rng is None:
            self.epoch_start = {"cpu": torch.get_rng_state(), "shufflers": [g.get_state() for g in self.shufflers]}
            return
        self.epoch_start = rng["epoch_start"] if self.run["step"] else {"cpu": rng["cpu"],
                                                                         "shufflers": rng["shufflers"]}
        if len(self.epoch_start["shufflers"]) == len(self.shufflers):
            for g, state in zip(self.shufflers, self.epoch_start["shufflers"]):
                g.set_state(state)
        torch.set_rng_state(self.epoch_start["cpu"])
        if self.run["step"] == 0:
            self._restore_torch_rng()

    def _restore_torch_rng(self) -> None:
        """torch's global random state (dropout) as the checkpoint saved it, once."""
        rng, self.resumed_rng = self.resumed_rng, None
        if rng is not None:
            set_torch_rng_state(rng)

    def _save(self) -> None:
        rng = {**torch_rng_state(), "shufflers": [g.get_state() for g in self.shufflers],
               "epoch_start": self.epoch_start}
        if self.group is None:
            self.checkpoint.save(self.run, self.model, self.opt, self.generator, self.group, {"ranks": [rng]})
            return
        # each rank has its own dropout stream, label stream and data shard: rank 0 writes them all, and each rank's
        # norm statistics where they differ (norm_mode="train" moves them by each rank's shard)
        buffers = model_buffers(self.model)
        rng.update(generator=self.generator.get_state(), buffers_sha256=buffers_digest(buffers))
        ranks = distributed_setup.all_gather_objects(rng, self.group)
        if len({entry["buffers_sha256"] for entry in ranks}) > 1:
            for entry, own in zip(ranks, distributed_setup.all_gather_objects(buffers, self.group)):
                entry["buffers"] = own
        _, failure = distributed_setup.attempt(  # rank 0 writes: a failed write (a full disk) stops every rank
            lambda: self.checkpoint.save(self.run, self.model, self.opt, self.generator, self.group,
                                         {"ranks": ranks}), self.group)
        distributed_setup.all_reduce_outcome_([], self.group, failure, "writing the checkpoint",
                                              self.params[0].device)

    def train_epoch(self, batches) -> None:
        """One pass over (kind, batch) pairs; kind names the loss ("forget", "retain" or "mixed")."""
        run = self.run
        if any(adapter.merged for adapter in self.model.adapters.values()):
            raise RuntimeError("R cannot train while the adapters are merged into the weights (the forward then "
                               "skips R); call unmerge_adapters() first")
        steps = enumerate(batches)
        while True:
            taken, failure = distributed_setup.attempt(lambda: self._backward(steps), self.group)
            if self.group is not None:
                self._average_gradients(taken is not None, failure)
            if taken is None:
                break
            step, value = taken
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.opt.step()
            run["losses"].append(value)
            run["step"] = step + 1
            if self.checkpoint.due(run["step"]):
                self._save()
        self._restore_torch_rng()  # resumed after the epoch's last step: every step was skipped

    def _backward(self, steps) -> Optional[tuple[int, float]]:
        """The epoch's next step up to R's gradients: (step, loss); None when the epoch has no step left."""
        run = self.run
        for step, (kind, batch) in steps:
            if self.steps_left(step) == 0:  # the run's last step is done: the epoch ends here
                return None
            if step < run["step"]:  # done before the checkpoint this run resumes from
                continue
            self._restore_torch_rng()  # resumed mid-epoch: the random state of the step it stopped at
            loss = self.losses[kind](self.model, batch, self.generator)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError(f"the {kind} loss must return a scalar tensor that depends on R, got {loss!r:.80} "
                                f"(epoch {run['epoch'] + 1}, step {step + 1})")
            value = loss.item()
            if not math.isfinite(value):
                if self.sharded:  # FSDP2's backward holds collectives the other ranks wait in: run it, on zero
                    (torch.nan_to_num(loss) * 0).reshape(()).backward()
                raise FloatingPointError(f"the {kind} loss is {value} at epoch {run['epoch'] + 1}, step {step + 1}; "
                                         f"lower lr, or check the loss function and the batch")
            self.opt.zero_grad(set_to_none=True)
            loss.reshape(()).backward()
            return step, value
        return None

    def _average_gradients(self, present: bool, failure: Optional[Exception]) -> None:
        """R's gradients averaged over the ranks, in one all-reduce that also carries whether each rank has this
        step (an epoch ends on every rank with a call without one) and whether its step failed: ranks whose loaders
        give different numbers of batches, or a rank's error, stop every rank with that error instead of leaving
        the others waiting (or pairing different steps)."""
        grads = [p.grad if present and p.grad is not None else torch.zeros_like(p) for p in self.params]
        held = [present and p.grad is not None for p in self.params]  # an R no rank's loss reached keeps no grad
        where = f"at epoch {self.run['epoch'] + 1}, step {self.run['step'] + 1}"
        present_ranks, *with_grad = distributed_setup.all_reduce_outcome_(
            grads, self.group, failure, where, self.params[0].device, counts=(present, *held))
        if present_ranks not in (0, self.group.size):
            raise ValueError(f"{present_ranks} of {self.group.size} ranks have a batch {where}: every rank's loaders "
                             f"must give the same number of batches each epoch (a DistributedSampler does)")
        for param, grad, count in zip(self.params, grads, with_grad):
            param.grad = grad.div_(self.group.size) if count else None

    def steps_left(self, step: Optional[int] = None) -> Optional[int]:
        """Steps the run may still take before step `step` of this epoch (None: after the epoch's last step);
        None when there is no max_steps."""
        if self.max_steps is None:
            return None
        return max(0, self.max_steps - self.run["steps_before"] - (self.run["step"] if step is None else step))

    def score_epoch(self, epoch: int, forget_loader, retain_loader, select_best: bool) -> dict:
        """Accuracies and the score (100 - forget acc + retain acc) / 2 (without retain data: 100 - forget acc);
        keeps the best epoch's R when select_best."""
        run = self.run
        entry = {"forget_acc": accuracy(self.model, forget_loader, self.group)}
        if retain_loader is not None:
            entry["retain_acc"] = accuracy(self.model, retain_loader, self.group)
        retain = entry.get("retain_acc")
        entry["score"] = (100.0 - entry["forget_acc"] + retain) / 2 if retain is not None \
            else 100.0 - entry["forget_acc"]
        if run["best_score"] is None or self._improves(entry["score"], run["best_score"]):
            run["best_score"], run["best_epoch"] = entry["score"], epoch
            if select_best:
                run["best_state"] = [p.detach().clone() for p in self.params]
        return entry

    def _improves(self, score: float, best: float) -> bool:
        """The official early exit's rule: an improvement reaches best + min_delta (a tie counts); with min_delta
        0 it must beat best, so a plateau still runs out of patience."""
        return score >= best + self.min_delta if self.min_delta > 0 else score > best

    def end_epoch(self, entry: dict, stop: bool) -> None:
        """Record the epoch (stop: training ends here, which a checkpoint keeps for a resumed run)."""
        run = self.run
        if not all(torch.isfinite(p).all() for p in self.params):
            raise FloatingPointError(f"R holds NaN or Inf after epoch {entry['epoch']}; lower lr")
        run["history"].append(entry)
        run.update(epoch=entry["epoch"], steps_before=run["steps_before"] + run["step"], step=0, losses=[],
                   stopped=stop)
        if self.checkpoint.enabled:
            self._save()

    def restore_best(self) -> None:
        if self.run["best_state"] is not None:
            with torch.no_grad():
                for param, saved in zip(self.params, self.run["best_state"]):
                    param.copy_(saved)


def _callable_name(fn) -> Optional[str]:
    """A loss function as a resumed run must match it: by its qualified name (None: the default)."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _check_stopping(patience, min_delta, label_rule, label_classes, train_loss_fn) -> None:
    check_positive_int("patience", patience, optional=True)
    check_number("min_delta", min_delta, positive=False)
    check_choice("label_rule", label_rule, LABEL_RULES)
    check_positive_int("label_classes", label_classes, 2, optional=True)
    if (label_rule != "uniform_other" or label_classes is not None) and train_loss_fn is not None:
        raise ValueError("label_rule and label_classes apply to the built-in random-label loss: with a "
                         "train_loss_fn, draw the labels there")
    if patience is not None and train_loss_fn is not None:
        raise ValueError("patience stops on the classification score, which epochs get only with the built-in "
                         "random-label loss (train_loss_fn=None): with a train_loss_fn, stop through on_epoch "
                         "(return {'stop': True})")


def _data_settings(forget_loader, retain_loader, group, checkpointing: bool, agreed: dict) -> dict:
    """The digests of the data a checkpoint's run read (every rank's, each rank reading its own shard); hashing
    what is in memory costs a pass over it, so only runs that checkpoint take them. With a group, every rank must
    run with the same `agreed` settings (training, epochs, checkpointing: rank 0 writes the one folder they share),
    or the ranks would step, save and stop at different points while the others wait for them."""
    digests = [data_identity(forget_loader), None if retain_loader is None else data_identity(retain_loader)] \
        if checkpointing else None
    if group is not None:
        views = distributed_setup.all_gather_objects((agreed, digests), group)
        differ = sorted(key for key in agreed if len({repr(view.get(key)) for view, _ in views}) > 1)
        if differ or any(set(view) != set(agreed) for view, _ in views):
            raise ValueError(f"every rank must call unlearn with the same settings (and a checkpoint_dir they all "
                             f"share, or none); the ranks differ in {', '.join(differ) or 'their arguments'}: "
                             + "; ".join(f"{key} = {[view.get(key) for view, _ in views]}" for key in differ[:4]))
        digests = [list(ranks) for ranks in zip(*(d for _, d in views))] if checkpointing else None
    return {} if digests is None else {"forget_data": digests[0], "retain_data": digests[1]}


def _save_adapters(checkpoint: Checkpoint, semu_model: SEMUModel, group) -> None:
    """The checkpoint's adapters after prepare (rank 0 writes them: a failed write stops every rank)."""
    _, failure = distributed_setup.attempt(lambda: checkpoint.save_adapters(semu_model, group), group)
    if group is not None:
        device = next(semu_model.parameters()).device
        distributed_setup.all_reduce_outcome_([], group, failure, "writing the checkpoint's adapters", device)


def _saved_state(checkpoint: Checkpoint, resume: bool, group) -> Optional[dict]:
    """The checkpoint to resume from (None: start afresh); with a group, every rank must find the same one (a
    folder per rank, or one only some ranks see, would make some ranks skip prepare while others run it)."""
    saved, failure = distributed_setup.attempt(lambda: checkpoint.load() if resume else None, group)
    if group is None:
        return saved
    point = None if saved is None else (saved["run"]["epoch"], saved["run"]["step"])
    views = distributed_setup.all_gather_objects((failure is not None, point), group)
    if failure is not None:
        raise failure
    if any(failed for failed, _ in views):
        raise distributed_setup.RankFailed("another rank failed to read the checkpoint; its own error says why")
    if len({p for _, p in views}) > 1:
        raise ValueError(f"the ranks found different checkpoints in checkpoint_dir ((epoch, step) or None per rank: "
                         f"{[p for _, p in views]}): it must be one folder every rank sees (rank 0 writes it)")
    return saved


def _check_settings(config, optimizer, lr, epochs, momentum, weight_decay, loss_fn, train_loss_fn, retain_loss_fn,
                    on_epoch, patience, min_delta, label_rule, label_classes, max_grad_norm, max_steps,
                    checkpoint_every) -> None:
    if not isinstance(config, SEMUConfig):
        raise TypeError(f"config must be a SEMUConfig, got {type(config).__name__}")
    check_training_args(optimizer, lr, epochs, momentum, weight_decay)
    check_callable("loss_fn", loss_fn, "(model, batch) -> scalar")
    for name, fn in (("train_loss_fn", train_loss_fn), ("retain_loss_fn", retain_loss_fn)):
        check_callable(name, fn, "(model, batch, generator) -> scalar")
    check_callable("on_epoch", on_epoch, "(epoch, semu_model) -> dict or None")
    _check_stopping(patience, min_delta, label_rule, label_classes, train_loss_fn)
    check_number("max_grad_norm", max_grad_norm, optional=True)
    check_positive_int("max_steps", max_steps, optional=True)
    check_positive_int("checkpoint_every", checkpoint_every, optional=True)


def check_unlearn_arguments(workflow: str, fixed: dict, extra: dict) -> None:
    """sf.unlearn's checks that need neither the model nor the data, on the keyword arguments a workflow will pass
    it (fixed: its own; extra: the caller's **unlearn_kwargs), for workflows that do costly work first (sampling,
    forward passes): unknown names, names the workflow sets itself and bad values are refused before that work."""
    taken = sorted(set(fixed) & set(extra))
    if taken:
        raise ValueError(f"{workflow} sets {', '.join(taken)} itself: leave them out of its extra sf.unlearn "
                         f"arguments")
    try:
        bound = inspect.signature(unlearn).bind(None, None, None, **fixed, **extra)  # the model and loaders: later
    except TypeError as err:
        raise TypeError(f"{workflow}'s extra sf.unlearn arguments: {err}") from None
    bound.apply_defaults()
    settings = inspect.signature(_check_settings).parameters
    _check_settings(**{name: bound.arguments[name] for name in settings if name != "config"},
                    config=bound.arguments["config"] if bound.arguments["config"] is not None else SEMUConfig())


class _Undo:
    """What unlearn changes in the user's model, captured before it starts, so that any error (or Ctrl-C) after
    the adapters are installed gives the model back exactly: its layers and requires_grad flags (unload), its
    buffers (norm statistics move with norm_mode="train"), its training flags and existing .grad tensors."""

    def __init__(self, model: nn.Module):
        self.modes = {m: m.training for m in model.modules()}
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grads = [(p, p.grad) for p in model.parameters()]

    def __call__(self, semu_model: Optional[SEMUModel]) -> None:
        if semu_model is not None and semu_model._detached_by is None:
            semu_model.unload()
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)
        for module, mode in self.modes.items():
            module.training = mode
        for param, grad in self.grads:
            param.grad = grad


def unlearn(model: nn.Module, forget_loader: Iterable, retain_loader: Optional[Iterable] = None,
            config: Optional[SEMUConfig] = None, *, loss_fn: Optional[LossFn] = None,
            train_loss_fn: Optional[TrainLossFn] = None, retain_loss_fn: Optional[TrainLossFn] = None,
            optimizer: str = "adam", lr: float = 5e-3,
            epochs: int = 15, momentum: float = 0.9, weight_decay: float = 5e-4, select_best: bool = True,
            patience: Optional[int] = None, min_delta: float = 0.0, label_rule: str = "uniform_other",
            label_classes: Optional[int] = None, retain_mode: str = "interleave", max_grad_norm: Optional[float] = None,
            max_steps: Optional[int] = None,
            progress: bool = True, on_epoch=None, checkpoint_dir=None,
            checkpoint_every: Optional[int] = None, resume: bool = True, distributed: Optional[bool] = None,
            process_group=None) -> tuple[SEMUModel, SEMUReport]:
    """SEMU end to end: sf.prepare, then train R for `epochs` passes over the forget set (and the retain set,
    interleaved, when given). Returns (SEMUModel, report).

    loss_fn: the gradient-pass loss (see prepare). train_loss_fn(model, batch, generator) -> scalar: the forget loss
    while training R (generator: a CPU torch.Generator seeded by config.seed; draw on the CPU, then move); None
    means cross-entropy against random labels != the true ones, drawn by label_rule ("uniform_other" or "official",
    see sf.losses) from the first label_classes classes (None: all of the model's outputs; the official code draws
    from its --num_classes, 10 unless given, also on CIFAR-100). retain_loss_fn, same signature, for retain batches;
    None means cross-entropy with their true labels. retain_mode: "interleave" (forget and retain batches
    alternate), "mixed" (the official retain variant: both DataLoaders' datasets shuffled into one set of mixed
    batches of the forget loader's batch size, forget samples with random labels) or "score" (retain data only
    scores epochs for select_best and patience, as the official early exit reads it without training on it).
    max_steps: stop after this many optimizer steps in all, ending the epoch it falls in early (as the official DDPM
    loop's n_iters); None: every epoch runs whole. max_grad_norm: clip the gradient of all R (total norm) to this at
    every step, as the official DDPM/SD training does with 1.0 (there the norm also counts R's entries outside each
    channel's kept block, whose gradients the official code masks after clipping; ours are zero, so where clipping
    acts the official steps are slightly smaller).
    optimizer "adam" or "sgd" (with momentum); the defaults (Adam, lr 5e-3, 15 epochs) forget on the bundled digits
    task over 3 seeds x 10 classes (benchmarks/RESULTS.md); the official classification run used SGD, lr 1e-5,
    10 epochs, momentum 0.9, weight_decay 5e-4, which barely moves R there.
    select_best (classification only: with a train_loss_fn epochs are not scored, and the last R is kept): keep the R
    of the epoch with the best (100 - forget acc + retain acc) / 2 (without retain data: the lowest forget
    accuracy). patience: stop early once the score has not reached the best one + min_delta (min_delta 0: not
    beaten it) for this many epochs (classification only: refused with a train_loss_fn; None = run every epoch).
    progress: a tqdm bar.
    sf.presets.preset("official-classification") gives the official run's settings of all of these.
    on_epoch(epoch, semu_model) -> dict or None: called after each epoch; what it returns joins that epoch's history
    entry (e.g. accuracies on data the run does not train on); {"stop": True} in it ends training after that
    epoch (early stopping on any criterion, for any task).

    checkpoint_dir: keep the adapters (after prepare) and the training state (R, optimizer, random stream, epoch
    and step, history, buffers, torch's random state, the loaders' shuffling generators) there, rewritten
    atomically every `checkpoint_every` steps (None: at the end of each epoch). With resume=True a run that finds a
    checkpoint there skips prepare and continues from it; the result equals an uninterrupted run's bit for bit when
    the loaders' order depends only on torch's random state and their generators (as a DataLoader's shuffle does).
    distributed, process_group: as in prepare; while training R the gradients of R are averaged across ranks at
    every step (every rank must yield the same number of batches) and accuracies count every rank's data."""
    config = config if config is not None else SEMUConfig()
    _check_settings(config, optimizer, lr, epochs, momentum, weight_decay, loss_fn, train_loss_fn, retain_loss_fn,
                    on_epoch, patience, min_delta, label_rule, label_classes, max_grad_norm, max_steps,
                    checkpoint_every)
    group = distributed_setup.resolve(distributed, process_group)
    # read by prepare and by every epoch; a rank's shard may be empty in prepare (training then refuses it on all)
    check_loader("forget_loader", forget_loader, passes=2, empty=group is not None)
    if retain_loader is not None:
        check_loader("retain_loader", retain_loader, passes=2, empty=group is not None)
    _check_retain_mode(retain_mode, retain_loader, forget_loader, train_loss_fn, retain_loss_fn, group)
    if group is not None:  # before prepare; streams are checked step by step (_Trainer._average_gradients)
        trained = {"forget_loader": forget_loader, "retain_loader": retain_loader if retain_mode == "interleave"
                   else None}
        distributed_setup.check_same_lengths({k: v for k, v in trained.items() if v is not None}, group,
                                             "R's gradients are averaged over the ranks step by step")
    base = distributed_setup.unwrap(model)
    layers = select_layers(base, config)
    run_identity = {"semu_config": config.to_dict(),
                    "layers": {name: fingerprint(layer.weight) for name, layer in layers.items()}}
    settings = {
        "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": config.seed,
        "label_rule": label_rule, "label_classes": label_classes, "retain_mode": retain_mode,
        "max_grad_norm": max_grad_norm, "max_steps": max_steps, "select_best": select_best, "patience": patience,
        "min_delta": min_delta,
        "loss_fn": _callable_name(loss_fn),
        "train_loss_fn": _callable_name(train_loss_fn), "retain_loss_fn": _callable_name(retain_loss_fn),
        **run_identity}
    agreed = {**settings, "epochs": epochs, "checkpoint_dir given": checkpoint_dir is not None,
              "checkpoint_every": checkpoint_every, "resume": resume}
    checkpoint = Checkpoint(checkpoint_dir, checkpoint_every, {
        **settings, **_data_settings(forget_loader, retain_loader, group, checkpoint_dir is not None, agreed)})
    saved = _saved_state(checkpoint, resume, group)
    undo, semu_model = _Undo(base), None
    try:
        if saved is not None:
            semu_model = load_adapters(base, checkpoint.adapters_dir)
        else:
            semu_model = prepare(model, forget_loader, loss_fn=loss_fn, config=config, distributed=distributed,
                                 process_group=process_group)
            _save_adapters(checkpoint, semu_model, group)
        _train(semu_model, saved, forget_loader, retain_loader, checkpoint, group, config,
               train_loss_fn=train_loss_fn, retain_loss_fn=retain_loss_fn, optimizer=optimizer, lr=lr,
               epochs=epochs, momentum=momentum, weight_decay=weight_decay, select_best=select_best,
               patience=patience, min_delta=min_delta, label_rule=label_rule, label_classes=label_classes,
               retain_mode=retain_mode, max_grad_norm=max_grad_norm, max_steps=max_steps, progress=progress,
               on_epoch=on_epoch)
    except BaseException:
        undo(semu_model)  # the model as it came in, whatever failed (Ctrl-C included)
        raise
    return semu_model, semu_model.report


def _train(semu_model: SEMUModel, saved, forget_loader, retain_loader, checkpoint, group, config, *, train_loss_fn,
           retain_loss_fn, optimizer, lr, epochs, momentum, weight_decay, select_best, patience, min_delta,
           label_rule, label_classes, retain_mode, max_grad_norm, max_steps, progress, on_epoch) -> None:
    """Train R (see unlearn); the outcome goes to semu_model.report.training."""
    report = semu_model.report
    params = semu_model.trainable_parameters()
    if not params:
        note = "no adapter installed (every forget gradient is zero, or every layer got k = 0): nothing to train"
        warnings.warn(note)
        report.training = {"note": note}
        return
    opt = _make_optimizer(params, optimizer, lr, momentum, weight_decay)
    # each rank draws its own random labels (rank 0 those of one process)
    generator = torch.Generator().manual_seed(config.seed if group is None or group.rank == 0
                                              else (config.seed * 1_000_003 + group.rank) % 2 ** 63)
    losses = {"forget": train_loss_fn or random_label_loss_for(label_rule, label_classes),
              "retain": retain_loss_fn or true_label_loss,
              "mixed": functools.partial(mixed_batch_loss, rule=label_rule, label_classes=label_classes)}
    trainer = _Trainer(semu_model, opt, generator, losses, checkpoint, group, min_delta, max_grad_norm,
                       (forget_loader, retain_loader), max_steps)
    if saved is not None:
        trainer.resume(saved)
    classify = train_loss_fn is None
    start = time.perf_counter()
    bar = tqdm(range(trainer.run["epoch"], epochs), desc="SEMU unlearn", unit="epoch",
               disable=not progress)
    for epoch in bar:
        if trainer.run["step"] == 0 and trainer.steps_left() == 0 or trainer.run.get("stopped"):
            break  # max_steps reached at an epoch's end, or a resumed run that had stopped early
        set_norm_mode(semu_model, config.train_norm_mode or config.norm_mode)
        set_sampler_epoch((forget_loader, retain_loader), epoch)
        trainer.begin_epoch()
        if retain_mode == "mixed":
            trainer.train_epoch(mixed_batches(forget_loader, retain_loader, config.seed, epoch))
        else:
            trainer.train_epoch(interleave(forget_loader, retain_loader if retain_mode == "interleave" else None))
        losses = trainer.run["losses"]
        if not losses:
            raise ValueError(f"epoch {epoch + 1} ran no step: forget_loader (and retain_loader) yielded no batch")
        entry = {"epoch": epoch + 1, "loss": sum(losses) / len(losses)}
        if classify:
            entry.update(trainer.score_epoch(epoch + 1, forget_loader, retain_loader, select_best))
        extra, failure = distributed_setup.attempt(lambda: dict(on_epoch(epoch + 1, semu_model) or {})
                                                   if on_epoch is not None else {}, group)
        stop = bool((extra or {}).pop("stop", False))
        entry.update(extra or {})
        if group is not None:  # one rank's on_epoch error or stop ends every rank's run
            stop = bool(distributed_setup.all_reduce_outcome_([], group, failure, f"in on_epoch after epoch "
                                                              f"{epoch + 1}", params[0].device, counts=(stop,))[0])
        best = trainer.run["best_epoch"]
        stop = stop or (patience is not None and best is not None and epoch + 1 - best >= patience)
        trainer.end_epoch(entry, stop)
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch" and isinstance(v, float)})
        if stop:
            break
    trainer.restore_best()
    semu_model.eval()
    report.timings["train"] = time.perf_counter() - start
    report.training = {"history": trainer.run["history"], "best_epoch": trainer.run["best_epoch"] if select_best
                       else None, "optimizer": optimizer, "lr": lr, "epochs": len(trainer.run["history"])}
