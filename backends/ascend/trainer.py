"""The MindSpore training step: vanilla, DreamBooth (prior preservation) and LoRA, compiled.

Like the PyTorch Trainer, this file is only arithmetic: every random number (posterior noise,
diffusion noise, offset noise, timesteps and their schedule coefficients, loss weights) arrives in
the batch from common.training.train_loop. Two compiled Cells (GRAPH_MODE, or PYNATIVE_MODE with --mode 1)
do the work:

- `_GradStep`: VAE encode (frozen), noise, text encoder, UNet, weighted MSE; the gradients of
  loss * loss_scale / accumulation_steps are added into per-parameter buffers;
- `_UpdateStep`: (data parallel) mean across ranks, overflow check, unscaling, global-norm
  clipping, torch.optim.AdamW's step (bias correction, eps outside the sqrt, decoupled weight
  decay) through MindSpore's fused AdamWeightDecay kernel, EMA, emptied buffers. An overflowing
  step changes nothing.

Scalars that vary per step (learning rate, bias corrections, loss scale, EMA decay) are computed on
the host in float64, as torch computes them, and enter the graphs as tensors, so nothing
recompiles. The dynamic loss scale (torch's GradScaler = MindONE's DynamicLossScaleUpdateCell)
lives on the host too; it is used with fp16 on Ascend, while fp32 (CPU) runs unscaled.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.amp import all_finite

from common.formats import checkpoint_io
from common.arch import ModelArch
from common.formats.checkpoint_io import BF16, cast_array
from common.errors import UserError
from common.formats.lora import LoraSet
from common.formats.mindspore_layout import ldm_to_mindspore, mindspore_to_ldm
from common.tokenizer import attention_mask
from .device import compute_dtype, process_group, setup
from .lora import base_names, export_lora, inject_lora, lora_parameters, reset_lora
from .models import build_models, load_original
from .pipeline import Pipeline

FP32 = ms.float32


class _LossCell(nn.Cell):
    """Loss of one micro-batch (instance half first, class half after), as the PyTorch Trainer
    computes it. `instance_w` / `prior_w` hold 1/n on the rows of each half (0 elsewhere), so one
    compiled graph serves every split. Returns (loss * sens, loss, instance, prior).

    With `cached_latents` the first two inputs are the VAE posterior's mean and std (--cache_latents)
    instead of images and a placeholder; with `cached_context`, `ids` is the text encoder's output
    (--pre_compute_text_embeddings). Each is fixed when the graph compiles."""

    def __init__(self, net, scale_factor: float, v_prediction: bool, text_trainable: bool,
                 cached_latents: bool = False, cached_context: bool = False, text_mask: bool = False):
        super().__init__(auto_prefix=False)        # keep MindONE's parameter names
        self.unet, self.vae, self.text_encoder = net.unet, net.vae, net.text_encoder
        self.scale_factor = scale_factor
        self.v_prediction = v_prediction
        self.text_trainable = text_trainable
        self.cached_latents, self.cached_context, self.text_mask = cached_latents, cached_context, text_mask

    def construct(self, images, latent_std, latent_noise, noise, coef_a, coef_b, timesteps, ids, mask,
                  loss_weights, instance_w, prior_w, prior_loss_weight, sens):
        if self.cached_latents:
            mean, std = images, latent_std
        else:
            mean, logvar = self.vae.encode(images)
            std = ops.exp(0.5 * logvar)
        z = ops.stop_gradient((mean + std * latent_noise) * self.scale_factor)
        a = coef_a.reshape(-1, 1, 1, 1)
        b = coef_b.reshape(-1, 1, 1, 1)
        noisy = a * z + b * noise
        target = a * noise - b * z if self.v_prediction else noise
        if self.cached_context:
            context = ids
        elif self.text_mask:
            context = self.text_encoder(ids, mask)
        else:
            context = self.text_encoder(ids)
        if not self.text_trainable:
            context = ops.stop_gradient(context)
        pred = self.unet(noisy, timesteps, context)
        per_sample = ops.square(pred - target).mean((1, 2, 3)) * loss_weights
        instance = (per_sample * instance_w).sum()
        prior = (per_sample * prior_w).sum()
        loss = instance + prior_loss_weight * prior
        return loss * sens, loss, instance, prior


# per-parameter functions for ops.HyperMap
_square_sum = ops.MultitypeFuncGraph("square_sum")
_adamw = ops.MultitypeFuncGraph("adamw")
_ema = ops.MultitypeFuncGraph("ema")
_zero = ops.MultitypeFuncGraph("zero")


@_square_sum.register("Tensor")
def _square_sum_tensor(g):
    return ops.square(g).sum()


@_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor")
def _adamw_tensor(kernel, lr, beta1, beta2, eps, decay, grad_scale, p, m, v, acc):
    """MindSpore's fused AdamWeightDecay kernel (m, v, then p -= lr * (m / (sqrt(v) + eps) + decay * p))
    on the unscaled, clipped gradient acc * grad_scale. Returns p, read after the update."""
    return ops.depend(p, kernel(p, m, v, lr, beta1, beta2, eps, decay, acc * grad_scale))


@_ema.register("Tensor", "Tensor", "Tensor", "Tensor")
def _ema_tensor(decay, weight, ema, p):
    """ema.mul_(decay).add_(p, alpha=1 - decay)."""
    return ops.assign(ema, ema * decay + p * weight)


@_zero.register("Tensor")
def _zero_tensor(acc):
    return ops.assign(acc, ops.zeros_like(acc))


class _GradStep(nn.Cell):
    """Forward and backward of one micro-batch; gradients are added into `accum`."""

    def __init__(self, loss_cell: _LossCell, params: List[Parameter]):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.params = ParameterTuple(params)
        self.accum = self.params.clone(prefix="accum", init="zeros")
        self.grad_fn = ms.value_and_grad(self.loss_cell, None, self.params, has_aux=True)
        self.hyper_map = ops.HyperMap()

    def construct(self, images, latent_std, latent_noise, noise, coef_a, coef_b, timesteps, ids, mask,
                  loss_weights, instance_w, prior_w, prior_loss_weight, sens):
        (_, loss, instance, prior), grads = self.grad_fn(
            images, latent_std, latent_noise, noise, coef_a, coef_b, timesteps, ids, mask, loss_weights,
            instance_w, prior_w, prior_loss_weight, sens)
        done = self.hyper_map(ops.assign_add, self.accum, grads)
        return ops.depend(loss, done), instance, prior


class _UpdateStep(nn.Cell):
    """The optimizer step on the accumulated gradients, skipped when they overflowed; EMA; emptied
    buffers. Returns (finite, global gradient norm (0 unless clipping)).

    torch.optim.AdamW's step, p <- p * (1 - lr * wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),
    is MindSpore's fused AdamWeightDecay kernel with lr' = lr * sqrt(bc2) / bc1,
    eps' = eps * sqrt(bc2) and decay' = lr * wd / lr' (one kernel per tensor compiles fast)."""

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
        self.flag_sum = ops.AllReduce() if world_size > 1 else None
        self.world_size = world_size
        self.kernel = ops.AdamWeightDecay()
        self.hyper_map = ops.HyperMap()

    def construct(self, lr, beta1, beta2, eps, decay, inv_scale, max_norm, ema_decay, ema_w):
        grads = self.accum
        if self.reducer is not None:
            grads = self.reducer(grads)                       # mean over ranks
        grad_scale = inv_scale
        norm = ops.zeros((), FP32)
        if self.clip:   # torch.nn.utils.clip_grad_norm_ on the unscaled gradients (scales are powers of 2)
            norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads))) * inv_scale
            grad_scale = inv_scale * ops.minimum(max_norm / (norm + 1e-6), 1.0)
        step = ops.partial(_adamw, self.kernel, lr, beta1, beta2, eps, decay, grad_scale)
        if self.check_overflow:
            finite = all_finite(grads)      # also reads Ascend's overflow status in saturation mode
            if self.flag_sum is not None:   # that status is per device: every rank must skip together
                finite = self.flag_sum(finite.astype(FP32)) > self.world_size - 0.5
            if finite:
                norm = ops.depend(norm, self._apply(step, grads, ema_decay, ema_w))
        else:
            finite = ops.ones((), ms.bool_)
            norm = ops.depend(norm, self._apply(step, grads, ema_decay, ema_w))
        norm = ops.depend(norm, self.hyper_map(_zero, self.accum))      # empty the buffers
        return finite, norm

    def _apply(self, step, grads, ema_decay, ema_w):
        new_params = self.hyper_map(step, self.params, self.exp_avg, self.exp_avg_sq, grads)
        if self.use_ema:
            return self.hyper_map(ops.partial(_ema, ema_decay, ema_w), self.ema, new_params)
        return new_params


