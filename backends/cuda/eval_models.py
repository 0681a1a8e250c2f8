"""Evaluation encoders on PyTorch: CLIP through open_clip (or a transformers CLIP folder) and the
DINO ViT through timm, fed with weights that `common.evaluation.models` has already read and checked.

Nothing is downloaded: open_clip models are built from the architecture with `pretrained=None`,
timm's with `pretrained=False`, transformers folders with `local_files_only=True`. Inputs and
outputs are numpy (pixels preprocessed by `common.evaluation.scores`); everything runs in float32.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from common.errors import UserError
from common.evaluation.models import ClipSource, DinoSource
from .device import pick_device


@contextlib.contextmanager
def _quiet_logging():
    """open_clip warns 'No pretrained weights loaded ... initialized randomly' for pretrained=None,
    which is not true here: the weights are loaded right after."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _load(module: torch.nn.Module, weights, what: str) -> None:
    state = {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in weights.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names are checked in common, so this means an arch mismatch
        raise UserError(f"{what}: weights do not fit the model: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """Plain fp32 matmuls and convolutions on the GPU (no TF32, which cuDNN convolutions use by
    default), so scores agree with the CPU and MindSpore to float32 rounding."""
    knobs = [(getattr(torch.backends.cuda, "matmul", None), "fp32_precision"),
             (getattr(torch.backends.cudnn, "conv", None), "fp32_precision")]   # torch >= 2.9 API
    knobs = [(o, n) for o, n in knobs if o is not None and hasattr(o, n)] if device.type == "cuda" else []
    saved = [getattr(obj, name) for obj, name in knobs]
    try:
        for obj, name in knobs:
            setattr(obj, name, "ieee")
        yield
    finally:
        for (obj, name), value in zip(knobs, saved):
            setattr(obj, name, value)


class _TorchEncoder:
    def __init__(self, model: torch.nn.Module):
        self.device = pick_device()
        self.model = model.to(self.device).float().eval()

    def _run(self, fn, **inputs) -> np.ndarray:
        with torch.no_grad(), _ieee_fp32(self.device):
            return self._numpy(fn(**{k: self._tensor(v) for k, v in inputs.items()}))

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @staticmethod
    def _numpy(out) -> np.ndarray:
        if not isinstance(out, torch.Tensor):     # transformers 5 returns a ModelOutput
            out = out.pooler_output
        return out.detach().float().cpu().numpy()


class ClipEncoder(_TorchEncoder):
    """CLIP image and text embeddings (projected, not normalised) of a `ClipSource`."""

    backend = "cuda"

    def __init__(self, source: ClipSource):
        self.arch = source.arch
        if source.kind == "transformers":
            import transformers
            from transformers import CLIPModel
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            try:
                model = CLIPModel.from_pretrained(source.path, local_files_only=True, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise UserError(f"{source.path}: not a loadable transformers CLIP folder: "
                                f"{str(e).splitlines()[0]}") from None
            self.library, self.hf = f"transformers {transformers.__version__}", True
        else:
            import open_clip
            if self.arch.eps != 1e-5:
                raise UserError(f"{source.path}: open_clip models use LayerNorm eps 1e-5, the config "
                                f"asks for {self.arch.eps}")
            with _quiet_logging():
                if self.arch.open_clip_name:        # a built-in name: open_clip's own config
                    model = open_clip.create_model(self.arch.open_clip_name, pretrained=None,
                                                   pretrained_image=False, pretrained_text=False)
                else:
                    model = open_clip.CLIP(**self.arch.open_clip_config())
            _load(model, source.weights, source.path)
            self.library, self.hf = f"open_clip {open_clip.__version__}", False
        super().__init__(model)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        pixels = pixels.astype(np.float32)
        if self.hf:
            return self._run(self.model.get_image_features, pixel_values=pixels)
        return self._run(self.model.encode_image, image=pixels)

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.int64)
        if self.hf:
            return self._run(self.model.get_text_features, input_ids=ids)
        return self._run(self.model.encode_text, text=ids)


class DinoEncoder(_TorchEncoder):
    """DINO CLS embeddings (after the final LayerNorm) from timm's VisionTransformer."""

    backend = "cuda"

    def __init__(self, source: DinoSource):
        import timm
        from functools import partial
        self.arch = source.arch
        kwargs = source.arch.timm_kwargs()
        if source.arch.eps != 1e-6:
            kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=source.arch.eps)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs)
        _load(model, source.weights, source.path)
        self.library = f"timm {timm.__version__}"
        super().__init__(model)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(self.model, x=pixels.astype(np.float32))
