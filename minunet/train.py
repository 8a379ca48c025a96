"""Training a U-Net on labelled cells: the paper's recipe, with checkpoints you can resume.

One training step::

    tiles   <- random crops of the training images (mirror-padded at the borders),
               augmented (rotation/flip, elastic deformation, gray values)
    logits  <- net.forward(tiles)
    loss, g <- weighted softmax cross-entropy (weights: the paper's Eq. 2 map)
    net.backward(g); optimizer.step()

Targets. Labels are instance labels (0 = background). The network learns two classes,
cell and background; touching cells are first separated by a one-pixel background line
(:func:`minunet.data.carve_separation_borders`), and the weight map makes those lines
expensive to miss, so that the prediction keeps cells apart and they can be counted.

An *epoch* is ``steps_per_epoch`` steps, by default as many tiles as it takes to cover every
training pixel once. After each epoch the network is evaluated on the validation images
(foreground IoU, Dice, pixel error, object F1 and relative count error) and, if asked, a
checkpoint is written.

Reproducibility: all randomness (tile positions, augmentation) comes from one
``numpy.random.Generator`` seeded with ``seed``, whose state is saved in checkpoints, so a
resumed run continues exactly as an uninterrupted one would (for networks without dropout;
the dropout masks have their own generator inside the network).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from minunet.backend import is_cupy_array, to_device, to_numpy
from minunet.data.loaders import Dataset
from minunet.data.tiles import TileSampler
from minunet.data.weights import carve_separation_borders, class_weight_map, weight_map
from minunet.inference import predict
from minunet.losses import softmax_cross_entropy
from minunet.metrics import class_scores, count_objects, dice, iou, object_scores, pixel_error
from minunet.optim import SGD, Adam
from minunet.parallel import BatchSplit
from minunet.postprocess import label_instances
from minunet.serialization import TRAINING_KEY, read, save

CHECKPOINT_FORMAT = 2  # 2: a model file of minunet.save with the training entries added
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
LR_SCHEDULES = ("constant", "cosine")
# Validation metrics that keep_best can select on, and their direction.
HIGHER_IS_BETTER = {"iou": True, "dice": True, "f1": True, "pixel_error": False,
                    "count_error": False}
MULTICLASS_METRICS = ("iou", "pixel_error")
GPU_LOSS_EVERY = 10  # on the GPU, fit reads the losses (and waits for the GPU) every N steps


def learning_rate(schedule: str, lr: float, min_lr: float, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) out of ``steps``."""
    if schedule == "constant":
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / steps))


def _improves(score: float, metric: str, best: float | None) -> bool:
    if best is None:
        return True
    return score > best if HIGHER_IS_BETTER[metric] else score < best


def _copy_state(net) -> dict:
    """The network's state on the host (``state_dict`` already copies)."""
    return {name: to_numpy(value) for name, value in net.state_dict().items()}


