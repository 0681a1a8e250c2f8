"""The MindSpore training step: vanilla, DreamBooth (prior preservation) and LoRA, compiled.

Like the PyTorch Trainer, this file is only arithmetic: every random number (posterior noise,
diffusion noise, offset noise, timesteps and their schedule coefficients, loss weights) arrives in
the batch from common.train_loop. Two compiled Cells do the work:

- `_GradStep`: VAE encode (frozen), noise, text encoder, UNet, weighted MSE, gradients of
  loss * loss_scale / accumulation added into per-parameter buffers;
- `_UpdateStep`: unscale, (data parallel) average across ranks, overflow check, global-norm
  clipping, AdamW with torch.optim.AdamW's arithmetic (bias correction, eps outside the sqrt,
  decoupled weight decay), EMA, and zeroed buffers. An overflowing step changes nothing.

Scalars that vary per step (learning rate, bias corrections, loss scale, EMA decay) are computed on
the host in float64, exactly as torch computes them, and enter the graphs as tensors, so nothing
recompiles. The loss scale follows torch's GradScaler / MindONE's DynamicLossScaleUpdateCell on the
host; fp16 loss scaling is used on Ascend only, fp32 runs unscaled.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from common import checkpoint_io
from common.arch import ModelArch
from common.errors import UserError
from common.lora import LoraSet
from common.mindspore_layout import mindspore_to_ldm
from .device import compute_dtype, setup
from .lora import export_lora, inject_lora, lora_layers, lora_parameters
from .models import build_models, load_original
from .pipeline import Pipeline

log = logging.getLogger("backends.ascend")
FP32 = ms.float32


class _LossCell(nn.Cell):
    """Loss of one micro-batch (instance half first, class half after), as the PyTorch Trainer
    computes it. `instance_w` / `prior_w` hold 1/n on the rows of each half (0 elsewhere), so one
    compiled graph serves every split. Returns (loss * sens, loss, instance, prior)."""

    def __init__(self, net, scale_factor: float, v_prediction: bool, text_trainable: bool):
        super().__init__(auto_prefix=False)        # keep MindONE's parameter names
        self.unet, self.vae, self.text_encoder = net.unet, net.vae, net.text_encoder
        self.scale_factor = scale_factor
        self.v_prediction = v_prediction
        self.text_trainable = text_trainable

    def construct(self, images, latent_noise, noise, coef_a, coef_b, timesteps, ids, loss_weights,
                  instance_w, prior_w, prior_loss_weight, sens):
        mean, logvar = self.vae.encode(images)
        z = ops.stop_gradient((mean + ops.exp(0.5 * logvar) * latent_noise) * self.scale_factor)
        a = coef_a.reshape(-1, 1, 1, 1)
        b = coef_b.reshape(-1, 1, 1, 1)
        noisy = a * z + b * noise
        target = a * noise - b * z if self.v_prediction else noise
        context = self.text_encoder(ids)
        if not self.text_trainable:
            context = ops.stop_gradient(context)
        pred = self.unet(noisy, timesteps, context)
        per_sample = ops.square(pred - target).mean((1, 2, 3)) * loss_weights
        instance = (per_sample * instance_w).sum()
        prior = (per_sample * prior_w).sum()
        loss = instance + prior_loss_weight * prior
        return loss * sens, loss, instance, prior


class _GradStep(nn.Cell):
    """Forward and backward of one micro-batch; gradients are added into `accum`."""

    def __init__(self, loss_cell: _LossCell, params: List[Parameter]):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.params = ParameterTuple(params)
        self.accum = self.params.clone(prefix="accum", init="zeros")
        self.grad_fn = ms.value_and_grad(self.loss_cell, None, self.params, has_aux=True)

    def construct(self, images, latent_noise, noise, coef_a, coef_b, timesteps, ids, loss_weights,
                  instance_w, prior_w, prior_loss_weight, sens):
        (_, loss, instance, prior), grads = self.grad_fn(
            images, latent_noise, noise, coef_a, coef_b, timesteps, ids, loss_weights, instance_w,
            prior_w, prior_loss_weight, sens)
        done = True
        for acc, g in zip(self.accum, grads):
            done = ops.depend(done, ops.assign_add(acc, g))
        return ops.depend(loss, done), instance, prior


class _UpdateStep(nn.Cell):
    """The optimizer step on the accumulated gradients (torch.optim.AdamW arithmetic, applied
    only when every gradient is finite), EMA, and zeroed buffers. Returns (finite, grad_norm)."""

    def __init__(self, params: ParameterTuple, accum: ParameterTuple, clip: bool,
                 check_overflow: bool, use_ema: bool, world_size: int):
        super().__init__(auto_prefix=False)
        self.params, self.accum = params, accum
        self.exp_avg = params.clone(prefix="adam_m", init="zeros")
        self.exp_avg_sq = params.clone(prefix="adam_v", init="zeros")
        self.use_ema = use_ema
        self.ema = params.clone(prefix="ema") if use_ema else None
        self.clip = clip
        self.check_overflow = check_overflow
        self.reducer = (nn.DistributedGradReducer(params, mean=True, degree=world_size)
                        if world_size > 1 else None)

    def construct(self, decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, inv_scale,
                  max_norm, ema_decay, ema_w):
        grads = ()
        for acc in self.accum:
            grads += (acc * inv_scale,)
        if self.reducer is not None:
            grads = self.reducer(grads)
        sq = ()
        for g in grads:
            sq += (ops.square(g).sum(),)
        norm = ops.sqrt(ops.stack(sq).sum())
        finite = ops.isfinite(norm) if self.check_overflow else ops.ones((), ms.bool_)
        if self.clip:   # torch.nn.utils.clip_grad_norm_
            coef = ops.minimum(max_norm / (norm + 1e-6), 1.0)
            clipped = ()
            for g in grads:
                clipped += (g * coef,)
            grads = clipped
        done = True
        for i in range(len(grads)):
            p, m, v, g = self.params[i], self.exp_avg[i], self.exp_avg_sq[i], grads[i]
            new_p = p * decay_factor                   # decoupled weight decay
            new_m = m + beta1_w * (g - m)              # exp_avg.lerp_(grad, 1 - beta1)
            new_v = v * beta2 + beta2_w * g * g        # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
            denom = ops.sqrt(new_v) / bc2_sqrt + eps
            new_p = new_p - step_size * new_m / denom
            done = ops.depend(done, ops.assign(m, ops.select(finite, new_m, m)))
            done = ops.depend(done, ops.assign(v, ops.select(finite, new_v, v)))
            if self.use_ema:
                e = self.ema[i]
                done = ops.depend(done, ops.assign(e, ops.select(finite, e * ema_decay + new_p * ema_w, e)))
            done = ops.depend(done, ops.assign(p, ops.select(finite, new_p, p)))
            done = ops.depend(done, ops.assign(self.accum[i], ops.zeros_like(g)))
        return ops.depend(finite, done), norm


def _tensor(x) -> Tensor:
    return Tensor(np.asarray(x, np.float32))


class Trainer:
    """The backend Trainer (see backends/__init__.py): `train_step`, `compute_loss`,
    `export_weights`, `export_lora`, `save_state` / `load_state`, `pipeline`, `rank`,
    `world_size`, `device`."""

    def __init__(self, arch: ModelArch, weights: Dict[str, np.ndarray], args, lora_init: Optional[LoraSet] = None):
        self.arch = arch
        self.args = args
        self.device = setup(args.mode)
        self.rank, self.world_size = _init_parallel(args.use_parallel)
        self.dtype = compute_dtype(args.mixed_precision, self.device)
        self.base_weights = weights           # untouched tensors (VAE, extras) for export_weights
        self.train_text = bool(args.train_text_encoder) and not args.use_lora

        net = build_models(arch, self.dtype)
        load_original(net, weights, arch)
        for p in net.get_parameters():
            p.requires_grad = False
        if args.use_lora:
            # before any wrapper Cell exists: injection changes the network's structure
            lora_dtype = None if args.lora_fp16 else FP32
            inject_lora(arch, net.unet, net.text_encoder, lora_init, dtype=lora_dtype)
            params = lora_parameters(net.unet, net.text_encoder)
        else:
            params = list(net.unet.get_parameters())
            if self.train_text:
                params += list(net.text_encoder.get_parameters())
        for p in params:
            p.requires_grad = True
        self.text_trainable = any(p.name.startswith("cond_stage_model.") for p in params)
        if args.gradient_checkpointing:
            for block in list(net.unet.input_blocks) + [net.unet.middle_block] + list(net.unet.output_blocks):
                block.recompute()
        net.set_train(True)
        self.net = net

        self.loss_scaling = self.dtype == ms.float16
        self.loss_scale = float(args.init_loss_scale) if self.loss_scaling else 1.0
        self.growth_tracker = 0
        self.optimizer_step = 0
        self.ema_updates = 0
        loss_cell = _LossCell(net, arch.scale_factor, arch.schedule.parameterization == "v", self.text_trainable)
        self.loss_cell = loss_cell
        self.grad_step = _GradStep(loss_cell, params)
        self.update_step = _UpdateStep(self.grad_step.params, self.grad_step.accum, bool(args.clip_grad),
                                       self.loss_scaling, bool(args.use_ema), self.world_size)
        self.params = self.grad_step.params

    # ------------------------------------------------------------------ the step
    def _inputs(self, batch: Dict[str, np.ndarray], sens: float) -> tuple:
        n = len(batch["images"])
        n_inst = int(batch["n_instance"])
        instance_w = np.zeros(n, np.float32)
        instance_w[:n_inst] = 1.0 / n_inst
        prior_w = np.zeros(n, np.float32)
        if n > n_inst:
            prior_w[n_inst:] = 1.0 / (n - n_inst)
        f32 = lambda k: _tensor(batch[k])          # noqa: E731
        return (f32("images"), f32("latent_noise"), f32("noise"), f32("coef_a"), f32("coef_b"),
                Tensor(np.asarray(batch["timesteps"], np.int32)), Tensor(np.asarray(batch["ids"], np.int32)),
                f32("loss_weights"), _tensor(instance_w), _tensor(prior_w),
                _tensor(batch["prior_loss_weight"]), _tensor(sens))

    def compute_loss(self, batch: Dict[str, np.ndarray]):
        """(loss, instance, prior) of one micro-batch, as MindSpore scalar tensors (no update)."""
        _, loss, instance, prior = self.loss_cell(*self._inputs(batch, 1.0))
        return loss, instance, prior

    def train_step(self, batch: Dict[str, np.ndarray], lr: float, update: bool) -> Dict[str, float]:
        """Forward and backward of one micro-batch; with `update`, the optimizer step too."""
        accum = self.args.gradient_accumulation_steps
        loss, instance, prior = self.grad_step(*self._inputs(batch, self.loss_scale / accum))
        loss = float(loss.asnumpy())
        if not math.isfinite(loss):
            raise UserError(f"loss became {loss} (NaN/inf); lower the learning rate or use "
                            f"--mixed_precision no. The last good checkpoint is kept.")
        stats = {"loss": loss, "instance_loss": float(instance.asnumpy()), "prior_loss": float(prior.asnumpy())}
        if update:
            stats.update(self._update(lr))
        return stats

    def _update(self, lr: float) -> Dict[str, float]:
        a = self.args
        beta1, beta2 = (float(b) for b in a.betas)
        step = self.optimizer_step + 1
        wd = a.weight_decay if a.optim == "adamw" else 0.0
        ema_decay = a.ema_decay * (1 - np.exp(-(self.ema_updates + 1) / 2000))
        # the scalars of torch's _single_tensor_adamw, in float64 like torch's python floats
        coefs = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step),
                 math.sqrt(1 - beta2 ** step), a.adam_epsilon, 1.0 / self.loss_scale, a.max_grad_norm,
                 ema_decay, 1 - ema_decay)
        finite, norm = self.update_step(*(_tensor(c) for c in coefs))
        applied = bool(finite.asnumpy())
        stats: Dict[str, float] = {}
        if a.clip_grad:
            stats["grad_norm"] = float(norm.asnumpy())
        if applied:
            self.optimizer_step += 1
            if a.use_ema:
                self.ema_updates += 1
        if self.loss_scaling:      # torch.amp.GradScaler.update / MindONE DynamicLossScaleUpdateCell
            if applied:
                self.growth_tracker += 1
                if self.growth_tracker == a.scale_window:
                    self.loss_scale *= a.loss_scale_factor
                    self.growth_tracker = 0
            else:
                self.loss_scale /= a.loss_scale_factor
                self.growth_tracker = 0
            stats["skipped"] = float(not applied)
            stats["loss_scale"] = self.loss_scale
        return stats

    def gradients(self) -> Dict[str, np.ndarray]:
        """The gradients accumulated since the last update (scaled by loss_scale / accumulation),
        by parameter name: what an update would apply, for tests and debugging."""
        return {p.name: acc.asnumpy().copy() for p, acc in zip(self.params, self.grad_step.accum)}

    # ------------------------------------------------------------------ outputs
    @contextlib.contextmanager
    def _swapped(self, use_ema: bool = True):
        """Temporarily put the EMA weights (when kept) into the trainable parameters."""
        if not (use_ema and self.args.use_ema):
            yield
            return
        saved = [p.asnumpy().copy() for p in self.params]
        for p, e in zip(self.params, self.update_step.ema):
            p.set_data(Tensor(e.asnumpy().copy()))
        try:
            yield
        finally:
            for p, x in zip(self.params, saved):
                p.set_data(Tensor(x))

    def export_weights(self) -> Dict[str, np.ndarray]:
        """The full model in the original single-file layout (EMA weights when --use_ema; LoRA
        adapters folded into their base weights)."""
        roots = [self.net.unet] + ([self.net.text_encoder] if self.text_trainable else [])
        with self._swapped():
            ms_sd = {}
            for root in roots:
                ms_sd.update(_folded_state(root))
        out = dict(self.base_weights)
        out.update(mindspore_to_ldm(ms_sd, self.arch))
        return out

    def export_lora(self) -> LoraSet:
        with self._swapped():
            return export_lora(self.net.unet, self.net.text_encoder)

    def _state_arrays(self) -> Dict[str, np.ndarray]:
        out = {}
        groups = [("trainable", self.params), ("exp_avg", self.update_step.exp_avg),
                  ("exp_avg_sq", self.update_step.exp_avg_sq)]
        if self.args.use_ema:
            groups.append(("ema", self.update_step.ema))
        for group, tensors in groups:
            for p, t in zip(self.params, tensors):
                out[f"{group}/{p.name}"] = t.asnumpy()
        out["optimizer_step"] = np.asarray(self.optimizer_step, np.int64)
        out["ema_updates"] = np.asarray(self.ema_updates, np.int64)
        out["loss_scale"] = np.asarray(self.loss_scale, np.float64)
        out["growth_tracker"] = np.asarray(self.growth_tracker, np.int64)
        return out

    def save_state(self, path: str) -> None:
        """Trainable weights, AdamW moments, EMA, loss scale and step counters as one MindSpore
        checkpoint (written atomically), for an exact resume. Saved between updates, when the
        gradient buffers are empty."""
        checkpoint_io.save_state_dict(path, self._state_arrays(), overwrite=True, format="mindspore")

    def load_state(self, path: str) -> None:
        try:
            state = checkpoint_io.load_state_dict(path)
        except UserError as e:
            raise UserError(f"cannot read training state {path}: {e}") from None
        expected = self._state_arrays()
        if set(state) != set(expected):
            raise UserError(f"training state {path} belongs to a different backend, training mode or model")
        groups = {"trainable": self.params, "exp_avg": self.update_step.exp_avg,
                  "exp_avg_sq": self.update_step.exp_avg_sq}
        if self.args.use_ema:
            groups["ema"] = self.update_step.ema
        for group, tensors in groups.items():
            for p, t in zip(self.params, tensors):
                t.set_data(Tensor(np.ascontiguousarray(state[f"{group}/{p.name}"], np.float32)))
        for acc in self.grad_step.accum:
            acc.set_data(ops.zeros_like(acc))
        self.optimizer_step = int(state["optimizer_step"])
        self.ema_updates = int(state["ema_updates"])
        self.loss_scale = float(state["loss_scale"])
        self.growth_tracker = int(state["growth_tracker"])

    @contextlib.contextmanager
    def pipeline(self):
        """Inference with the networks being trained (validation images)."""
        pipe = Pipeline(self.arch, mode=self.args.mode, net=self.net)
        try:
            yield pipe
        finally:
            self.net.set_train(True)


def _folded_state(root: nn.Cell) -> Dict[str, np.ndarray]:
    """A component's parameters under MindONE's names, with injected LoRA adapters folded into
    their base weights (`<layer>.linear.weight` -> `<layer>.weight`)."""
    layers = {layer.linear.weight.name: layer for layer in lora_layers(root).values()}
    bases = {p.name for layer in lora_layers(root).values() for p in layer.linear.get_parameters()}
    adapters = {p.name for p in lora_parameters(root)}
    out = {}
    for p in root.get_parameters():
        if p.name in adapters:
            continue
        value = p.asnumpy().astype(np.float32)
        name = p.name
        if name in bases:
            name = name.replace(".linear.", ".")
            if p.name in layers:
                value = value + layers[p.name].delta()
        out[name] = value
    return out


def _init_parallel(use_parallel: bool):
    """(rank, world size); with use_parallel, MindSpore's data-parallel setup as MindONE does it
    (started by msrun): communication init, DATA_PARALLEL with gradients averaged."""
    if not use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    try:
        init()
    except Exception as e:    # not started by msrun, or no collective backend for this device
        raise UserError(f"--use_parallel True: MindSpore could not start communication ({e.__class__.__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); launch with msrun") from None
    world = get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world)
    return get_rank(), world
