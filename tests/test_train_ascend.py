"""Training on the MindSpore backend (backends.ascend.Trainer) against the PyTorch backend, fp32 on
CPU, tiny SD1 / SD2 models with identical weights, batches, timesteps and noise:

- one step: loss, gradients and weight update, for full fine-tuning and LoRA, with and without
  prior preservation and text-encoder training;
- the optimizer's arithmetic (torch.optim.AdamW, clipping, EMA) and fp16 loss scaling's skip;
- 20 steps through common.training.train_loop: equal loss curves; checkpoints of either backend give the
  same images on both (full and LoRA); resume reproduces the uninterrupted run bit for bit;
- msrun data parallel with 2 CPU workers (MindONE's commands through the CLI: test_train_ascend_cli).

MindSpore compiles graphs per Trainer (15-25 s each on a CPU), so the module keeps compiled
Trainers and restarts them (`Trainer.restart`) whenever architecture and set-up repeat, and every
batch holds two images; 16 px images (8x8 latents) keep MindSpore's CPU convolutions quick.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import ROOT, SUBJECT, TINY, free_port  # noqa: E402
from common.formats import lora as lora_fmt  # noqa: E402
from common.formats import loading
from common.arch import load_arch  # noqa: E402
from common.formats.checkpoint_io import load_state_dict  # noqa: E402
from common.training.data import DreamBoothDataset  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.diffusion.generate import SampleSettings, sample_latents  # noqa: E402
from common.images import to_uint8  # noqa: E402
from common.diffusion.schedule import NoiseSchedule  # noqa: E402
from common.tokenizer import tokenizer_for  # noqa: E402
from common.training.train_args import parse_train_args  # noqa: E402
from common.formats.lora import MINDSPORE_WEIGHT_NAME as MINDSPORE_LORA_NAME  # noqa: E402
from common.training.train_loop import make_batch, run_training, step_inputs  # noqa: E402

SIZE = 16
# mid-size SD1 / SD2 layouts at realistic widths, trained at their native 128 px
MID = {"mid-v1": os.path.join(ROOT, "configs", "mid-v1-inference.yaml"),
       "mid-v2": os.path.join(ROOT, "configs", "mid-v2-inference.yaml")}
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


# ----------------------------------------------------------------------------- helpers

class Recycler:
    """Stands in for backends.ascend: hands out Trainers compiled earlier in this module,
    restarted, when architecture and set-up repeat."""

    def __init__(self):
        import backends.ascend as ascend
        from backends.ascend.trainer import setup_key
        self.ascend, self.setup_key, self.trainers = ascend, setup_key, {}

    def Trainer(self, arch, weights, args, lora_init=None):   # noqa: N802 (the backend interface)
        key = (arch, self.setup_key(args, lora_init))
        trainer = self.trainers.get(key)
        if trainer is None:
            trainer = self.trainers[key] = self.ascend.Trainer(arch, weights, args, lora_init)
        else:
            trainer.restart(weights, args, lora_init)
        self.last = trainer
        return trainer

    def __getattr__(self, name):
        return getattr(self.ascend, name)


@pytest.fixture(scope="module")
def recycler():
    ms.set_context(mode=ms.GRAPH_MODE)
    return Recycler()


def make_args(out, version, *extra):
    size = load_arch(MID[version]).image_size if version in MID else SIZE
    return parse_train_args(["--model_config", {**TINY, **MID}[version], "--instance_data_dir", SUBJECT,
                             "--instance_prompt", "a photo of sks robot", "--class_data_dir", SUBJECT,
                             "--class_prompt", "a photo of a robot", "--num_class_images", "1",
                             "--image_size", str(size), "--train_batch_size", "2", "--train_data_repeats", "1",
                             "--output_path", str(out), "--seed", "7", *extra])


def fixed_batch(args, arch):
    """As tests/test_train_cuda.py builds it: the first batch of the dataset, its step inputs."""
    tok = tokenizer_for(arch.text)
    prior = args.with_prior_preservation
    size = args.image_size
    ds = DreamBoothDataset(SUBJECT, args.instance_prompt, tok, size, class_dir=SUBJECT if prior else None,
                           class_prompt=args.class_prompt if prior else None, seed=args.seed)
    data = next(ds.batches(args.train_batch_size, 0))
    latent = (4, size // arch.vae.downsample_factor, size // arch.vae.downsample_factor)
    randoms = step_inputs(NoiseSchedule(arch.schedule), args, 0, 0, 1, args.train_batch_size, latent,
                          "class_images" in data)
    return make_batch(data, randoms, args.prior_loss_weight)


_WEIGHTS = {}


def weights_of(arch):
    """random_weights(arch, 0), made once per architecture."""
    from common.formats.init_weights import random_weights
    if arch.path not in _WEIGHTS:
        _WEIGHTS[arch.path] = random_weights(arch, 0)
    return _WEIGHTS[arch.path]


def initial_lora(arch, args):
    from common.training import train_loop
    return train_loop.initial_lora(args, arch) if args.use_lora else None


def trained_values(trainer, args):
    """What the trainer trains, under backend-neutral names: original-layout tensors of the
    trained parts, or LoRA down / up matrices per target."""
    if args.use_lora:
        return {f"{t}.{side}": getattr(p, side) for t, p in trainer.export_lora().items() for side in ("down", "up")}
    parts = ("model.diffusion_model.",) + (("cond_stage_model.",) if args.train_text_encoder else ())
    return {k: v for k, v in trainer.export_weights().items() if k.startswith(parts)}


def ms_gradients(trainer, args):
    """The MindSpore trainer's gradients, named like trained_values (exported in place of the weights)."""
    grads = trainer.gradients()
    saved = {p.name: p.asnumpy().copy() for p in trainer.params}
    for p in trainer.params:
        p.set_data(ms.Tensor(grads[p.name]))
    try:
        return trained_values(trainer, args)
    finally:
        for p in trainer.params:
            p.set_data(ms.Tensor(saved[p.name]))