@dataclass
class History:
    """What happened during training.

    ``loss``: the training loss of every step. ``epochs``: one dict per epoch with ``epoch``,
    ``step`` (steps done so far), ``train_loss`` (mean over the epoch), ``seconds`` (wall
    time of the epoch) and, with validation data, ``val_iou``, ``val_dice``,
    ``val_pixel_error``, ``val_f1`` and ``val_count_error`` (means over the images).
    """

    loss: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    best_epoch: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def as_dataset(data, name: str) -> Dataset:
    """Accept a :class:`~minunet.data.Dataset` or a pair ``(images, labels)`` of arrays
    ((N, H, W) / (N, C, H, W) and (N, H, W)) or of lists of arrays."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{name} must hold the same non-zero number of images and label "
                             f"images, got {len(images)} and {len(labels)}")
        return Dataset(list(images), list(labels), [f"{name}_{i}" for i in range(len(images))])
    raise TypeError(f"{name} must be a minunet.data.Dataset or a pair (images, labels), "
                    f"got {type(data).__name__}")


def training_targets(labels, *, num_classes: int = 2, weight_maps: bool = True,
                     w0: float = 10.0, sigma: float = 5.0, class_weights="balanced",
                     border_width: int = 1):
    """``(target, weights)`` for one label image.

    Two classes: ``labels`` are instance labels; the target (int64 (H, W)) is 1 = cell,
    0 = background and separation lines, and the weights (float32 (H, W)) the paper's Eq. 2
    map, or only the class weights when ``weight_maps`` is False. More classes: ``labels``
    already are class indices (e.g. :func:`minunet.data.boundary_classes`); the weights are
    the class weights (Eq. 2 is defined for cell/background only).
    """
    labels = np.asarray(labels)
    if num_classes > 2:
        return labels.astype(np.int64), class_weight_map(labels, class_weights, num_classes)
    carved = carve_separation_borders(labels, border_width) if border_width else labels
    weights = (weight_map(carved, w0=w0, sigma=sigma, class_weights=class_weights)
               if weight_maps else class_weight_map(carved, class_weights))
    return (carved > 0).astype(np.int64), weights


def evaluate(net, data, *, tile_size: int | None = None, threshold: float = 0.5) -> dict:
    """Mean validation metrics of ``net`` over ``data`` (a Dataset or (images, labels)).

    Two classes: foreground IoU, Dice and pixel error against ``labels > 0``, object F1 at
    IoU 0.5 and relative count error of the cells found by
    :func:`minunet.postprocess.label_instances`. More classes (``labels`` are class
    indices): ``pixel_error`` (fraction of pixels given the wrong class), ``iou_<c>`` for
    every class ``c >= 1`` and ``iou``, their mean.
    """
    data = as_dataset(data, "val_data")
    num_classes = net.config["num_classes"]
    rows = []
    for image, labels in zip(data.images, data.labels, strict=True):
        prob = predict(net, image, tile_size=tile_size)
        truth = np.asarray(labels)
        if num_classes > 2:
            rows.append(class_scores(prob.argmax(axis=0), truth, num_classes))
            continue
        found = label_instances(prob, threshold=threshold)
        true_count = count_objects(truth)
        rows.append({
            "iou": iou(found, truth), "dice": dice(found, truth),
            "pixel_error": pixel_error(found, truth),
            "f1": object_scores(found, truth).f1,
            "count_error": abs(count_objects(found) - true_count) / max(true_count, 1),
        })
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def make_optimizer(net, optimizer: str, lr: float | None, momentum: float, weight_decay: float):
    """``minunet.optim.SGD`` (with ``momentum``) or ``Adam`` over ``net.parameters()``."""
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "sgd":
        return SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return Adam(net.parameters(), lr=lr, weight_decay=weight_decay)


# --- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(path, net, optimizer, history: History, rng: np.random.Generator,
                    step: int, settings: dict, best_state: dict | None = None) -> None:
    """Write everything needed to resume training to one ``.npz`` file, atomically.

    A checkpoint is a model file of :func:`minunet.save` (so ``minunet.load`` and
    ``predict --model`` read it as the network of its last epoch) with the training
    entries added: the optimizer's state (``optimizer/<name>``), the best epoch's weights
    if kept (``best/<name>``) and a JSON entry with the step, the history, the random
    generator's state and the training settings."""
    training = {f"best/{k}": v for k, v in (best_state or {}).items()}
    for key, value in optimizer.state_dict().items():
        training[f"optimizer/{key}"] = np.asarray(to_numpy(value) if hasattr(value, "shape")
                                                  else value)
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "history": history.as_dict(),
            "rng": rng.bit_generator.state, "settings": settings,
            "optimizer": type(optimizer).__name__}
    training[TRAINING_KEY] = np.array(json.dumps(meta))
    save(net, path, training=training)


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """``(meta, net_state, optimizer_state)`` of a checkpoint written by
    :func:`save_checkpoint` (``meta`` also holds ``config`` and ``best_state``);
    ``ValueError`` if the file is not one."""
    config, net_state, training = read(path)
    if TRAINING_KEY not in training:
        raise ValueError(f"{path} is a model file, not a training checkpoint (it has no "
                         f"optimizer state to resume from)")
    meta = json.loads(str(training.pop(TRAINING_KEY)))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown training checkpoint format {meta.get('format')!r}")
    meta["config"] = config
    best_state = {k[5:]: v for k, v in training.items() if k.startswith("best/")}
    meta["best_state"] = best_state or None
    optimizer_state = {k[10:]: (v if v.ndim else v.item()) for k, v in training.items()
                       if k.startswith("optimizer/")}
    return meta, net_state, optimizer_state


# --- the training loop ----------------------------------------------------------------------

# Settings a resumed run must share with the run that wrote the checkpoint; only ``steps``
# may change (to train longer).
RESUME_SETTINGS = ("batch_size", "tile_size", "optimizer", "lr", "momentum", "weight_decay",
                   "augment", "elastic_std", "weight_maps", "w0", "sigma", "class_weights",
                   "border_width", "seed", "steps_per_epoch", "lr_schedule", "min_lr",
                   "keep_best")


