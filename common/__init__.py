"""The framework-neutral core shared by both backends: numpy, PIL, yaml and safetensors only, never
torch or MindSpore at import time.

Layers, lowest first; a module imports only from its own layer or lower ones (tests/test_layout.py):

    common.*            errors, arch (architecture yamls -> ModelArch), config (flag and yaml
                        parsing, range-checked types), cli (entry-point helpers), rng (seeded
                        streams), tokenizer (CLIP BPE), atomic (atomic writes), images (PNG, grids),
                        watermark
    common.formats      weight files and layouts: readers/writers, original <-> diffusers <->
                        MindONE key maps, LoRA formats, loading from any source
    common.diffusion    noise schedule, samplers, the text-to-image sampling loop
    common.evaluation   CLIP / DINO weight maps and scores, the safety checker, the evaluation flags
    common.training     training flags, the DreamBooth data pipeline, class images, the run loop

Each feature's framework halves live at the same place under backends/cuda/ and backends/ascend/.
"""