def pt_gradients(trainer, args):
    saved = {k: p.detach().clone() for k, p in trainer.trainable.items()}
    with torch.no_grad():
        for p in trainer.trainable.values():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    try:
        return trained_values(trainer, args)
    finally:
        with torch.no_grad():
            for k, p in trainer.trainable.items():
                p.copy_(saved[k])


def norm(d):
    return float(np.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in d.values())))


def diff(a, b):
    assert set(a) == set(b)
    return {k: np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64) for k in a}


# ----------------------------------------------------------------------------- one step

STRUCTURES = {     # name: (version, parameterization, flags)
    "full-unet+text-sd2": ("v2", "eps", ("--train_text_encoder", "True")),
    "lora-unet+text-sd2": ("v2", "eps", ("--use_lora", "True", "--lora_rank", "4", "--lora_ft_text_encoder", "True")),
    "locon-all-unet+text-sd1-v": ("v1", "v", ("--use_lora", "True", "--lora_rank", "4", "--lora_ft_text_encoder",
                                              "True", "--lora_layers", "all")),
    "full-unet-mid-sd2-v": ("mid-v2", "v", ("--train_text_encoder", "False")),
    "lora-kohya-unet+text-mid-sd1": ("mid-v1", "eps", ("--use_lora", "True", "--lora_rank", "4",
                                                       "--lora_ft_text_encoder", "True", "--lora_layers", "kohya")),
}
# every tiny structure with and without prior preservation; the wider LoRA target sets and the
# mid-size models once (the full UNet fine-tune runs at mid size only: SD2 layout, v-prediction).
# LoRA on SD1 with v-prediction: locon-all's targets include the default attention ones.
CASES = [(s, p) for s in STRUCTURES for p in (False, True)
         if not p or not any(w in s for w in ("kohya", "all", "mid"))]


TINY_CASES = [c for c in CASES if "mid" not in c[0]]
MID_CASES = [c for c in CASES if "mid" in c[0]]


