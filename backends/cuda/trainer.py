"""The PyTorch training step: vanilla, DreamBooth (prior preservation) and LoRA.

Everything random arrives in the batch from common.training.train_loop (posterior noise, diffusion noise,
offset noise, timesteps and their schedule coefficients, loss weights), so this file is only the
arithmetic: encode, noise, predict, weighted MSE, AdamW. Data parallelism comes from accelerate.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Optional

import numpy as np
import torch
from accelerate import Accelerator

from common.formats import keymap
from common.arch import ModelArch
from common.atomic import atomic_path
from common.errors import UserError
from common.formats.lora import LoraSet
from common.tokenizer import attention_mask
from .device import compute_dtype, use_tf32, warn_accelerate_precision
from .lora import add_adapters, export_lora, lora_parameters
from .optimizers import make_optimizer
from .models import load_models, module_weights
from .pipeline import Pipeline

log = logging.getLogger("backends.cuda")


class Trainer:
    def __init__(self, arch: ModelArch, weights: Dict[str, np.ndarray], args, lora_init: Optional[LoraSet] = None):
        self.arch = arch
        self.args = args
        # Precision and accumulation are ours (--mixed_precision, --gradient_accumulation_steps):
        # stated explicitly, so a user's `accelerate config` cannot autocast or scale on top of them.
        warn_accelerate_precision(args.mixed_precision)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                                       gradient_accumulation_steps=1)
        self.device = self.accelerator.device
        if self.device.type != "cuda" and self.accelerator.is_main_process:
            log.warning("backend cuda: no CUDA device found, training on CPU in fp32")
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.dtype = compute_dtype(args.mixed_precision, self.device)
        use_tf32(args.allow_tf32, self.device)
        self.unet, self.vae, self.text_encoder, parts = load_models(arch, weights)
        # the other components and extras as loaded, for saving (the UNet is always saved from the
        # live module: holding its loaded copy too would cost a second UNet of host memory)
        self.base_parts = {k: v for k, v in parts.items() if k != "unet"}
        self.lora_targets = sorted(lora_init) if lora_init else []
        self.lora_alpha = float(args.lora_alpha or args.lora_rank)
        self.train_text = bool(args.train_text_encoder) and not args.use_lora

        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
        if args.use_lora:
            add_adapters(self.unet, self.text_encoder, lora_init, args.lora_rank, self.lora_alpha, args.lora_dropout)
            params = lora_parameters(self.unet, self.text_encoder, self.lora_targets)
            self.trainable = {k: p for k, p in params.items()}
        else:
            self.unet.requires_grad_(True)
            self.trainable = {"unet." + k: p for k, p in self.unet.named_parameters()}
            if self.train_text:
                self.text_encoder.requires_grad_(True)
                self.trainable.update({"text_encoder." + k: p for k, p in self.text_encoder.named_parameters()})
        for p in self.trainable.values():
            p.requires_grad_(True)
            p.data = p.data.float()           # fp32 master weights, whatever the compute dtype
        self.text_trainable = any(k.startswith("text_encoder") for k in self.trainable)

        # frozen parts run in the compute dtype; trainable ones keep fp32 master weights
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(self.device)
        frozen = [self.vae] + ([] if self.text_trainable else [self.text_encoder])
        for m in frozen:
            m.eval()
        if self.dtype != torch.float32:
            # LoRA: the whole base model is frozen, so it runs in half precision too
            for m in frozen + ([self.unet, self.text_encoder] if args.use_lora else []):
                m.to(self.dtype)
            for p in self.trainable.values():
                p.data = p.data.float()
        if args.pre_compute_text_embeddings and self.device.type == "cuda":
            # it encodes a handful of prompts in the whole run: it waits in host memory, in fp32,
            # leaving the GPU memory to the UNet (diffusers deletes it)
            self.text_encoder.to("cpu", torch.float32)
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.text_trainable:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        if self.text_trainable:
            self.text_encoder.train()

        if args.enable_xformers_memory_efficient_attention:
            use_xformers(self.unet)
        self.optimizer = make_optimizer(self.trainable.values(), args, self.device)
        self.scaler = None
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda", init_scale=args.init_loss_scale,
                                               growth_factor=args.loss_scale_factor,
                                               backoff_factor=1.0 / args.loss_scale_factor,
                                               growth_interval=args.scale_window)
        self.unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        if self.text_trainable:
            self.text_encoder = self.accelerator.prepare(self.text_encoder)
        self.ema: Optional[Dict[str, torch.Tensor]] = None
        self.ema_updates = 0
        if args.use_ema:
            self.ema = {k: p.detach().clone() for k, p in self.trainable.items()}

    # ------------------------------------------------------------------ the step
    def _t(self, x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.device.type == "cuda":   # page-locked, so the copy is asynchronous and overlaps the step
            return t.pin_memory().to(self.device, non_blocking=True).to(dtype)
        return t.to(self.device, dtype)

    def compute_loss(self, batch: Dict[str, np.ndarray]):
        """Loss of one micro-batch (instance half first, class half after), as a tensor."""
        n_inst = int(batch["n_instance"])
        if "latent_mean" in batch:         # --cache_latents
            mean, std = self._t(batch["latent_mean"]), self._t(batch["latent_std"])
        else:
            mean, std = self.encode_latents(batch["images"], to_host=False)
        z = (mean + std * self._t(batch["latent_noise"])) * self.arch.scale_factor
        noise = self._t(batch["noise"])
        a = self._t(batch["coef_a"]).view(-1, 1, 1, 1)
        b = self._t(batch["coef_b"]).view(-1, 1, 1, 1)
        noisy = a * z + b * noise
        target = noise if self.arch.schedule.parameterization == "eps" else a * noise - b * z
        timesteps = self._t(batch["timesteps"], torch.long)
        with self._autocast():
            if "context" in batch:         # --pre_compute_text_embeddings
                context = self._t(batch["context"])
            else:
                with torch.set_grad_enabled(self.text_trainable):
                    context = self._encode_text(batch["ids"])
            pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)) * self._t(batch["loss_weights"])
        instance = per_sample[:n_inst].mean()
        prior = per_sample[n_inst:].mean() if len(per_sample) > n_inst else torch.zeros_like(instance)
        loss = instance + float(batch["prior_loss_weight"]) * prior
        return loss, instance, prior

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def encode_latents(self, images: np.ndarray, to_host: bool = True):
        """The frozen VAE's posterior (mean, std) of `images`, float32 (numpy with `to_host`: what
        --cache_latents keeps)."""
        posterior = self.vae.encode(self._t(images, self.vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        return (mean.cpu().numpy(), std.cpu().numpy()) if to_host else (mean, std)

    @torch.no_grad()
    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """The frozen text encoder's output for `ids` as the step computes it, float32 numpy
        (--pre_compute_text_embeddings)."""
        with self._autocast():
            return self._encode_text(ids).float().cpu().numpy()

    def _encode_text(self, ids: np.ndarray) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device   # the host when --pre_compute_text_embeddings parks it
        mask = attention_mask(ids) if self.args.text_encoder_use_attention_mask else None
        mask = torch.from_numpy(mask).to(device, torch.long) if mask is not None else None
        ids = torch.from_numpy(np.ascontiguousarray(ids)).to(device, torch.long)
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.device)

    def train_step(self, batch: Dict[str, np.ndarray], lr: float, update: bool) -> Dict[str, float]:
        """Forward and backward of one micro-batch; with `update`, the optimizer step too."""
        accum = self.args.gradient_accumulation_steps
        models = [self.unet] + ([self.text_encoder] if self.text_trainable else [])
        sync = update or self.world_size == 1
        with contextlib.ExitStack() as stack:
            if not sync:       # every prepared model: no gradient all-reduce before the update step
                for model in models:
                    stack.enter_context(self.accelerator.no_sync(model))
            loss, instance, prior = self.compute_loss(batch)
            scaled = loss / accum
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            self.accelerator.backward(scaled)
        # device values: the train loop reads them once per logging interval (and checks the loss),
        # so a step queues its work without waiting for the device
        stats = {"loss": loss.detach(), "instance_loss": instance.detach(), "prior_loss": prior.detach()}
        if update:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            params = list(self.trainable.values())
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.args.clip_grad:
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            if self.scaler is not None:
                # GradScaler's step skips an overflowing update (a NaN loss included) and update()
                # lowers the scale; reading the scale costs nothing more: step() has synchronised.
                used = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stats["skipped"] = float(self.scaler.get_scale() < used)
                stats["loss_scale"] = used
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None and not stats.get("skipped"):
                self._update_ema()
        return stats

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.ema_updates += 1
        decay = self.args.ema_decay * (1 - np.exp(-self.ema_updates / 2000))
        for k, p in self.trainable.items():
            self.ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)

    # ------------------------------------------------------------------ outputs
    def _current(self, use_ema: bool) -> Dict[str, torch.Tensor]:
        return self.ema if (use_ema and self.ema is not None) else {k: p.detach() for k, p in self.trainable.items()}

    @property
    def _unet(self):
        return self.accelerator.unwrap_model(self.unet)

    @property
    def _text(self):
        return self.accelerator.unwrap_model(self.text_encoder)

    def export_weights(self) -> Dict[str, np.ndarray]:
        """The full model in the original single-file layout (EMA weights when --use_ema)."""
        with self._swapped(self.ema):
            parts = dict(self.base_parts)
            parts["unet"] = module_weights(self._unet)
            if self.train_text:
                parts["text_encoder"] = module_weights(self._text)
            return keymap.diffusers_to_ldm(parts, self.arch)

    def export_lora(self) -> LoraSet:
        with self._swapped(self.ema):
            return export_lora(self._unet, self._text, self.lora_targets, self.lora_alpha)

    @contextlib.contextmanager
    def _swapped(self, values: Optional[Dict[str, torch.Tensor]]):
        """Temporarily put `values` (the EMA weights) into the trainable parameters."""
        if values is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.trainable.items()}
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(values[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.trainable.items():
                    p.copy_(saved[k])

    def save_state(self, path: str) -> None:
        """Optimizer, loss scaler, EMA and the trainable weights, for an exact resume."""
        state = {"trainable": {k: p.detach().cpu() for k, p in self.trainable.items()},
                 "optimizer_kind": type(self.optimizer).__name__,
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "ema": {k: v.cpu() for k, v in self.ema.items()} if self.ema is not None else None,
                 "ema_updates": self.ema_updates}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_state(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"cannot read training state {path}: {e.__class__.__name__}") from None
        if set(state["trainable"]) != set(self.trainable):
            raise UserError(f"training state {path} belongs to a different training mode or model")
        kind = state.get("optimizer_kind", "AdamW" if self.args.optim == "adamw" else "Adam")
        if kind != type(self.optimizer).__name__:
            raise UserError(f"training state {path} holds {kind} moments; this run uses {type(self.optimizer).__name__} "
                            f"(resume with the same --optim / --use_8bit_adam)")
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.ema_updates = int(state.get("ema_updates", 0))

    def pipeline(self) -> "EvalPipeline":
        return EvalPipeline(self)


def use_xformers(unet) -> None:
    """diffusers' --enable_xformers_memory_efficient_attention: xFormers when installed; otherwise
    PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels), diffusers' default."""
    import importlib.util
    if importlib.util.find_spec("xformers") is None:
        log.info("xformers is not installed: attention uses PyTorch's scaled_dot_product_attention "
                 "(memory-efficient kernels), as diffusers does by default")
        return
    unet.enable_xformers_memory_efficient_attention()


class EvalPipeline(Pipeline):
    """Inference with the models being trained (validation images): eval mode while in use, and
    the training's mixed precision through autocast (the trainable weights stay fp32)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        super().__init__(trainer.arch, models=(trainer._unet, trainer.vae, trainer._text),
                         device=trainer.device, precision="no")

    def __enter__(self):
        self.unet.eval()
        self.text_encoder.eval()
        return self

    def __exit__(self, *exc):
        self.unet.train()
        if self.trainer.text_trainable:
            self.text_encoder.train()

    def _autocast(self):
        return self.trainer._autocast()

    def encode_text(self, ids):
        with self._autocast():
            return super().encode_text(ids)

    def predict(self, x, t, context):
        with self._autocast():
            return super().predict(x, t, context)
