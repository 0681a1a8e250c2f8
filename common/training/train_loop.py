"""The training run, shared by both backends.

This file owns everything around the step: the run folder, class images, data order, every random
draw (so both backends see identical noise and timesteps), the learning-rate schedule, logging,
checkpoints (keep the last k, written atomically), validation images and exact resume. The backend's
Trainer only does the arithmetic of one micro-batch and the optimizer update.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
from tqdm.auto import tqdm

from common.formats import checkpoint_io, lora as lora_fmt
from common.formats import keymap, loading
from common.atomic import atomic_path
from common.arch import ModelArch
from common.formats.loading import model_arch
from common.training.class_images import ensure_class_images
from common.config import dump_args
from common.cli import check_output_dir
from common.training.data import DreamBoothDataset, count_images, list_images
from common.training.lr_schedules import LRSchedule
from common.errors import UserError
from common.diffusion.generate import SampleSettings, text_to_image
from common.images import make_grid, save_png
from common.formats.init_weights import random_weights
from common.formats.mindspore_layout import ldm_to_mindspore, lora_to_mindspore
from common.rng import Streams
from common.diffusion.schedule import NoiseSchedule
from common.tokenizer import tokenizer_for

log = logging.getLogger("train")

STATE_NAME = "train_state"
LEGACY_STATE = STATE_NAME + ".pt"          # the one state file of runs saved before per-step states
_CKPT_RE = re.compile(r"^(?:sd|lora)-(\d+)(?:\.safetensors|\.ckpt)?$")
_STATE_RE = re.compile(rf"^{STATE_NAME}(?:-\d+)?\.pt$")


def lr_schedule(args, total_steps: int) -> LRSchedule:
    """The learning rate per optimizer step: --lr_scheduler with diffusers' arguments, or (the
    default, "mindone") MindONE's --warmup_steps / --decay_steps / --end_learning_rate."""
    name = args.lr_scheduler
    # diffusers' get_scheduler passes --lr_num_cycles to cosine_with_restarts only (cosine keeps 0.5)
    return LRSchedule(name, args.start_learning_rate, warmup_steps=args.warmup_steps, total_steps=total_steps,
                      num_cycles=args.lr_num_cycles if name == "cosine_with_restarts" else None,
                      power=args.lr_power, decay_steps=args.decay_steps, end_lr=args.end_learning_rate,
                      step_rules=args.lr_step_rules)


def step_inputs(schedule: NoiseSchedule, args, micro: int, rank: int, world: int, batch_size: int,
                latent_shape, with_class: bool) -> Dict[str, np.ndarray]:
    """The random inputs of one micro-batch, drawn by this rank for its own items only. Each item's
    draws are keyed by its index in the global batch, so N processes with batch B see what one
    process with batch N*B sees."""
    streams = Streams(args.seed)
    halves = 2 if with_class else 1
    items = range(rank * batch_size, (rank + 1) * batch_size)
    shape = tuple(latent_shape)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in ("latent_noise", "noise", "timesteps")}
    for half in range(halves):
        for item in items:
            noise = streams.normal("train.noise", shape, micro, half, item)
            if args.offset_noise:
                offset = streams.normal("train.offset", (shape[0], 1, 1), micro, half, item)
                noise = noise + np.float32(args.offset_noise) * offset
            out["noise"].append(noise)
            out["latent_noise"].append(streams.normal("train.latent", shape, micro, half, item))
            out["timesteps"].append(streams.integers("train.t", schedule.num_train_timesteps, (), micro, half, item))
    arrays = {k: np.stack(v) for k, v in out.items()}
    t = arrays["timesteps"]
    arrays["coef_a"], arrays["coef_b"] = schedule.coefficients(t)
    arrays["loss_weights"] = (schedule.min_snr_weights(t, args.snr_gamma).astype(np.float32)
                              if args.snr_gamma else np.ones(len(t), np.float32))
    return arrays