def _ids(cases):
    return [f"{s}-{'prior' if p else 'vanilla'}" for s, p in cases]


@pytest.mark.parametrize("structure,prior", TINY_CASES, ids=_ids(TINY_CASES))
def test_one_step_matches_pytorch(tmp_path, recycler, structure, prior):
    check_one_step(tmp_path, recycler, structure, prior)


class TestMidSize:
    """The mid-size cases, in a class of their own: pytest-xdist (--dist loadscope) schedules a
    class apart from its module, so these long compilations run beside the module's others."""

    @pytest.mark.parametrize("structure,prior", MID_CASES, ids=_ids(MID_CASES))
    def test_one_step_matches_pytorch(self, tmp_path, recycler, structure, prior):
        check_one_step(tmp_path, recycler, structure, prior)


def check_one_step(tmp_path, recycler, structure, prior):
    """Two micro-batches accumulated, then the update. The prior-preservation variants add offset
    noise and Min-SNR weights; the SD1 variants predict v."""
    import backends.cuda as cuda
    version, parameterization, extra = STRUCTURES[structure]
    # two images either way (2 instance, or 1 instance + 1 class), so both share one compiled graph.
    # Adam's first step is ~lr * sign(g): float noise in gradients that are zero in exact arithmetic
    # (e.g. the text encoder's key bias) would flip whole updates, so eps is raised above that noise.
    options = ("--train_batch_size", "1", "--snr_gamma", "5", "--offset_noise", "0.1") if prior else \
        ("--train_batch_size", "2")
    args = make_args(tmp_path, version, *extra, "--with_prior_preservation", str(prior), *options,
                     "--gradient_accumulation_steps", "2", "--adam_epsilon", "1e-6")
    arch = load_arch({**TINY, **MID}[version])
    arch = dataclasses.replace(arch, schedule=dataclasses.replace(arch.schedule, parameterization=parameterization))
    weights = weights_of(arch)
    batch = fixed_batch(args, arch)
    lora = initial_lora(arch, args)
    pt = cuda.Trainer(arch, weights, args, lora)
    mt = recycler.Trainer(arch, weights, args, lora)
    before_pt, before_ms = trained_values(pt, args), trained_values(mt, args)
    assert norm(diff(before_pt, before_ms)) == 0.0

    s_pt = pt.train_step(batch, 1e-3, False)
    s_ms = mt.train_step(batch, 1e-3, False)
    for key in ("loss", "instance_loss", "prior_loss"):
        assert float(s_ms[key]) == pytest.approx(float(s_pt[key]), rel=1e-5, abs=1e-7), (key, s_pt, s_ms)
    assert (float(s_ms["prior_loss"]) > 0) == prior
    g_pt, g_ms = pt_gradients(pt, args), ms_gradients(mt, args)
    g_norm = norm(g_pt)
    worst = max(float(np.abs(d).max()) for d in diff(g_pt, g_ms).values())
    assert g_norm > 0 and worst <= 1e-4 * g_norm, (worst, g_norm)

    pt.train_step(batch, 1e-3, True)      # a second, identical micro-batch, then the update
    mt.train_step(batch, 1e-3, True)
    u_pt = diff(trained_values(pt, args), before_pt)
    u_ms = diff(trained_values(mt, args), before_ms)
    gap = norm(diff(u_pt, u_ms))
    assert norm(u_pt) > 0 and gap <= 1e-3 * norm(u_pt), (gap, norm(u_pt))
    print(f"{structure} {'prior' if prior else 'vanilla'}: loss rel "
          f"{abs(float(s_ms['loss']) - float(s_pt['loss'])) / float(s_pt['loss']):.1e}, grad {worst / g_norm:.1e} of norm, "
          f"update {gap / norm(u_pt):.1e} rel")
    if args.use_lora:          # only adapters train
        assert all(".lora_" in p.name for p in mt.params) and all(k.endswith((".down", ".up")) for k in pt.trainable)
    if not args.use_lora:      # frozen parts stay put
        exported, text_frozen = mt.export_weights(), not args.train_text_encoder
        for k, v in weights.items():
            if k.startswith("first_stage_model.") or (text_frozen and k.startswith("cond_stage_model.")):
                assert np.array_equal(exported[k], v), k