def _architecture(config: dict) -> dict:
    """A network config without its initialisation seed, which no longer matters once
    weights are loaded."""
    return {key: value for key, value in config.items() if key != "seed"}


class BestWeights:
    """The weights of the epoch that scored best on one validation metric so far."""

    def __init__(self, metric: str | None):
        self.metric, self.score, self.state = metric, None, None

    def offer(self, metrics: dict, net) -> bool:
        """Keep ``net``'s weights if ``metrics[self.metric]`` beats the best so far."""
        if self.metric is None or not _improves(metrics[self.metric], self.metric, self.score):
            return False
        self.score, self.state = metrics[self.metric], _copy_state(net)
        return True


def _check_arguments(net, *, batch_size, tile_size, resume, checkpoint_path, lr_schedule,
                     keep_best, has_validation) -> None:
    num_classes = net.config["num_classes"]
    for value, name in ((batch_size, "batch_size"), (tile_size, "tile_size")):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if keep_best is not None:
        allowed = sorted(HIGHER_IS_BETTER) if num_classes == 2 else list(MULTICLASS_METRICS)
        if keep_best not in allowed:
            raise ValueError(f"keep_best must be one of {allowed}, got {keep_best!r}")
        if not has_validation:
            raise ValueError("keep_best needs val_data to choose the best epoch on")
    if checkpoint_path is not None:  # checked now, not after an hour of training
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        while not os.path.exists(folder):  # missing folders are created when saving
            folder = os.path.dirname(folder)
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise PermissionError(f"checkpoint_path {checkpoint_path}: cannot write there "
                                  f"({folder} is not a writable folder)")


def _check_class_masks(datasets, num_classes: int) -> None:
    if num_classes == 2:
        return
    for dataset in datasets:
        for name, labels in zip(dataset.names, dataset.labels, strict=True):
            if np.min(labels) < 0 or np.max(labels) >= num_classes:
                raise ValueError(f"label image {name} holds values outside "
                                 f"0..{num_classes - 1}; a {num_classes}-class network "
                                 f"trains on class-index masks")


def training_step(net, optimizer, x, target, weight, step: int):
    """One step of gradient descent on a batch: forward, the weighted softmax
    cross-entropy, backward, update (``net``: the network, or a :class:`BatchSplit` of it
    that shares the batch out to threads). Returns the loss: a float (``FloatingPointError``,
    before the update, if it is not finite), or on the GPU a 0-d CuPy array that is not read
    here, since reading it waits for the GPU; :func:`fit` reads and checks it with
    :func:`finite_loss` every ``GPU_LOSS_EVERY`` steps."""
    net.zero_grad()
    logits = net.forward(x)
    loss, grad = softmax_cross_entropy(logits, target, weight)
    if not is_cupy_array(loss):
        loss = finite_loss(loss, step, optimizer.lr)
    net.backward(grad, input_gradient=False)
    optimizer.step()
    return loss


def finite_loss(loss, step: int, lr: float) -> float:
    """``loss`` of step ``step`` as a float; ``FloatingPointError`` if it is not finite."""
    loss = float(loss)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss became {loss} at step {step}; lower the learning rate "
            f"(lr={lr}) or check the inputs for NaN/inf")
    return loss


def _resume(checkpoint_path, net, optimizer, rng, settings: dict, best: BestWeights):
    """Load the checkpoint into ``net``, ``optimizer``, ``rng`` and ``best``; returns
    ``(history, step)``. Refuses a checkpoint of another network or other settings."""
    meta, net_state, optimizer_state = load_checkpoint(checkpoint_path)
    if _architecture(meta["config"]) != _architecture(net.config):
        raise ValueError(f"checkpoint {checkpoint_path} was written for a network with "
                         f"config {meta['config']}, not {net.config}")
    saved = json.loads(json.dumps(meta["settings"]))
    wanted = json.loads(json.dumps(settings))
    different = [f"{key}={saved.get(key)!r} (now {wanted[key]!r})" for key in RESUME_SETTINGS
                 if saved.get(key) != wanted[key]]
    if different:
        raise ValueError(f"checkpoint {checkpoint_path} was written with other training "
                         f"settings: {', '.join(different)}; resume with the same settings")
    net.load_state_dict(net_state)
    optimizer.load_state_dict(optimizer_state)
    rng.bit_generator.state = meta["rng"]
    history = History(**meta["history"])
    if history.best_epoch is not None and best.metric is not None:
        best.score = history.epochs[history.best_epoch - 1][f"val_{best.metric}"]
        best.state = meta.get("best_state")
    return history, int(meta["step"])


