"""Training the KL grader on a CUDA GPU: Keras on the torch backend, augmentation on the GPU.

``kneepipe train grader`` is built for a CPU: albumentations in a Python generator feed
``model.fit``. On a GPU that generator, not the network, sets the pace. This module
trains the same network, loss and grader file, by the same recipe
(:mod:`kneepipe.training.recipe`, :mod:`kneepipe.training.augment`), with the crops held
on the GPU as ``uint8`` and augmented there in batches, in a plain torch loop.

It reads a *crop pack*: one ``.npz`` holding the train and val crops, each encoded as
PNG or JPEG, with their grades. A pack is small enough to copy to a training machine
that cannot see the crop folders::

    kneepipe train pack ../shared/data/oai-kl224 --out pack.npz --quality 90
    kneepipe train grader --backend torch --pack pack.npz --out RUN --minutes 6 \\
        init=kneepipe/weights/grader.npz lr=0.0003 train_batch=64

``train`` runs for a wall-clock budget: it times the first two epochs, then fixes the
number of epochs that fit and decays the learning rate over them (linear warm-up, the
peak held to the end of epoch 2, cosine decay to 1% of the peak). It writes
``metrics.csv``, ``train.log``, ``last.npz`` (the final epoch), ``soup.npz`` (the weight
average of the final ``--soup`` epochs), and ``grader.npz``: whichever of the two has
the higher val QWK. Calibrate the result on val before using it::

    kneepipe train calibrate RUN/grader.npz --out calibrated.npz
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np

from kneepipe.config import save_config
from kneepipe.files import write_atomic
from kneepipe.grade.config import GradeConfig
from kneepipe.training.augment import AugmentationRecipe, augment_batch
from kneepipe.training.recipe import (
    RunLog,
    append_epoch,
    architecture_args,
    epoch_record,
    grader_record,
    initial_weights,
    learning_rate,
    precision_policy,
    start_run,
    stratified_subset,
    training_prior,
)

PACK_PARTS = ("train", "val")


def pack_crops(root: str | Path, out: str | Path, quality: int | None = None, size: int = 224) -> dict[str, int]:
    """Encode ``root/{train,val}/<grade>/<crop>`` into one ``.npz`` crop pack.

    Args:
        root: a folder with ``train/`` and ``val/`` in the labelled-crop layout.
        out: the pack file to write.
        quality: JPEG quality 1-100; ``None`` stores lossless PNG.
        size: crops are fitted to ``size`` x ``size`` first (the grader's rule).

    Returns the number of crops per part.
    """
    import cv2

    from kneepipe.grade.data import labelled_files, load_crops

    arrays: dict[str, np.ndarray] = {}
    counts = {}
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if quality else []
    for part in PACK_PARTS:
        paths, grades = labelled_files(Path(root) / part)
        if not paths:
            raise FileNotFoundError(f"{Path(root) / part}: no labelled crops (expected <grade>/<crop> folders)")
        crops = load_crops(paths, grades, size)
        encoded = []
        for path, crop in zip(crops.paths, crops.crops, strict=True):
            ok, data = cv2.imencode(".jpg" if quality else ".png", crop, params)
            if not ok:
                raise ValueError(f"{path}: could not be encoded")
            encoded.append(data.ravel())
        arrays[f"{part}_bytes"] = np.concatenate(encoded)
        arrays[f"{part}_offsets"] = np.cumsum([0] + [len(e) for e in encoded])
        arrays[f"{part}_grades"] = crops.kl_grades.astype(np.int8)
        arrays[f"{part}_names"] = np.array([str(p.relative_to(root)) for p in crops.paths])
        counts[part] = len(encoded)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub takes the keyword for allow_pickle
    write_atomic(out, buffer.getvalue())
    return counts


def read_pack(path: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one part of a crop pack: ``(n, h, w)`` uint8 crops and ``(n,)`` grades."""
    import cv2

    with np.load(path, allow_pickle=False) as pack:
        data, offsets, grades = pack[f"{part}_bytes"], pack[f"{part}_offsets"], pack[f"{part}_grades"]
    crops = []
    for i in range(len(grades)):
        crop = cv2.imdecode(data[offsets[i] : offsets[i + 1]], cv2.IMREAD_GRAYSCALE)
        if crop is None:
            raise ValueError(f"{path}: crop {i} of {part} cannot be decoded (a damaged pack)")
        crops.append(crop)
    return np.stack(crops), grades.astype(np.int64)


def train_on_gpu(
    config: GradeConfig, pack: str | Path, run_dir: str | Path, minutes: float, soup: int = 4, max_epochs: int = 200
) -> dict:
    """Train a grader from a crop pack for about ``minutes`` of wall-clock time; returns the kept record.

    Raises:
        ValueError: the config asks for what this trainer does not do (augmentations it
            cannot apply on the device, the CORN head).
        RuntimeError: Keras runs on another backend than torch.
        FileExistsError: ``run_dir`` holds a run.
    """
    recipe = AugmentationRecipe.from_config(config)
    unsupported = recipe.refused_on_device()
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not applied by the GPU augmentation; set to 0 or train on the CPU")
    backend = os.environ.setdefault("KERAS_BACKEND", "torch")
    if backend != "torch":  # said before loading another framework for nothing
        raise RuntimeError(f"this trainer needs KERAS_BACKEND=torch (KERAS_BACKEND is {backend})")
    from kneepipe.runtime import import_keras

    keras = import_keras()
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"this trainer needs KERAS_BACKEND=torch (Keras runs on {keras.backend.backend()})")
    if config.head != "softmax":
        raise ValueError("this trainer supports the softmax head only")
    run_dir = Path(run_dir)
    log = start_run(run_dir, resuming=False)
    started = time.time()
    save_config(config, run_dir, extra={"trainer": "train_torch", "pack": str(pack), "minutes": minutes})
    with precision_policy(config.train_precision):
        return _train(config, recipe, pack, run_dir, minutes, soup, max_epochs, log, started)