def make_batch(data: Dict[str, np.ndarray], randoms: Dict[str, np.ndarray], prior_loss_weight: float,
               encoded: Optional["EncodedInputs"] = None):
    """One micro-batch for the trainer: instance rows first, class rows after, with the step's
    random inputs. `encoded` replaces images by cached VAE latents and prompt ids by cached text
    embeddings, when the run asks for them."""
    halves = ("instance", "class") if "class_images" in data else ("instance",)
    images = np.concatenate([data[f"{h}_images"] for h in halves])
    ids = np.concatenate([data[f"{h}_ids"] for h in halves])
    batch = dict(randoms)
    batch.update(n_instance=len(data["instance_images"]), prior_loss_weight=prior_loss_weight)
    if encoded is not None and encoded.latents is not None:
        paths = [p for h in halves for p in data[f"{h}_paths"]]
        batch["latent_mean"], batch["latent_std"] = encoded.posterior(paths, images)
    else:
        batch["images"] = images
    if encoded is not None and encoded.contexts is not None:
        batch["context"] = encoded.context(ids)
    else:
        batch["ids"] = ids
    return batch


class EncodedInputs:
    """What the frozen parts would compute again every step, computed once: the VAE posterior
    (mean, std) of each training image (kohya's --cache_latents; valid because crops are centred
    and unflipped, so a file always gives the same pixels; the posterior is still sampled per step
    with the step's noise, so the loss is the same) and the text encoder's output per prompt
    (diffusers' --pre_compute_text_embeddings). Filled lazily, on first use, by the trainer."""

    def __init__(self, trainer, latents: bool, contexts: bool):
        self.trainer = trainer
        self.latents: Optional[Dict[str, tuple]] = {} if latents else None
        self.contexts: Optional[Dict[bytes, np.ndarray]] = {} if contexts else None

    def posterior(self, paths: List[str], images: np.ndarray):
        missing = [i for i, p in enumerate(paths) if p not in self.latents]
        if missing:
            mean, std = self.trainer.encode_latents(images[missing])
            for j, i in enumerate(missing):
                self.latents[paths[i]] = (mean[j], std[j])
        return tuple(np.stack([self.latents[p][k] for p in paths]) for k in (0, 1))

    def context(self, ids: np.ndarray) -> np.ndarray:
        keys = [row.tobytes() for row in ids]
        missing = sorted({k for k in keys if k not in self.contexts})
        if missing:
            rows = np.stack([np.frombuffer(k, ids.dtype) for k in missing])
            for k, c in zip(missing, self.trainer.encode_text(rows)):
                self.contexts[k] = c
        return np.stack([self.contexts[k] for k in keys])


# --------------------------------------------------------------------------- run folder

