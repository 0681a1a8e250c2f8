"""Class-image generation for prior preservation: fill class_data_dir up to num_class_images with
the selected backend's own pipeline. Images already there are kept, and each new image's noise is
keyed by its index, so an interrupted generation resumes where it stopped with the same images."""
from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm

from common.training.data import count_images
from common.diffusion.generate import SampleSettings, text_to_image
from common.images import next_index, save_images

log = logging.getLogger("train")


def ensure_class_images(backend, group, arch, weights, tokenizer, args) -> int:
    """Generate the shortfall with the backend's pipeline on this process's device (`group`: the
    backend's process_group; call it on the main process only); returns how many were made."""
    have = count_images(args.class_data_dir)
    missing = args.num_class_images - have
    if missing <= 0:
        return 0
    log.info("generating %d class images for %r in %s (%d already there)", missing, args.class_prompt,
             args.class_data_dir, have)
    os.makedirs(args.class_data_dir, exist_ok=True)
    precision = args.prior_generation_precision or args.mixed_precision
    pipe = backend.Pipeline(arch, weights, precision=precision, **group.pipeline_options)
    settings = SampleSettings(sampler=args.sampler, steps=args.sampling_steps, scale=args.scale,
                              height=args.image_size, width=args.image_size, seed=args.seed, progress=False)
    made = 0
    with tqdm(total=missing, desc="class images", dynamic_ncols=True) as bar:
        while made < missing:
            start = next_index(args.class_data_dir)
            n = min(args.sample_batch_size, missing - made)
            # key_offset = the file index, so a resumed generation draws fresh, reproducible noise
            batch = next(text_to_image(pipe, arch, tokenizer, [args.class_prompt], [""], settings,
                                       n_samples=n, key_offset=start))
            save_images(batch, args.class_data_dir, start)
            made += n
            bar.update(n)
    del pipe
    return made