def _tensor(x) -> Tensor:
    return Tensor(np.asarray(x, np.float32))


class Trainer:
    """The backend Trainer (see backends/__init__.py): `train_step`, `compute_loss`,
    `export_weights`, `export_lora`, `save_state` / `load_state`, `pipeline`, `rank`,
    `world_size`, `device`; `restart` begins a new run without recompiling."""

    def __init__(self, arch: ModelArch, weights: Dict[str, np.ndarray], args, lora_init: Optional[LoraSet] = None):
        if args.use_8bit_adam:
            raise UserError("--use_8bit_adam: bitsandbytes is CUDA/PyTorch-only and MindSpore has no 8-bit "
                            "optimizer; on the ascend backend save optimizer memory with --use_lora True (Adam "
                            "state for the adapters only)")
        self.arch = arch
        self.args = args
        self.device = setup(args.mode)
        group = process_group(args)
        self.rank, self.world_size = group.rank, group.world_size
        self.dtype = compute_dtype(args.mixed_precision, self.device)
        self.base_weights = _without_unet(weights)    # untouched tensors (VAE, text, extras) for export_weights
        self.train_text = bool(args.train_text_encoder) and not args.use_lora
        self.compiled_for = setup_key(args, lora_init)

        net = build_models(arch, self.dtype)
        load_original(net, weights, arch)
        for p in net.get_parameters():
            p.requires_grad = False
        if args.use_lora:
            # before any wrapper Cell exists: injection changes the network's structure
            inject_lora(arch, net.unet, net.text_encoder, lora_init, dtype=None if args.lora_fp16 else FP32,
                        dropout=args.lora_dropout)
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
        self.loss_cell = _LossCell(net, arch.scale_factor, arch.schedule.parameterization == "v", self.text_trainable,
                                   cached_latents=bool(args.cache_latents),
                                   cached_context=bool(args.pre_compute_text_embeddings),
                                   text_mask=bool(args.text_encoder_use_attention_mask))
        self.grad_step = _GradStep(self.loss_cell, params)
        self.params = self.grad_step.params
        self.update_step = self._update_cell()
        self.clear_overflow = _overflow_clearer() if self.loss_scaling and self.device == "Ascend" else None
        self._reset_counters()

    def _update_cell(self) -> _UpdateStep:
        return _UpdateStep(self.params, self.grad_step.accum, bool(self.args.clip_grad), self.loss_scaling,
                           bool(self.args.use_ema), self.world_size)

    def _reset_counters(self) -> None:
        self.loss_scale = float(self.args.init_loss_scale) if self.loss_scaling else 1.0
        self.growth_tracker = 0
        self.optimizer_step = 0
        self.ema_updates = 0
        self.micro_in_group = 0

    def restart(self, weights: Dict[str, np.ndarray], args, lora_init: Optional[LoraSet] = None) -> None:
        """Begin a new run on the networks compiled already (compiling takes tens of seconds on a
        CPU, minutes for full size on Ascend): load `weights` and the LoRA's initial values, empty
        the optimizer state, EMA, counters and loss scale. Trainable parts, LoRA layout, precision,
        mode and parallel set-up must be the ones this Trainer was built with; clipping and EMA may
        differ (the small update graph is rebuilt)."""
        if setup_key(args, lora_init) != self.compiled_for:
            raise ValueError("Trainer.restart needs the trainable parts, LoRA layout, precision and mode "
                             "the Trainer was built with; build a new Trainer instead")
        rebuild = (bool(args.clip_grad), bool(args.use_ema)) != (bool(self.args.clip_grad), bool(self.args.use_ema))
        self.args, self.base_weights = args, _without_unet(weights)
        _load_weights(self.net, ldm_to_mindspore(weights, self.arch))
        if lora_init:
            reset_lora(lora_init, self.net.unet, self.net.text_encoder)
        for buffers in (self.grad_step.accum, self.update_step.exp_avg, self.update_step.exp_avg_sq):
            for b in buffers:
                b.set_data(Tensor(np.zeros(b.shape, np.float32)))
        if rebuild:
            self.update_step = self._update_cell()
        elif self.args.use_ema:
            for e, p in zip(self.update_step.ema, self.params):
                e.set_data(Tensor(p.asnumpy().copy()))
        self._reset_counters()

    # ------------------------------------------------------------------ the step
    def _inputs(self, batch: Dict[str, np.ndarray], sens: float) -> tuple:
        n = len(batch["timesteps"])
        n_inst = int(batch["n_instance"])
        instance_w = np.zeros(n, np.float32)
        instance_w[:n_inst] = 1.0 / n_inst
        prior_w = np.zeros(n, np.float32)
        if n > n_inst:
            prior_w[n_inst:] = 1.0 / (n - n_inst)
        if "latent_mean" in batch:         # --cache_latents
            pixels = [_tensor(batch["latent_mean"]), _tensor(batch["latent_std"])]
        else:
            pixels = [_tensor(batch["images"]), _tensor(np.zeros(1, np.float32))]
        floats = pixels + [_tensor(batch[k]) for k in ("latent_noise", "noise", "coef_a", "coef_b")]
        if "context" in batch:             # --pre_compute_text_embeddings
            text, mask = _tensor(batch["context"]), _tensor(np.zeros(1, np.float32))
        else:
            text = Tensor(np.asarray(batch["ids"], np.int32))
            mask = _tensor(attention_mask(batch["ids"]) if self.args.text_encoder_use_attention_mask else np.zeros(1))
        return (*floats, Tensor(np.asarray(batch["timesteps"], np.int32)), text, mask, _tensor(batch["loss_weights"]),
                _tensor(instance_w), _tensor(prior_w), _tensor(batch["prior_loss_weight"]), _tensor(sens))

    def encode_latents(self, images: np.ndarray):
        """The frozen VAE's posterior (mean, std) of `images`, float32 numpy (--cache_latents)."""
        mean, logvar = self.net.vae.encode(_tensor(images))
        return mean.asnumpy(), np.exp(np.float32(0.5) * logvar.asnumpy())

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """The frozen text encoder's output for `ids`, float32 numpy (--pre_compute_text_embeddings)."""
        ids_t = Tensor(np.asarray(ids, np.int32))
        if self.args.text_encoder_use_attention_mask:
            return self.net.text_encoder(ids_t, _tensor(attention_mask(ids))).asnumpy().astype(np.float32)
        return self.net.text_encoder(ids_t).asnumpy().astype(np.float32)

    def compute_loss(self, batch: Dict[str, np.ndarray]):
        """(loss, instance, prior) of one micro-batch, as MindSpore scalar tensors (no update)."""
        _, loss, instance, prior = self.loss_cell(*self._inputs(batch, 1.0))
        return loss, instance, prior

    def train_step(self, batch: Dict[str, np.ndarray], lr: float, update: bool) -> Dict[str, float]:
        """Forward and backward of one micro-batch; with `update`, the optimizer step too."""
        accum = self.args.gradient_accumulation_steps
        if self.clear_overflow is not None and self.micro_in_group == 0:
            self.clear_overflow()     # this accumulation group's overflow status starts clean
        self.micro_in_group = 0 if update else self.micro_in_group + 1
        loss, instance, prior = self.grad_step(*self._inputs(batch, self.loss_scale / accum))
        # device values: the train loop reads them once per logging interval (and checks the loss)
        stats = {"loss": loss, "instance_loss": instance, "prior_loss": prior}
        if update:
            stats.update(self._update(lr))
        return stats

    def _update(self, lr: float) -> Dict[str, float]:
        a = self.args
        beta1, beta2 = (float(b) for b in a.betas)
        step = self.optimizer_step + 1
        wd = a.weight_decay if a.optim == "adamw" else 0.0
        # torch's bias corrections in float64 (python floats), folded into the fused kernel's inputs
        bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
        fused_lr = lr * bc2_sqrt / bc1
        decay = lr * wd / fused_lr if fused_lr else 0.0
        ema_decay = a.ema_decay * (1 - np.exp(-(self.ema_updates + 1) / 2000))
        coefs = (fused_lr, beta1, beta2, a.adam_epsilon * bc2_sqrt, decay, 1.0 / self.loss_scale,
                 a.max_grad_norm, ema_decay, 1 - ema_decay)
        finite, norm = self.update_step(*(_tensor(c) for c in coefs))
        # only loss scaling can skip an update; reading its verdict is then the one sync per update
        # (the host keeps the scale and the step count, as torch's GradScaler does)
        applied = bool(finite.asnumpy()) if self.loss_scaling else True
        stats: Dict[str, object] = {}
        if a.clip_grad:
            stats["grad_norm"] = norm
        if applied:
            self.optimizer_step += 1
            if a.use_ema:
                self.ema_updates += 1
        if self.loss_scaling:      # torch.amp.GradScaler.update / MindONE's DynamicLossScaleUpdateCell
            stats["skipped"] = float(not applied)
            stats["loss_scale"] = self.loss_scale        # the scale this step's loss was computed with
            if applied:
                self.growth_tracker += 1
                if self.growth_tracker == a.scale_window:
                    self.loss_scale *= a.loss_scale_factor
                    self.growth_tracker = 0
            else:
                self.loss_scale /= a.loss_scale_factor
                self.growth_tracker = 0
        return stats

    def gradients(self) -> Dict[str, np.ndarray]:
        """The gradients accumulated since the last update (times loss_scale / accumulation steps)
        by parameter name: what the next update would apply, for tests and debugging."""
        return {p.name: acc.asnumpy().copy() for p, acc in zip(self.params, self.grad_step.accum)}

    # ------------------------------------------------------------------ outputs
    @contextlib.contextmanager
    def _swapped(self):
        """Temporarily put the EMA weights (when kept) into the trainable parameters."""
        if not self.args.use_ema:
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
        """The trained adapters (EMA values when --use_ema)."""
        with self._swapped():
            return export_lora(self.net.unet, self.net.text_encoder)

    def _state_groups(self) -> Dict[str, ParameterTuple]:
        groups = {"trainable": self.params, "exp_avg": self.update_step.exp_avg,
                  "exp_avg_sq": self.update_step.exp_avg_sq}
        if self.args.use_ema:
            groups["ema"] = self.update_step.ema
        return groups

    def _state_keys(self) -> set:
        return ({f"{group}/{p.name}" for group in self._state_groups() for p in self.params}
                | {"optimizer_step", "ema_updates", "loss_scale", "growth_tracker"})

    def _state_arrays(self) -> Dict[str, np.ndarray]:
        out = {f"{group}/{p.name}": t.asnumpy() for group, tensors in self._state_groups().items()
               for p, t in zip(self.params, tensors)}
        out.update(optimizer_step=np.asarray(self.optimizer_step, np.int64),
                   ema_updates=np.asarray(self.ema_updates, np.int64),
                   loss_scale=np.asarray(self.loss_scale, np.float64),
                   growth_tracker=np.asarray(self.growth_tracker, np.int64))
        return out

    def save_state(self, path: str) -> None:
        """Trainable weights, AdamW moments, EMA, loss scale and step counters as one MindSpore
        checkpoint (written atomically), for an exact resume. The train loop saves between
        updates, when the gradient buffers are empty."""
        checkpoint_io.save_state_dict(path, self._state_arrays(), overwrite=True, format="mindspore")

    def load_state(self, path: str) -> None:
        try:
            state = checkpoint_io.load_state_dict(path)
        except UserError as e:
            raise UserError(f"cannot read training state {path}: {e}") from None
        if set(state) != self._state_keys():
            raise UserError(f"training state {path} belongs to another backend, training mode or model")
        for group, tensors in self._state_groups().items():
            for p, t in zip(self.params, tensors):
                t.set_data(Tensor(np.ascontiguousarray(state[f"{group}/{p.name}"], np.float32)))
        for acc in self.grad_step.accum:
            acc.set_data(Tensor(np.zeros(acc.shape, np.float32)))
        self.optimizer_step = int(state["optimizer_step"])
        self.ema_updates = int(state["ema_updates"])
        self.loss_scale = float(state["loss_scale"])
        self.growth_tracker = int(state["growth_tracker"])

    @contextlib.contextmanager
    def pipeline(self):
        """A Pipeline on the networks being trained (validation images), in inference mode while
        in use."""
        pipe = Pipeline(self.arch, mode=self.args.mode, net=self.net)
        try:
            yield pipe
        finally:
            self.net.set_train(True)