class RunFolder:
    """output_path/{ckpt/, loss.csv, validation/, train_config.yaml, <logging_dir>/}."""

    def __init__(self, root: str, logs: str = "logs"):
        self.root = root
        self.logs = os.path.join(root, logs)
        self.ckpt = os.path.join(root, "ckpt")
        self.state_meta = os.path.join(self.ckpt, STATE_NAME + ".json")
        self.loss_log = os.path.join(root, "loss.csv")
        self.validation = os.path.join(root, "validation")

    def checkpoints(self) -> List[str]:
        """Saved checkpoints, oldest first."""
        if not os.path.isdir(self.ckpt):
            return []
        found = [(int(m.group(1)), f) for f in os.listdir(self.ckpt) if (m := _CKPT_RE.match(f))]
        return [os.path.join(self.ckpt, f) for _, f in sorted(found)]

    def committed(self) -> Optional[dict]:
        """The last complete save (train_state.json, written last), or None."""
        if not os.path.isfile(self.state_meta):
            return None
        try:
            with open(self.state_meta) as f:
                return json.load(f)
        except (OSError, ValueError):
            raise UserError(f"{self.state_meta} is unreadable; pass --overwrite True to start over") from None

    def event_files(self) -> List[str]:
        """TensorBoard event files this trainer wrote (named as TensorBoardLog names them)."""
        if not os.path.isdir(self.logs):
            return []
        return [os.path.join(self.logs, f) for f in os.listdir(self.logs) if f.startswith("events.out.tfevents.")]

    def state_files(self) -> List[str]:
        if not os.path.isdir(self.ckpt):
            return []
        return [os.path.join(self.ckpt, f) for f in os.listdir(self.ckpt) if _STATE_RE.match(f)]

    def check(self, resume: bool, overwrite: bool) -> None:
        """What `prepare` would refuse, without touching anything (every process checks; one prepares)."""
        if os.path.exists(self.state_meta) and not resume and not overwrite:
            raise UserError(f"{self.root} already holds a training run; pass --resume to continue it "
                            f"or --overwrite True to start over")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        self.check(resume, overwrite)
        has_run = os.path.exists(self.state_meta)        # a committed save: checkpoints alone are leftovers
        if has_run and not resume:
            for path in self.checkpoints() + self.state_files():
                _remove(path)
            for path in (self.state_meta, self.loss_log):
                if os.path.exists(path):
                    os.remove(path)
            for path in self.event_files():      # the old run's TensorBoard curves go with it
                os.remove(path)
        os.makedirs(self.ckpt, exist_ok=True)
        self.clean_interrupted()

    def clean_interrupted(self) -> None:
        """Remove what an interrupted save left: temporary files, and checkpoints or training
        states newer than (or beside) the last committed save."""
        meta = self.committed()
        for name in os.listdir(self.ckpt):
            if name.endswith((".tmp", ".old")):
                _remove(os.path.join(self.ckpt, name))
        if meta is None:                       # killed during the first save: nothing is complete
            for path in self.checkpoints() + self.state_files():
                _remove(path)
            return
        self.remove_states_except(meta.get("state", LEGACY_STATE))
        for path in self.checkpoints():
            if int(_CKPT_RE.match(os.path.basename(path)).group(1)) > int(meta["step"]):
                _remove(path)

    def commit(self, step: int, micro: int, checkpoint: str, state: str) -> None:
        """Record a complete save (its checkpoint and training state are already on disk): the
        one atomic rename that makes them the unit --resume continues from."""
        with atomic_path(self.state_meta) as tmp, open(tmp, "w") as f:
            json.dump({"step": step, "micro_step": micro, "checkpoint": checkpoint, "state": state}, f)
        self.remove_states_except(state)

    def remove_states_except(self, name: str) -> None:
        for path in self.state_files():
            if os.path.basename(path) != name:
                _remove(path)

    def truncate_loss_log(self, step: int) -> None:
        """Keep loss.csv's rows up to `step` (a resumed run logs the later ones again)."""
        if not os.path.isfile(self.loss_log):
            return
        with open(self.loss_log, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step
                           and len(r) == len(rows[0])]
        with atomic_path(self.loss_log) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def prune(self, keep: int) -> None:
        for path in self.checkpoints()[:-keep]:
            _remove(path)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def save_lora_folder(lora: lora_fmt.LoraSet, folder: str, metadata: Dict[str, str],
                     mindspore_arch: Optional[ModelArch] = None) -> None:
    """A LoRA checkpoint: the diffusers file and the kohya file side by side (plus, given
    `mindspore_arch`, MindONE's MindSpore LoRA .ckpt), written atomically."""
    with atomic_path(folder, folder=True) as tmp:
        checkpoint_io.save_state_dict(os.path.join(tmp, lora_fmt.DIFFUSERS_WEIGHT_NAME),
                                      lora_fmt.to_diffusers(lora), metadata={"format": "pt"})
        checkpoint_io.save_state_dict(os.path.join(tmp, lora_fmt.KOHYA_WEIGHT_NAME), lora_fmt.to_kohya(lora),
                                      metadata=metadata)
        if mindspore_arch is not None:
            checkpoint_io.save_mindspore_ckpt(os.path.join(tmp, lora_fmt.MINDSPORE_WEIGHT_NAME),
                                              lora_to_mindspore(lora, mindspore_arch))


# --------------------------------------------------------------------------- the run

def load_base_weights(args, arch: ModelArch) -> Dict[str, np.ndarray]:
    if not args.pretrained_model_path:
        raise UserError("--pretrained_model_path is required (an original-layout .safetensors/.ckpt, "
                        "a MindONE .ckpt or a diffusers folder; make a tiny one with tools/make_tiny_model.py)")
    bases = [loading.load_lora_file(path, arch) for path in args.base_weights or ()]  # small: fail early
    weights = loading.load_model_weights(args.pretrained_model_path, arch)
    if bases:
        scales = args.base_weights_multiplier or [1.0]
        weights = lora_fmt.merge_loras(weights, arch, [(b, scales[i % len(scales)]) for i, b in enumerate(bases)])
        log.info("merged %d LoRA file(s) into the base model (--base_weights)", len(bases))
    if args.unet_initialize_random:
        weights = {k: v for k, v in weights.items() if not k.startswith("model.diffusion_model.")}
        weights.update(random_weights(arch, args.seed, prefixes=("model.diffusion_model.",)))
    return weights


