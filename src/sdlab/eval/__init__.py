"""Evaluation on the Shapes world: prompt accuracy by the geometric judge, Frechet distance of
judge features, setting sweeps and single-purpose checks (negative prompt, held-out combination)."""
from sdlab.eval.evaluate import (
    EvalReport, ImageRecord, SweepRow, draw_prompts, evaluate, frechet_distance, generate_images,
    held_out_rate, judge_self_check, negative_prompt_effect, real_features, sweep,
)

__all__ = ["EvalReport", "ImageRecord", "SweepRow", "draw_prompts", "evaluate", "frechet_distance",
           "generate_images", "held_out_rate", "judge_self_check", "negative_prompt_effect",
           "real_features", "sweep"]
