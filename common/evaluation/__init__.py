"""Evaluation shared by both backends (may import common.*, common.formats, common.diffusion).

- models: CLIP and DINO architectures and weight maps (open_clip / transformers / MindFormers / timm)
- scores: preprocessing, CLIP-T / CLIP-I / DINO definitions, the DreamBooth report
- safety: the safety checker of text_to_image.py --check_safety (CLIP from the backend, heads in numpy)
- arguments: the flags the evaluation scripts share
"""