def initial_lora(args, arch: ModelArch) -> lora_fmt.LoraSet:
    """The adapters training starts from: seeded ones on --lora_layers, where --network_weights
    gives values (kohya's continue-training) those."""
    init = lora_fmt.init_lora(arch, args.lora_rank, args.lora_alpha, args.seed, unet=args.lora_ft_unet,
                              text_encoder=args.lora_ft_text_encoder and args.train_text_encoder,
                              layers=args.lora_layers)
    if not args.network_weights:
        return init
    start = loading.load_lora_file(args.network_weights, arch)
    outside = sorted(set(start) - set(init))
    if outside:
        raise UserError(f"--network_weights {args.network_weights} adapts layers outside the trained set "
                        f"(--lora_layers {args.lora_layers}, --lora_ft_unet / --lora_ft_text_encoder): "
                        f"{keymap.listing(outside, 3)}")
    for target, pair in start.items():
        if not isinstance(pair, lora_fmt.LoraPair) or pair.mid is not None or pair.dora_scale is not None:
            raise UserError(f"--network_weights: {target} is a {pair.kind} layer; training continues plain "
                            f"LoRA / LoCon only (merge other kinds with --base_weights)")
        if (pair.rank, pair.alpha) != (args.lora_rank, args.lora_alpha):
            raise UserError(f"--network_weights: {target} has rank {pair.rank} and alpha {pair.alpha:g}; "
                            f"pass --lora_rank {pair.rank} --lora_alpha {pair.alpha:g}")
        init[target] = lora_fmt.LoraPair(down=np.asarray(pair.down, np.float32).reshape(init[target].down.shape),
                                         up=np.asarray(pair.up, np.float32).reshape(init[target].up.shape),
                                         alpha=pair.alpha)
    log.info("LoRA starts from %s (%d of %d layers)", args.network_weights, len(start), len(init))
    return init


def wants_mindone_lora(args) -> bool:
    return args.backend == "ascend" or args.save_format == "mindspore"


def mindone_lora_ok(lora: lora_fmt.LoraSet, arch: ModelArch) -> bool:
    """Can MindONE's LoRA .ckpt hold these layers (attention projections only)?"""
    return set(lora) <= set(lora_fmt.lora_targets(arch, True, True, "attention"))