# ----------------------------------------------------------------------------- optimizer arithmetic

@pytest.mark.parametrize("optim", ["adamw", "adam"])
def test_update_is_torch_adamw_with_clipping_and_ema(tmp_path, optim):
    """Identical gradients into both optimizers: the fused MindSpore kernel with folded bias
    corrections follows torch.optim.AdamW (+ clip_grad_norm_, + EMA) step for step."""
    import backends.ascend as ascend
    args = make_args(tmp_path, "v1", "--use_lora", "True", "--lora_rank", "4", "--optim", optim,
                     "--clip_grad", "True", "--max_grad_norm", "0.5", "--use_ema", "True", "--ema_decay", "0.9",
                     "--betas", "0.9", "0.98", "--weight_decay", "0.05")
    arch = load_arch(TINY["v1"])
    trainer = ascend.Trainer(arch, weights_of(arch), args, initial_lora(arch, args))
    start = [p.asnumpy().copy() for p in trainer.params]
    params = [torch.tensor(x, requires_grad=True) for x in start]
    cls = torch.optim.AdamW if optim == "adamw" else torch.optim.Adam
    opt = cls(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05 if optim == "adamw" else 0.0)
    ema = [x.astype(np.float64) for x in start]
    ulp = 2 * float(np.spacing(np.float32(max(np.abs(x).max() for x in start))))   # float32 rounding of p
    rng = np.random.default_rng(0)
    for step, lr in enumerate([1e-3, 3e-3, 2e-3], start=1):
        grads = [(rng.standard_normal(x.shape) * 10 ** rng.uniform(-9, 0)).astype(np.float32) for x in start]
        for acc, g in zip(trainer.grad_step.accum, grads):
            acc.set_data(ms.Tensor(g))
        stats = trainer._update(lr)
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        total = torch.nn.utils.clip_grad_norm_(params, 0.5)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        decay = 0.9 * (1 - np.exp(-step / 2000))
        ema = [e * decay + p.detach().numpy().astype(np.float64) * (1 - decay) for e, p in zip(ema, params)]
        assert float(stats["grad_norm"]) == pytest.approx(float(total), rel=1e-5)
        moved = max(float(np.abs(p.detach().numpy() - x).max()) for p, x in zip(params, start))
        worst = max(float(np.abs(p.detach().numpy() - q.asnumpy()).max()) for p, q in zip(params, trainer.params))
        assert worst <= 1e-4 * moved + ulp, (step, worst, moved)
        assert all(not acc.asnumpy().any() for acc in trainer.grad_step.accum)   # buffers emptied
    assert trainer.optimizer_step == 3 and trainer.ema_updates == 3
    worst = max(float(np.abs(e - q.asnumpy()).max()) for e, q in zip(ema, trainer.update_step.ema))
    assert worst <= 1e-6, worst
    from backends.ascend.lora import lora_layers
    exported = trainer.export_lora()          # checkpoints hold the EMA weights ...
    ema_by_name = {p.name: e.asnumpy() for p, e in zip(trainer.params, trainer.update_step.ema)}
    for layer in lora_layers(trainer.net.unet).values():
        assert np.array_equal(exported[layer.targets[0]].up, ema_by_name[layer.lora_up.weight.name])
    # ... while training goes on from the live weights
    assert max(float(np.abs(p.detach().numpy() - q.asnumpy()).max())
               for p, q in zip(params, trainer.params)) <= 1e-4 * moved + ulp


