"""Flags shared by the evaluation scripts (MindONE's names), and their common set-up."""
from __future__ import annotations

import argparse
import logging
import textwrap

from common.config import UserArgumentParser, add_bool, backend_name, count
from common.cli import check_output_file, setup_logging
from common.errors import UserError
from common.evaluation.scores import DEFINITIONS, PREPROCESS_HELP

WEIGHTS_HELP = ("Weights come only from local files, never downloaded: a state dict saved with "
                "torch.save (.pt/.pth/.bin/.ckpt), a .safetensors file, an open_clip training "
                "checkpoint ({'state_dict': ...}), OpenAI's TorchScript CLIP .pt, a transformers "
                "CLIP folder (config.json + model.safetensors), or a MindONE/MindSpore CLIP .ckpt.")


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    scores = "Scores: " + "; ".join(f"{k} = {v}" for k, v in DEFINITIONS.items()) + "."
    epilog = "\n\n".join(textwrap.fill(text, 100) for text in (PREPROCESS_HELP, scores))
    return UserArgumentParser(prog=prog, description=doc, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)


def add_clip_flags(p: argparse.ArgumentParser, ckpt_flags=("--ckpt_path",)) -> None:
    g = p.add_argument_group("CLIP model")
    g.add_argument(*ckpt_flags, dest="ckpt_path", default=None,
                   help="CLIP weights: a local file or a transformers CLIP folder. " + WEIGHTS_HELP)
    g.add_argument("--model_name", default="ViT-B-16",
                   help="open_clip architecture name (default ViT-B-16; ViT-B-32, ViT-L-14, ... and the "
                        "'-quickgelu' variants, which OpenAI's weights need); MindONE's clip_vit_b_16 / "
                        "clip_vit_b_32 / clip_vit_l_14 and openai/clip-vit-base-patch16-style names mean "
                        "the OpenAI (QuickGELU) variant")
    g.add_argument("--config", default=None,
                   help="architecture file instead of --model_name: an open_clip model config JSON (or "
                        "the same keys in yaml), a transformers CLIP config.json, or a MindFormers CLIP yaml")
    g.add_argument("--tokenizer_path", default=None,
                   help="CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz (default: open_clip's copy when "
                        "installed, else the vocabulary built into instant-clip-tokenizer)")


def add_common_flags(p: argparse.ArgumentParser, result_default: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--backend", type=backend_name, default="cuda",
                   help="cuda (PyTorch: open_clip / transformers / timm) or ascend (MindSpore Cells); "
                        "MindONE's pt / ms work too (default: cuda)")
    g.add_argument("--batch_size", type=count, default=32, help="images per forward pass (default: 32)")
    add_bool(g, "--save_result", default=result_default, help="write the scores to --result_path as JSON")
    g.add_argument("--result_path", default="results.json",
                   help="JSON file for the scores and per-image values (default: results.json; replaced)")
    add_bool(g, "--quiet", default=False, help="print only the final scores, not one line per image")
    add_bool(g, "--check_certificate", default=False,
             help="accepted for MindONE compatibility and ignored: nothing is ever downloaded")


def setup(args) -> None:
    setup_logging("WARNING" if args.quiet else "INFO")
    for noisy in ("root", "timm", "open_clip"):          # beyond setup_logging's own list
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "save_result", False):
        check_output_file(args.result_path, "--result_path")


def clip_tokenizer(source, vocab_path):
    """The CLIP tokenizer for `source` (pad id 0 as OpenCLIP and MindONE; the pad id does not
    change CLIP's end-of-text pooling)."""
    from common.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer(context_length=source.arch.context_length, pad_token=0, vocab_path=vocab_path)
    if tok.vocab_size > source.arch.vocab_size:
        raise UserError(f"the CLIP vocabulary has {tok.vocab_size} tokens but the model only "
                        f"{source.arch.vocab_size}")
    return tok


def save_scores(args, metric: str, result: dict, encoder, source, **extra) -> None:
    """Write a score's JSON (with the per-image values, model, definitions and preprocessing)."""
    from common.evaluation.scores import describe_encoder, write_json
    per_image = result.pop("per_image")
    write_json(args.result_path, {"metric": metric, "scores": result, **extra, "per_image": per_image,
                                  "model": describe_encoder(encoder, source), "definitions": DEFINITIONS,
                                  "preprocessing": PREPROCESS_HELP})
    print(f"results: {args.result_path}")


def pairwise_main(args, metric: str, label: str, load_source, load_encoder, mean, std) -> int:
    """CLIP-I and DINO: every generated image against every real image, printed and saved."""
    from common.evaluation.scores import check_images, evaluate_pairwise, list_eval_images
    gen = list_eval_images(args.gen_image_path_or_dir, "generated")
    real = list_eval_images(args.real_image_path_or_dir, "real")
    check_images(gen + real)  # every input is checked before a framework or model is loaded
    source = load_source()
    encoder = load_encoder(args.backend, source)
    result = evaluate_pairwise(encoder, gen, real, mean, std, args.batch_size)
    if not args.quiet:
        for row in result["per_image"]:
            print(f"{row['image_path']}  {row['cosine']:.4f}  (mean over {len(real)} real images)")
    print(f"{label} ({source.arch.name}, backend {args.backend}, {len(gen)} generated x {len(real)} real): "
          f"cosine {result['cosine']:.4f} | x100 {result['x100']:.2f}")
    if args.save_result:
        save_scores(args, metric, result, encoder, source, real_images=real)
    return 0