def run_training(args, backend) -> Dict[str, object]:
    arch = model_arch(args.model_config, args.pretrained_model_path).with_clip_skip(args.clip_skip)
    arch.check_image_size(args.image_size, "--image_size")
    check_output_dir(args.output_path, "--output_path")
    if args.with_prior_preservation and count_images(args.class_data_dir) < args.num_class_images:
        check_output_dir(args.class_data_dir, "--class_data_dir")      # class images will be written
    # Data-parallel processes exist from here on: whatever must happen once per run (folder set-up,
    # --overwrite, class images) is done by the main process between barriers; every process checks
    # first, so a refusal is the same one-line error everywhere rather than a hang at a barrier.
    group = backend.process_group(args)
    folder = RunFolder(args.output_path, args.logging_dir)
    folder.check(resume=args.resume is not None, overwrite=args.overwrite)
    tokenizer = tokenizer_for(arch.text, args.tokenizer_path)
    list_images(args.instance_data_dir, "instance")  # a bad folder fails before any model is loaded
    group.barrier()
    if group.is_main:
        folder.prepare(resume=args.resume is not None, overwrite=args.overwrite)
    group.barrier()
    weights = load_base_weights(args, arch)
    if args.with_prior_preservation:
        if group.is_main:
            ensure_class_images(backend, group, arch, weights, tokenizer, args)
        group.barrier()
    prior = args.with_prior_preservation
    dataset = DreamBoothDataset(args.instance_data_dir, args.instance_prompt,
                                tokenizer_for(arch.text, args.tokenizer_path, args.tokenizer_max_length),
                                args.image_size,
                                class_dir=args.class_data_dir if prior else None,
                                class_prompt=args.class_prompt if prior else None,
                                repeats=args.train_data_repeats, random_crop=args.random_crop,
                                flip=args.random_flip, seed=args.seed, workers=args.dataloader_num_workers,
                                interpolation=args.image_interpolation_mode)

    lora_init = initial_lora(args, arch) if args.use_lora else None
    if lora_init and wants_mindone_lora(args) and not mindone_lora_ok(lora_init, arch):
        log.warning("MindONE's LoRA .ckpt holds attention layers only: LoRA checkpoints get the diffusers "
                    "and kohya files, not %s", lora_fmt.MINDSPORE_WEIGHT_NAME)
    trainer = backend.Trainer(arch, weights, args, lora_init)
    del weights
    rank, world = trainer.rank, trainer.world_size
    main = rank == 0
    schedule = NoiseSchedule(arch.schedule)
    accum = args.gradient_accumulation_steps
    micro_per_epoch = dataset.steps_per_epoch(args.train_batch_size, world)
    if micro_per_epoch < accum:
        raise UserError(f"an epoch has {micro_per_epoch} batch(es) of {args.train_batch_size * world} images, "
                        f"fewer than --gradient_accumulation_steps {accum}: add images or repeats")
    steps_per_epoch = micro_per_epoch // accum
    used_per_epoch = steps_per_epoch * accum  # a partial accumulation group at an epoch's end is dropped
    total = args.max_train_steps or args.epochs * steps_per_epoch
    learning_rate = lr_schedule(args, total)
    encoded = EncodedInputs(trainer, args.cache_latents, args.pre_compute_text_embeddings)
    f = arch.vae.downsample_factor
    latent_shape = (arch.vae.embed_dim, args.image_size // f, args.image_size // f)

    step = micro = 0
    if args.resume is not None:
        step, micro = resume_state(folder, trainer, args.resume, start_if_none=args.resume_if_any)
        if main:
            log.info("resumed at step %d", step)
    if main:
        dump_args(args, os.path.join(args.output_path, "train_config.yaml"))
        log.info("training %s on %s: %d steps (%d per epoch), batch %d x %d process(es), accumulation %d",
                 "LoRA" if args.use_lora else "full model", trainer.device, total, steps_per_epoch,
                 args.train_batch_size, world, accum)
    bar = tqdm(total=total, initial=step, desc="train", disable=not main, dynamic_ncols=True)
    board = open_report(args) if main else None
    steps_log = StepLog(folder.loss_log if main else None, bar, args.callback_size, board)
    t0 = time.time()
    last_saved = step if args.resume is not None else -1
    try:       # the event file and the bar are closed however the loop ends (an error, Ctrl-C)
        while step < total:
            epoch, first = divmod(micro, used_per_epoch)
            for index, data in enumerate(dataset.batches(args.train_batch_size, epoch, rank=rank, world_size=world,
                                                         start_step=first), start=first):
                if index >= used_per_epoch:
                    break
                update = (micro + 1) % accum == 0
                randoms = step_inputs(schedule, args, micro, rank, world, args.train_batch_size, latent_shape,
                                      "class_images" in data)
                stats = trainer.train_step(make_batch(data, randoms, args.prior_loss_weight, encoded),
                                           learning_rate(step), update)
                micro += 1
                if not update:
                    continue
                step += 1
                bar.update(1)
                steps_log.add(step, epoch, stats, learning_rate(step - 1), time.time() - t0)
                end_of_epoch = index + 1 == used_per_epoch
                due = (step % args.ckpt_save_steps == 0) if args.ckpt_save_steps else \
                    (end_of_epoch and (epoch + 1) % args.ckpt_save_interval == 0)
                if due or step == total:
                    steps_log.flush()                # a NaN loss stops the run before it is saved
                    save_checkpoint(folder, trainer, arch, args, step, micro, main)
                    last_saved = step
                if main and args.validation_prompts and validation_due(args, step, total, epoch, end_of_epoch):
                    steps_log.flush()
                    validate(trainer, arch, tokenizer, args, folder, step, board)
                if step >= total:
                    break
        steps_log.flush()
    finally:
        bar.close()
        if board is not None:
            board.close()
    if last_saved != step:
        save_checkpoint(folder, trainer, arch, args, step, micro, main)
    latest = folder.checkpoints()[-1] if folder.checkpoints() else None
    if main:
        log.info("done: %d steps; latest checkpoint %s", step, latest)
    return {"steps": step, "checkpoint": latest, "output_path": args.output_path}


MIN_LOSS_SCALE = 1.0     # below this, a non-finite loss is not an fp16 overflow that scaling can fix


def check_loss(step: int, values: Dict[str, float]) -> None:
    """A non-finite loss under dynamic loss scaling is a transient overflow: the trainer skipped
    that update and lowered the scale (both backends, as torch's GradScaler does). It stops the run
    only once the scale it was computed with is down to MIN_LOSS_SCALE, or at once without scaling."""
    loss = values["loss"]
    if math.isfinite(loss):
        return
    scale = values.get("loss_scale")
    if scale is not None and scale > MIN_LOSS_SCALE:
        log.warning("step %d: loss %s at loss scale %g; update skipped, scale lowered", step, loss, scale)
        return
    where = f"at step {step}" + (f", loss scale {scale:g}" if scale is not None else "")
    raise UserError(f"loss became {loss} (NaN/inf) {where}; lower the learning rate or use "
                    f"--mixed_precision bf16/no. The last good checkpoint is kept.")


class StepLog:
    """Each update's statistics as the trainer returns them (device values), read in one go every
    `interval` steps and before anything is saved: one device synchronisation per logging interval
    instead of several per step. Reading checks the loss (`check_loss`), writes loss.csv rows
    (`path`, on the main process) and the TensorBoard scalars (`board`)."""

    def __init__(self, path: Optional[str], bar, interval: int, board=None):
        self.path, self.bar, self.interval, self.board = path, bar, max(1, int(interval)), board
        self.pending: List[tuple] = []

    def add(self, step: int, epoch: int, stats: Dict[str, object], lr: float, seconds: float) -> None:
        self.pending.append((step, epoch, stats, lr, seconds))
        if len(self.pending) >= self.interval:
            self.flush()

    def flush(self) -> None:
        for step, epoch, stats, lr, seconds in self.pending:
            values = {k: float(v) for k, v in stats.items()}
            check_loss(step, values)
            if self.path:
                log_loss(self.path, step, epoch, values, lr, seconds)
            if self.board is not None:
                self.board.scalars(step, {**{f"train/{k}": v for k, v in values.items()}, "train/lr": lr})
            self.bar.set_postfix(loss=f"{values['loss']:.4f}")
            log.debug("step %d loss %.5f", step, values["loss"])
        self.pending.clear()


def open_report(args):
    """diffusers' --report_to: TensorBoard event files in output_path/logging_dir, or nothing."""
    if args.report_to == "none":
        return None
    from common.training.tensorboard_log import TensorBoardLog
    return TensorBoardLog(os.path.join(args.output_path, args.logging_dir))


def log_loss(path: str, step: int, epoch: int, stats: Dict[str, float], lr: float, seconds: float) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "epoch", "loss", "instance_loss", "prior_loss", "lr", "seconds"])
        w.writerow([step, epoch, f"{stats['loss']:.6f}", f"{stats['instance_loss']:.6f}",
                    f"{stats['prior_loss']:.6f}", f"{lr:.3e}", f"{seconds:.1f}"])