def test_loss_scaling_skips_an_overflowing_step(tmp_path):
    """MindONE's dynamic loss scale (used with fp16 on Ascend), forced on here: an overflow
    leaves weights and moments untouched and halves the scale; `scale_window` clean steps double it."""
    import backends.ascend as ascend
    args = make_args(tmp_path, "v1", "--use_lora", "True", "--lora_rank", "4", "--init_loss_scale", "512",
                     "--scale_window", "2")
    arch = load_arch(TINY["v1"])
    trainer = ascend.Trainer(arch, weights_of(arch), args, initial_lora(arch, args))
    trainer.loss_scaling = True
    trainer.update_step = trainer._update_cell()
    trainer._reset_counters()
    before = [p.asnumpy().copy() for p in trainer.params]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(x.shape).astype(np.float32) for x in before]
    for acc, g in zip(trainer.grad_step.accum, grads):
        acc.set_data(ms.Tensor(g * 512))
    trainer.grad_step.accum[0].set_data(ms.Tensor(np.full(before[0].shape, np.inf, np.float32)))
    stats = trainer._update(1e-3)
    assert stats["skipped"] == 1.0 and trainer.loss_scale == 256 and trainer.optimizer_step == 0
    assert all(np.array_equal(p.asnumpy(), x) for p, x in zip(trainer.params, before))
    assert not any(m.asnumpy().any() for m in trainer.update_step.exp_avg)
    assert all(not acc.asnumpy().any() for acc in trainer.grad_step.accum)
    for step in (1, 2):
        for acc, g in zip(trainer.grad_step.accum, grads):
            acc.set_data(ms.Tensor(g * trainer.loss_scale))
        stats = trainer._update(1e-3)
        assert stats["skipped"] == 0.0 and trainer.optimizer_step == step
    assert trainer.loss_scale == 512                          # doubled after scale_window clean steps
    # two applied Adam steps on the same unscaled gradients: ~2 * lr * sign(g) each element
    moved = np.concatenate([(p.asnumpy() - x).ravel() for p, x in zip(trainer.params, before)])
    assert np.abs(moved).max() < 2.1e-3 and np.abs(moved).max() > 1.9e-3


def test_a_transient_overflow_is_skipped_alike_on_both_backends(tmp_path):
    """fp16 semantics, forced on the CPU: a NaN loss (a forward overflow) skips its update and
    halves the scale on both backends, as torch's GradScaler does; the same sequence of skips and
    scales follows, and the weights after the clean updates agree. The train loop's check lets a
    NaN loss pass while the scale is above the minimum and stops the run at it."""
    import backends.ascend as ascend
    import backends.cuda as cuda
    from common.training.train_loop import check_loss
    args = make_args(tmp_path, "v1", "--use_lora", "True", "--lora_rank", "4", "--init_loss_scale", "4",
                     "--scale_window", "2", "--with_prior_preservation", "False", "--train_text_encoder", "False")
    arch = load_arch(TINY["v1"])
    lora = initial_lora(arch, args)
    mt = ascend.Trainer(arch, weights_of(arch), args, lora)
    mt.loss_scaling = True
    mt.update_step = mt._update_cell()
    mt._reset_counters()
    pt = cuda.Trainer(arch, weights_of(arch), args, lora)
    pt.scaler = torch.amp.GradScaler("cpu", init_scale=4, growth_factor=2, backoff_factor=0.5, growth_interval=2)
    good = fixed_batch(args, arch)
    bad = dict(good, noise=good["noise"].copy())
    bad["noise"][0, 0, 0, 0] = np.nan
    seen = {"cuda": [], "ascend": []}
    for name, trainer in (("cuda", pt), ("ascend", mt)):
        for batch in (bad, good, bad, good, good, bad, bad):
            stats = {k: float(v) for k, v in trainer.train_step(batch, 1e-3, True).items()}
            seen[name].append((stats["skipped"], stats["loss_scale"], math.isfinite(stats["loss"])))
    assert seen["cuda"] == seen["ascend"] == [(1.0, 4.0, False), (0.0, 2.0, True), (1.0, 2.0, False),
                                              (0.0, 1.0, True), (0.0, 1.0, True), (1.0, 2.0, False),
                                              (1.0, 1.0, False)]
    a, b = trained_values(pt, args), trained_values(mt, args)
    moved = norm(diff(a, {k: v for k, v in lora_values(lora).items()}))
    assert moved > 0 and norm(diff(a, b)) <= 1e-3 * moved
    check_loss(6, {"loss": float("nan"), "loss_scale": 2.0})          # transient: goes on
    with pytest.raises(UserError, match="loss became nan .*step 7, loss scale 1"):
        check_loss(7, {"loss": float("nan"), "loss_scale": 1.0})