def fit(net, train_data, val_data=None, *, steps: int | None = None, epochs: int | None = None,
        steps_per_epoch: int | None = None, batch_size: int = 4, tile_size: int = 128,
        optimizer: str = "adam", lr: float | None = None, momentum: float = 0.99,
        weight_decay: float = 0.0, augment: bool = True, elastic_std: float = 10.0,
        weight_maps: bool | None = None, w0: float = 10.0, sigma: float = 5.0,
        class_weights="balanced", border_width: int = 1, seed: int = 0,
        checkpoint_path=None, resume: bool = False, progress: bool = True,
        val_tile_size: int | None = None, max_seconds: float | None = None,
        lr_schedule: str = "constant", min_lr: float = 0.0,
        keep_best: str | None = None) -> History:
    """Train ``net`` (in place) and return its :class:`History`.

    The paper's recipe, step by step: random tiles of the training images (mirror-padded,
    augmented) are drawn; each step is :func:`training_step` on a batch of them; every
    ``steps_per_epoch`` steps the network is scored on the validation images (the best
    epoch's weights kept if asked) and a checkpoint is written.

    Parameters
    ----------
    net : minunet.UNet
        ``num_classes=2``: cell/background, trained from instance labels; more classes:
        trained from class-index masks.
    train_data, val_data : Dataset or (images, labels)
        Images (H, W) or (C, H, W) in [0, 1]; labels are instance labels (0 = background)
        for two classes, class indices ``0 .. num_classes - 1`` for more.
    steps, epochs, steps_per_epoch : int
        Length of training: ``steps`` in total, or ``epochs * steps_per_epoch``. Default
        ``steps_per_epoch``: enough tiles to cover the training pixels once. Default length:
        one epoch.
    batch_size, tile_size : int
        Tiles per step and edge of the *output* tile; the input tile is the network's
        ``input_size_for_output(tile_size)``.
    optimizer, lr, momentum, weight_decay
        ``"adam"`` (default lr 1e-3) or ``"sgd"`` (the paper's; default lr 0.01, momentum
        0.99).
    lr_schedule, min_lr : ``"constant"``, or ``"cosine"``: the learning rate falls from
        ``lr`` to ``min_lr`` along half a cosine over the ``steps`` (large steps while the
        network is far from a minimum, small ones to settle into it at the end).
    augment, elastic_std : random rotations/flips, elastic deformation (std in px), gray
        values.
    weight_maps, w0, sigma, class_weights : the Eq. 2 loss weights (or, with
        ``weight_maps=False``, only ``class_weights``). Default: Eq. 2 for two classes;
        with more classes only class weights exist (``weight_maps=True`` is refused).
    border_width : width of the separation lines cut between touching cells (0: none).
    seed : seed of the generator driving tiles and augmentation.
    keep_best : name of a validation metric (``"iou"``, ``"dice"``, ``"f1"``: higher is
        better; ``"pixel_error"``, ``"count_error"``: lower is better; with more than two
        classes ``"iou"`` or ``"pixel_error"``). After training, the network holds the
        weights of the epoch that scored best on it, not the last ones;
        ``History.best_epoch`` says which. Needs ``val_data``.
    checkpoint_path, resume : write a checkpoint after every epoch (atomically; the folder
        is checked for writing before training starts); with ``resume``, continue from it
        if it exists (network and settings must match; only ``steps`` may grow).
    progress : tqdm progress bar over the steps.
    val_tile_size : ``tile_size`` of :func:`minunet.predict` during validation.
    max_seconds : stop early, after the step during which this much wall time has passed
        (validation and checkpoint then happen as at the end of an epoch).

    Raises ``FloatingPointError`` naming the step if the loss becomes NaN or infinite.
    """
    num_classes = net.config["num_classes"]
    if weight_maps is None:
        weight_maps = num_classes == 2
    elif weight_maps and num_classes > 2:
        raise ValueError(f"weight_maps (the paper's Eq. 2) needs a cell/background network; "
                         f"this one has num_classes={num_classes}: pass weight_maps=False")
    _check_arguments(net, batch_size=batch_size, tile_size=tile_size, resume=resume,
                     checkpoint_path=checkpoint_path, lr_schedule=lr_schedule,
                     keep_best=keep_best, has_validation=val_data is not None)
    train = as_dataset(train_data, "train_data")
    val = None if val_data is None else as_dataset(val_data, "val_data")
    _check_class_masks([train] + ([val] if val else []), num_classes)

    # The tiles: targets and loss weights of every training image, sampled at random.
    targets, weights = zip(*(training_targets(
        labels, num_classes=num_classes, weight_maps=weight_maps, w0=w0, sigma=sigma,
        class_weights=class_weights, border_width=border_width) for labels in train.labels),
        strict=True)
    sampler = TileSampler.for_unet(train.images, targets, weights, output_size=tile_size,
                                   depth=net.config["depth"], padding=net.config["padding"],
                                   augment_tiles=augment, elastic_std=elastic_std)
    if steps_per_epoch is None:
        pixels = sum(t.size for t in targets)
        steps_per_epoch = max(1, math.ceil(pixels / (batch_size * sampler.output_size**2)))
    if steps is None:
        steps = (epochs or 1) * steps_per_epoch
    if steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"steps and steps_per_epoch must be positive, got {steps}, "
                         f"{steps_per_epoch}")

    opt = make_optimizer(net, optimizer, lr, momentum, weight_decay)
    settings = {"batch_size": batch_size, "tile_size": tile_size,
                "input_size": sampler.input_size, "output_size": sampler.output_size,
                "optimizer": optimizer, "lr": opt.lr, "momentum": momentum,
                "weight_decay": weight_decay, "augment": augment, "elastic_std": elastic_std,
                "weight_maps": weight_maps, "w0": w0, "sigma": sigma,
                "class_weights": class_weights, "border_width": border_width, "seed": seed,
                "steps": steps, "steps_per_epoch": steps_per_epoch,
                "lr_schedule": lr_schedule, "min_lr": min_lr, "keep_best": keep_best}
    rng = np.random.default_rng(seed)
    best = BestWeights(keep_best)
    history, step = History(), 0
    if resume and os.path.exists(checkpoint_path):
        history, step = _resume(checkpoint_path, net, opt, rng, settings, best)

    net.train()
    # the tiles of a batch are independent: each thread trains on a share of them
    split = BatchSplit(net)
    bar = tqdm(total=steps, initial=step, desc="training", disable=not progress,
               unit="step", dynamic_ncols=True)
    started = epoch_start = time.perf_counter()
    epoch_losses, unread = [], []  # unread: losses still on the GPU
    try:
        while step < steps:
            opt.lr = learning_rate(lr_schedule, settings["lr"], min_lr, step, steps)
            batch = sampler.sample(batch_size, rng)
            x, target, weight = (to_device(a, net.device) for a in batch)
            loss = training_step(split, opt, x.astype(net.dtype), target,
                                 weight.astype(net.dtype), step + 1)
            step += 1
            unread.append(loss)
            bar.update(1)
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            end_of_epoch = not (step % steps_per_epoch and step < steps and not out_of_time)
            if end_of_epoch or len(unread) == GPU_LOSS_EVERY or not is_cupy_array(loss):
                first = step - len(unread) + 1
                read = [finite_loss(value, first + i, opt.lr) for i, value in enumerate(unread)]
                history.loss += read
                epoch_losses += read
                unread = []
                bar.set_postfix(loss=f"{read[-1]:.4f}")
            if not end_of_epoch:
                continue
            # End of an epoch: record, validate, keep the best, checkpoint.
            record = {"epoch": len(history.epochs) + 1, "step": step,
                      "train_loss": float(np.mean(epoch_losses)),
                      "seconds": time.perf_counter() - epoch_start}
            if val is not None:
                metrics = evaluate(net, val, tile_size=val_tile_size)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                if best.offer(metrics, net):
                    history.best_epoch = record["epoch"]
                net.train()
                bar.set_postfix(loss=f"{loss:.4f}", val_iou=f"{metrics['iou']:.3f}")
            history.epochs.append(record)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, net, opt, history, rng, step, settings,
                                best.state)
            epoch_start, epoch_losses = time.perf_counter(), []
            if out_of_time:
                break
    finally:
        bar.close()
    if best.state is not None:
        net.load_state_dict(best.state)
    net.eval()
    return history