def save_checkpoint(folder: RunFolder, trainer, arch: ModelArch, args, step: int, micro: int, main: bool) -> None:
    if not main:
        return
    if args.use_lora:
        path = os.path.join(folder.ckpt, f"lora-{step}")
        lora = trainer.export_lora()
        metadata = lora_fmt.kohya_metadata(arch, lora, args.lora_rank, args.lora_alpha, resolution=args.image_size,
                                           steps=step, clip_skip=args.clip_skip,
                                           num_images=count_images(args.instance_data_dir),
                                           ss_output_name=f"lora-{step}", ss_seed=args.seed,
                                           ss_learning_rate=args.start_learning_rate)
        save_lora_folder(lora, path, metadata=metadata,
                         mindspore_arch=arch if wants_mindone_lora(args) and mindone_lora_ok(lora, arch) else None)
    else:
        weights = trainer.export_weights()
        if args.skip_save_text_encoder:      # diffusers' flag: the untrained text encoder stays with the base model
            weights = {k: v for k, v in weights.items() if not k.startswith("cond_stage_model.")}
        if args.save_format == "mindspore":
            path = os.path.join(folder.ckpt, f"sd-{step}.ckpt")
            checkpoint_io.save_mindspore_ckpt(path, ldm_to_mindspore(weights, arch), overwrite=True)
        else:
            path = os.path.join(folder.ckpt, f"sd-{step}.{args.save_format}")
            checkpoint_io.save_state_dict(path, weights, overwrite=True)
    # weights, then this step's training state, then the commit record: killed at any instant,
    # the last commit still names a complete checkpoint + state pair
    state = f"{STATE_NAME}-{step}.pt"
    trainer.save_state(os.path.join(folder.ckpt, state))
    folder.commit(step, micro, os.path.basename(path), state)
    folder.prune(args.ckpt_max_keep)
    log.info("saved %s", path)