def _without_unet(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The loaded weights export_weights takes as they are: the UNet is always saved from the live
    network, so keeping its loaded copy would only cost a second UNet of host memory."""
    return {k: v for k, v in weights.items() if not k.startswith("model.diffusion_model.")}


def _overflow_clearer():
    """Ascend (saturation mode) records float overflows in a status register that `all_finite`
    reads and clears; reading it at the start of an accumulation group drops what ran before it
    (validation or class images), as MindSpore's TrainOneStepWithLossScaleCell clears it before
    each step. Elsewhere all_finite only checks its argument."""
    dummy = (Tensor(np.zeros(1, np.float32)),)
    return lambda: all_finite(dummy)


def setup_key(args, lora_init: Optional[LoraSet]) -> tuple:
    """What a Trainer's compiled graphs depend on besides the architecture (and the batch shape,
    which MindSpore handles by itself): a Trainer can `restart` for any run with the same key."""
    lora = tuple(sorted((t, p.rank, p.alpha) for t, p in lora_init.items())) if args.use_lora and lora_init else ()
    return (bool(args.use_lora), bool(args.train_text_encoder) and not args.use_lora, lora,
            float(args.lora_dropout), bool(args.lora_fp16), str(args.mixed_precision), int(args.mode), bool(args.use_parallel),
            bool(args.gradient_checkpointing), bool(args.cache_latents), bool(args.pre_compute_text_embeddings),
            bool(args.text_encoder_use_attention_mask))


def _load_weights(net: nn.Cell, ms_sd: Dict[str, np.ndarray]) -> None:
    """MindONE-layout weights into a network whose LoRA layers may be injected (their base
    weights are named `<layer>.linear.*` / `<layer>.conv.*`; adapters are left alone)."""
    bases = {**base_names(net.unet), **base_names(net.text_encoder)}
    adapters = {p.name for p in lora_parameters(net.unet, net.text_encoder)}
    for p in net.get_parameters():
        if p.name in adapters:
            continue
        key = bases[p.name][0] if p.name in bases else p.name
        if key not in ms_sd:
            raise UserError(f"weights lack {key}")
        value = np.asarray(ms_sd[key])
        value = cast_array(value, "fp32") if value.dtype == BF16 else value.astype(np.float32)
        if tuple(value.shape) != tuple(p.shape):
            raise UserError(f"weight {key} has shape {value.shape}, the model wants {tuple(p.shape)}")
        p.set_data(Tensor(value))


def _folded_state(root: nn.Cell) -> Dict[str, np.ndarray]:
    """A component's parameters under MindONE's names, with injected LoRA adapters folded into
    their base weights (`<layer>.linear.weight` -> `<layer>.weight`)."""
    bases = base_names(root)
    adapters = {p.name for p in lora_parameters(root)}
    out = {}
    for p in root.get_parameters():
        if p.name in adapters:
            continue
        value = p.asnumpy().astype(np.float32)
        name, layer = bases.get(p.name, (p.name, None))
        out[name] = value + layer.delta() if layer is not None else value
    return out