def lora_values(lora):
    return {f"{t}.{side}": getattr(p, side) for t, p in lora.items() for side in ("down", "up")}


# ----------------------------------------------------------------------------- through the train loop

def loop_args(out, backend, model, version, *extra):
    return parse_train_args(["--model_config", TINY[version], "--pretrained_model_path", model, "--backend", backend,
                             "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
                             "--class_data_dir", SUBJECT, "--class_prompt", "a photo of a robot",
                             "--num_class_images", "1", "--image_size", str(SIZE), "--train_batch_size", "1",
                             "--train_data_repeats", "2", "--start_learning_rate", "1e-3", "--seed", "11",
                             "--output_path", str(out), *extra])


def loss_column(folder, column=2):
    rows = (folder / "loss.csv").read_text().strip().splitlines()[1:]
    return [float(r.split(",")[column]) for r in rows]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_models, recycler):
    """20 DreamBooth steps (prior preservation, text encoder trained) on each backend."""
    import backends.cuda as cuda
    root = tmp_path_factory.mktemp("loop")
    extra = ("--train_text_encoder", "True", "--max_train_steps", "20", "--ckpt_save_steps", "10")
    out = {}
    for name, backend in (("cuda", cuda), ("ascend", recycler)):
        run_training(loop_args(root / name, name, tiny_models["v2"], "v2", *extra), backend)
        out[name] = root / name
    return out


def test_twenty_steps_give_the_same_loss_curve(full_runs):
    a, b = loss_column(full_runs["cuda"]), loss_column(full_runs["ascend"])
    assert len(a) == len(b) == 20
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    print(f"20-step loss curves: max relative difference {max(rel):.1e}")
    assert max(rel) <= 0.02, rel
    assert sorted(os.listdir(full_runs["ascend"] / "ckpt")) == sorted(os.listdir(full_runs["cuda"] / "ckpt"))