def resume_state(folder: RunFolder, trainer, resume: str, start_if_none: bool = False):
    """Restore weights, optimizer and counters from the run's last saved state (or from the
    train_state.json given). `start_if_none`: diffusers' --resume_from_checkpoint latest, which
    starts a new run when there is nothing to resume."""
    if resume != "latest":
        if not (os.path.isfile(resume) and resume.endswith(".json")):
            raise UserError(f"--resume takes 'latest' or a train_state.json file, got {resume}")
        folder.state_meta = resume
    meta = folder.committed()
    if meta is None and resume == "latest" and start_if_none:
        log.info("%s holds no saved training state: starting a new run", folder.root)
        return 0, 0
    if meta is None:
        if resume == "latest" and os.path.exists(folder.loss_log):
            log.warning("%s: the run was interrupted before its first complete save; starting from step 0",
                        folder.root)
            os.remove(folder.loss_log)
            return 0, 0
        raise UserError(f"nothing to resume in {folder.root}: no {STATE_NAME}.json in {folder.ckpt}")
    state = os.path.join(os.path.dirname(folder.state_meta), meta.get("state", LEGACY_STATE))
    if not os.path.exists(state):
        raise UserError(f"cannot resume: {state}, which {folder.state_meta} names, is missing")
    trainer.load_state(state)
    folder.truncate_loss_log(int(meta["step"]))
    return int(meta["step"]), int(meta["micro_step"])


def validation_due(args, step: int, total: int, epoch: int, end_of_epoch: bool) -> bool:
    """Every --validation_steps steps, or every --validation_epochs epochs; and at the last step."""
    if step == total:
        return True
    if args.validation_epochs:
        return end_of_epoch and (epoch + 1) % args.validation_epochs == 0
    return step % args.validation_steps == 0


def validate(trainer, arch: ModelArch, tokenizer, args, folder: RunFolder, step: int, board=None) -> Optional[str]:
    """--num_validation_images images per validation prompt, fixed seeds, saved as
    validation/step-N.png (a grid: a row per prompt) and, with --report_to tensorboard, logged."""
    sampler, eta = args.validation_scheduler or (args.sampler, 0.0)
    settings = SampleSettings(sampler=sampler, eta=eta, steps=args.sampling_steps, scale=args.scale,
                              height=args.image_size, width=args.image_size, seed=args.seed, progress=False)
    prompts = list(args.validation_prompts)
    with trainer.pipeline() as pipe:
        batches = text_to_image(pipe, arch, tokenizer, prompts, [""] * len(prompts), settings,
                                n_samples=args.num_validation_images)
        images = [image for batch in batches for image in batch]
    os.makedirs(folder.validation, exist_ok=True)
    path = os.path.join(folder.validation, f"step-{step}.png")
    grid = np.asarray(make_grid(images, rows=len(prompts)))
    save_png(grid, path)
    if board is not None:
        board.image(step, "validation", grid)
    return path