def soup_is_kept(soup_qwk: float | None, last_qwk: float | None) -> bool:
    """Whether the weight soup replaces the last epoch: its val QWK is as good (a defined QWK beats none).

    >>> soup_is_kept(0.5, 0.5), soup_is_kept(None, 0.5), soup_is_kept(0.1, None)
    (True, False, True)
    """
    if soup_qwk is None:
        return False
    return last_qwk is None or soup_qwk >= last_qwk


def _train(
    config: GradeConfig,
    recipe: AugmentationRecipe,
    pack: str | Path,
    run_dir: Path,
    minutes: float,
    soup: int,
    max_epochs: int,
    log: RunLog,
    started: float,
) -> dict:
    import torch

    from kneepipe.grade.data import class_weights
    from kneepipe.grade.model import build_grader, probabilities_from_logits, save_grader
    from kneepipe.metrics import grading_metrics
    from kneepipe.runtime import import_keras

    keras = import_keras()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_x, train_y = read_pack(pack, "train")
    val_x, val_y = read_pack(pack, "val")
    keep = stratified_subset(train_y, config.max_train_images, config.seed)
    train_x, train_y = train_x[keep], train_y[keep]
    keep = stratified_subset(val_y, config.max_val_images, config.seed)
    val_x, val_y = val_x[keep], val_y[keep]
    log(f"data: {len(train_y)} train {np.bincount(train_y, minlength=5).tolist()}, {len(val_y)} val on {device}")
    weights = torch.tensor(class_weights(train_y, config.class_weighting), dtype=torch.float32, device=device)
    train_prior = training_prior(train_y)
    train_gpu = torch.from_numpy(train_x).to(device)
    labels_gpu = torch.from_numpy(train_y).to(device)
    val_gpu = torch.from_numpy(val_x).to(device)

    keras.utils.set_random_seed(config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    model = build_grader(config.head, config.dropout, architecture_args=architecture_args(config))
    initial = initial_weights(config)
    if initial is not None:
        model.set_weights(initial)
        log(f"initialised from {config.init}")
    parameters = [v.value for v in model.trainable_variables]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)

    def as_input(crops):  # (b, h, w) in 0-255 -> (b, h, w, 3) float, grayscale replicated
        return crops.float()[..., None].expand(-1, -1, -1, 3)

    batch = config.train_batch
    steps = max(1, len(train_y) // batch)
    warmup, hold = int(config.warmup_epochs * steps), 2 * steps
    total_steps: int | None = None
    epochs = max_epochs
    soup_sum: list[np.ndarray] | None = None
    soup_count = 0

    def evaluate() -> dict:
        logits = []
        with torch.no_grad():
            for start in range(0, len(val_y), 128):
                out = model(as_input(val_gpu[start : start + 128]), training=False)
                logits.append(keras.ops.convert_to_numpy(out).astype(np.float32))
        return grading_metrics(val_y, probabilities_from_logits(np.concatenate(logits), config.head))

    log(f"ready in {time.time() - started:.0f} s; {steps} steps of {batch} per epoch")
    step, epoch = 0, 0
    while epoch < epochs:
        epoch_start = time.time()
        order = torch.randperm(len(train_y), device=device, generator=generator)
        losses = torch.zeros((), device=device)
        for i in range(steps):
            index = order[i * batch : (i + 1) * batch]
            x = augment_batch(train_gpu[index].float(), recipe, generator)
            y = labels_gpu[index]
            lr = learning_rate(step, config.lr, warmup, hold, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(as_input(x), training=True)
            loss = torch.nn.functional.cross_entropy(
                logits.float(), y, reduction="none", label_smoothing=config.label_smoothing
            )
            loss = (loss * weights[y]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses += loss.detach()
            step += 1
        metrics = evaluate()
        epoch += 1
        seconds = time.time() - epoch_start
        if epoch == 2 and total_steps is None:
            # The pace is known now: fix the epochs that fit the budget and start the decay.
            left = minutes * 60 - (time.time() - started)
            epochs = int(min(max_epochs, max(epoch + 1, epoch + left // seconds)))
            total_steps = epochs * steps
            log(f"{seconds:.1f} s per epoch: {epochs} epochs fit in {minutes} min")
        record = epoch_record(epoch, int(train_x.shape[1]), lr, float(losses) / steps, metrics, seconds)
        append_epoch(run_dir, record)
        log(
            f"epoch {epoch}/{epochs}: loss {record['train_loss']} val acc {metrics['accuracy']} "
            f"QWK {metrics['qwk']} MAE {metrics['mae']} predicted {metrics['predicted_counts']} ({seconds:.1f} s)"
        )
        if epoch > epochs - soup:
            current = [np.asarray(w, dtype=np.float64) for w in model.get_weights()]
            soup_sum = current if soup_sum is None else [a + c for a, c in zip(soup_sum, current, strict=True)]
            soup_count += 1

    def preprocessing(kind: str, qwk: float | None):
        facts = {"trainer": "train_torch", "epochs": epochs, "kept": kind, "val_qwk": qwk, "pack": Path(pack).name}
        return grader_record(int(train_x.shape[1]), config, train_prior, facts)

    last_metrics = evaluate()
    save_grader(model, preprocessing("last epoch", last_metrics["qwk"]), run_dir / "last.npz")
    kept, kept_metrics = "last", last_metrics
    if soup_sum is not None and soup_count > 1:
        model.set_weights([(s / soup_count).astype(np.float32) for s in soup_sum])
        soup_metrics = evaluate()
        save_grader(model, preprocessing(f"soup of {soup_count} epochs", soup_metrics["qwk"]), run_dir / "soup.npz")
        log(f"soup of the last {soup_count} epochs: val acc {soup_metrics['accuracy']} QWK {soup_metrics['qwk']}")
        if soup_is_kept(soup_metrics["qwk"], last_metrics["qwk"]):
            kept, kept_metrics = "soup", soup_metrics
    source = run_dir / f"{kept}.npz"
    write_atomic(run_dir / "grader.npz", source.read_bytes())
    log(f"kept {source.name} as grader.npz (val QWK {kept_metrics['qwk']}); {(time.time() - started) / 60:.1f} min")
    return {"kept": kept, "epochs": epochs, **{k: kept_metrics[k] for k in ("accuracy", "qwk", "mae", "ece")}}
