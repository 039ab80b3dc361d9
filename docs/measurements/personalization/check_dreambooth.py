"""Second opinion on Dreambooth models (MODEL or BASE+lora:FILE arguments): star rates on other seeds, full accuracy on other prompts."""
import json, random, sys
sys.path.insert(0, "scripts")
import sdlab
from measure_personalization import DB_PROMPTS, Judged
from sdlab.eval.evaluate import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt

N_STAR, SEED_STAR, N_FULL, SEED_FULL = 128, 1000, 300, 5000
out = {}
for model in sys.argv[1:]:
    if "+lora:" in model:
        from sdlab.personalize import apply_personalization
        base, lora = model.split("+lora:")
        pipe = sdlab.load(base)
        apply_personalization(pipe, loras=[lora])
    else:
        pipe = sdlab.load(model)
    r = {}
    if model != "shapes":
        for j in DB_PROMPTS:
            res = pipe.generate([j.prompt] * N_STAR, seed=SEED_STAR)
            r[j.name] = sum(all(is_right(judge(x.image), parse_prompt(j.plain)).values()) for x in res) / N_STAR
    rep = evaluate(pipe, draw_prompts(random.Random(SEED_FULL), N_FULL, "full"), seed=SEED_FULL)
    r["full"] = rep.accuracy
    r["attrs"] = rep.attribute_accuracy
    out[model] = r
    print(model, json.dumps(r), flush=True)