def test_msrun_two_workers_equal_one_process(tmp_path, tiny_models, recycler):
    """msrun with 2 CPU workers, batch 1 each (each reads its own shard), gradients averaged by
    MindSpore's DistributedGradReducer == one process with batch 2; the run folder is set up by rank
    0 between barriers. The workers run in PYNATIVE_MODE: no graph to compile in each (the compiled
    CLI path: test_without_torch, and the one-process reference here). (Class images made once on 2
    processes: the accelerate test; the MindSpore class-image pipeline: test_ascend_pipeline.)"""
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.exists(msrun):
        pytest.skip("msrun not installed")
    common = ["--with_prior_preservation", "False", "--train_text_encoder", "True", "--max_train_steps", "2",
              "--adam_epsilon", "1"]       # a large eps keeps Adam linear in the gradient
    one = run_training(loop_args(tmp_path / "one", "ascend", tiny_models["v2"], "v2", *common,
                                 "--train_batch_size", "2"), recycler)
    cli = ["train_dreambooth.py", "--backend", "ascend", "--use_parallel", "True", "--model_config", TINY["v2"],
           "--pretrained_model_path", tiny_models["v2"], "--instance_data_dir", SUBJECT,
           "--instance_prompt", "a photo of sks robot", "--image_size", str(SIZE), "--train_batch_size", "1",
           "--train_data_repeats", "2", "--start_learning_rate", "1e-3", "--seed", "11",
           "--output_path", str(tmp_path / "two"), "--mode", "1", *common]
    proc = subprocess.run([msrun, "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
                           "--log_dir", str(tmp_path / "logs"), "--join", "True", *cli],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          # msrun starts workers with the `python` on PATH: make it this interpreter
                          env=dict(ENV, OMP_NUM_THREADS="1",
                                   PATH=os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")))
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert proc.returncode == 0, (proc.stdout[-2000:], logs[-4000:])
    assert "batch 1 x 2 process(es)" in logs
    wa = load_state_dict(one["checkpoint"])
    wb = load_state_dict(str(tmp_path / "two" / "ckpt" / "sd-2.safetensors"))
    base = load_state_dict(tiny_models["v2"])
    trained = [k for k in wa if k.startswith(("model.diffusion_model.", "cond_stage_model."))]
    moved = max(float(np.abs(wa[k] - base[k]).max()) for k in trained)
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in trained)
    print(f"msrun 2 workers vs 1 process: worst {worst:.1e}, moved {moved:.1e}")
    assert moved > 1e-4 and worst < 1e-3 * moved, (moved, worst)


@pytest.mark.parametrize("mode", ["full-accumulation", "lora-ema"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_models, recycler, mode):
    extra = {"full-accumulation": ("--train_text_encoder", "True", "--gradient_accumulation_steps", "2",
                                   "--with_prior_preservation", "False", "--train_batch_size", "2"),
             "lora-ema": ("--use_lora", "True", "--lora_rank", "4", "--lora_ft_text_encoder", "True",
                          "--use_ema", "True")}[mode]
    model = tiny_models["v2"]

    def run(name, steps, *more):
        args = loop_args(tmp_path / name, "ascend", model, "v2", *extra, "--max_train_steps", str(steps),
                         "--ckpt_save_steps", "2", *more)
        return run_training(args, recycler)

    full = run("full", 4)
    run("part", 2)
    resumed = run("part", 4, "--resume")
    a, b = full["checkpoint"], resumed["checkpoint"]
    assert os.path.basename(a) == os.path.basename(b)
    if os.path.isdir(a):
        assert sorted(os.listdir(a)) == sorted([lora_fmt.DIFFUSERS_WEIGHT_NAME, lora_fmt.KOHYA_WEIGHT_NAME,
                                                MINDSPORE_LORA_NAME])
        a, b = os.path.join(a, MINDSPORE_LORA_NAME), os.path.join(b, MINDSPORE_LORA_NAME)
    wa, wb = load_state_dict(a), load_state_dict(b)
    assert set(wa) == set(wb)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert loss_column(tmp_path / "full") == loss_column(tmp_path / "part")


# ----------------------------------------------------------------------------- checkpoints across backends

@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_models, recycler):
    """A few LoRA steps (UNet and text encoder) on each backend, at a learning rate that shows."""
    import backends.cuda as cuda
    root = tmp_path_factory.mktemp("lora")
    extra = ("--use_lora", "True", "--lora_rank", "4", "--lora_ft_text_encoder", "True",
             "--start_learning_rate", "2e-2", "--max_train_steps", "4")
    for name, backend in (("cuda", cuda), ("ascend", recycler)):
        run_training(loop_args(root / name, name, tiny_models["v2"], "v2", *extra), backend)
    folded = recycler.last.export_weights()         # the LoRA merged into a full model
    return {"cuda": root / "cuda" / "ckpt" / "lora-4", "ascend": root / "ascend" / "ckpt" / "lora-4",
            "folded": folded}


@pytest.fixture(scope="module")
def pipelines(tiny_models):
    """A PyTorch pipeline factory and one compiled MindSpore pipeline whose weights are swapped."""
    import backends.ascend as ascend
    import backends.cuda as cuda
    arch = load_arch(TINY["v2"])
    ms_pipe = ascend.Pipeline(arch, load_state_dict(tiny_models["v2"]))

    def merged(weights, lora):
        return lora_fmt.merge_loras(weights, arch, [(lora, 1.0)]) if lora else weights

    def on_ms(weights, lora=None):
        from backends.ascend.models import load_original
        load_original(ms_pipe.net, merged(weights, lora), arch)
        return ms_pipe

    return arch, (lambda weights, lora=None: cuda.Pipeline(arch, merged(weights, lora))), on_ms


def sample(pipe, arch):
    tok = tokenizer_for(arch.text)
    settings = SampleSettings(sampler="ddim", steps=3, scale=7.5, height=SIZE, width=SIZE, seed=3, progress=False)
    latents = sample_latents(pipe, arch, tok(["a photo of sks robot"]), tok([""]), settings, (0, 0))
    return to_uint8(pipe.decode(latents)).astype(np.float32)


def pixel_gap(a, b):
    return float(np.abs(a - b).mean() / 255)


@pytest.mark.parametrize("trained_by", ["cuda", "ascend"])
def test_full_checkpoint_gives_the_same_image_on_both_backends(full_runs, tiny_models, pipelines, trained_by):
    arch, on_pt, on_ms = pipelines
    weights = load_state_dict(str(full_runs[trained_by] / "ckpt" / "sd-20.safetensors"))
    a, b = sample(on_pt(weights), arch), sample(on_ms(weights), arch)
    base = sample(on_pt(load_state_dict(tiny_models["v2"])), arch)
    print(f"full checkpoint trained by {trained_by}: mean pixel gap {pixel_gap(a, b) * 255:.3f}/255, "
          f"vs base {pixel_gap(a, base) * 255:.1f}/255")
    assert pixel_gap(a, b) <= 1 / 255
    assert pixel_gap(a, base) > 2 / 255           # training changed the image


@pytest.mark.parametrize("trained_by", ["cuda", "ascend"])
def test_lora_checkpoint_gives_the_same_image_on_both_backends(lora_runs, tiny_models, pipelines, trained_by):
    from common.formats.mindspore_layout import lora_from_mindspore
    arch, on_pt, on_ms = pipelines
    base = load_state_dict(tiny_models["v2"])
    lora = loading.load_lora_file(str(lora_runs[trained_by]), arch)
    assert {t.split(":")[0] for t in lora} == {"unet", "text_encoder"}
    a, b = sample(on_pt(base, lora), arch), sample(on_ms(base, lora), arch)
    plain = sample(on_pt(base), arch)
    print(f"LoRA trained by {trained_by}: mean pixel gap {pixel_gap(a, b) * 255:.3f}/255, "
          f"vs no LoRA {pixel_gap(a, plain) * 255:.1f}/255")
    assert pixel_gap(a, b) <= 1 / 255
    assert pixel_gap(a, plain) > 2 / 255          # the LoRA changed the image
    if trained_by == "ascend":    # MindONE's LoRA file, and the LoRA folded into a full model, say the same
        native = lora_from_mindspore(load_state_dict(str(lora_runs["ascend"] / MINDSPORE_LORA_NAME)), arch)
        assert pixel_gap(sample(on_ms(base, native), arch), b) <= 1 / 255
        assert pixel_gap(sample(on_pt(lora_runs["folded"]), arch), b) <= 1 / 255


# ----------------------------------------------------------------------------- state files, errors

def test_state_of_another_mode_is_refused(tmp_path, recycler):
    args = make_args(tmp_path, "v1", "--train_text_encoder", "False", "--with_prior_preservation", "False")
    arch = load_arch(TINY["v1"])
    trainer = recycler.Trainer(arch, weights_of(arch), args)
    path = str(tmp_path / "state.pt")
    trainer.save_state(path)
    assert load_state_dict(path)["optimizer_step"].shape == ()
    lora_args = make_args(tmp_path, "v1", "--use_lora", "True", "--lora_rank", "4")
    lora_trainer = recycler.Trainer(arch, weights_of(arch), lora_args, initial_lora(arch, lora_args))
    with pytest.raises(UserError, match="another backend, training mode or model"):
        lora_trainer.load_state(path)
    (tmp_path / "torch.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read training state"):
        trainer.load_state(str(tmp_path / "torch.pt"))
    with pytest.raises(ValueError, match="restart"):
        trainer.restart(weights_of(arch), lora_args, initial_lora(arch, lora_args))
