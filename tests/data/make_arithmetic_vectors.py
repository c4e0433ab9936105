"""Make tests/data/arithmetic/: known answers of PEFT's ``add_weighted_adapter`` for every method.

Run from the repository root with torch and peft installed (development only):

    python tests/data/make_arithmetic_vectors.py                 # the installed PEFT (0.21.x)
    PYTHONPATH=/path/to/peft-0.20.0 python tests/data/make_arithmetic_vectors.py --cases p12_svd p13_svd p12_magnitude_prune_svd

A tiny torch module (``emb`` Embedding 20×16, ``q`` Linear 16→16, ``v`` Linear 16→8, ``o`` Linear 8→16)
carries four seeded adapters, saved with ``save_pretrained`` under ``inputs/<name>/`` (made once, by the
first run; later runs reuse them so every PEFT version combines the same inputs):

    p1: r=4, alpha=8, q v emb           p2: r=4, alpha=16, q v o      (partial overlap with p1)
    p3: r=2, alpha=2, q v emb, rank_pattern v=6, alpha_pattern v=3    p4: r=4, alpha=8, q v, rsLoRA

(Adapter names must not be substrings of "lora_", or PEFT may re-initialise them on loading.)

Each case loads its adapters into one ``PeftModel`` and calls ``add_weighted_adapter``; recorded per
module: the new adapter's ``lora_A`` / ``lora_B`` (``<case>/<module>/A``, ``.../B``, as PEFT pads them)
and ``target.scaling`` (manifest), plus the DARE keep-masks PEFT drew (``<case>/mask/<module>/<part>/<i>``,
part A / B for the factor methods, delta for the SVD ones, i the adapter's index in the case), caught by
wrapping ``peft.utils.merge_utils.random_pruning``. Output: ``expected-peft-<version>.safetensors`` and
``manifest-peft-<version>.json`` with the versions of peft and torch.
"""
import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.model import LoraModel
from peft.utils import merge_utils
from safetensors.numpy import save_file
from torch import nn

OUT = Path(__file__).resolve().parent / "arithmetic"
ADAPTERS = {
    "p1": dict(r=4, lora_alpha=8, target_modules=["q", "v", "emb"]),
    "p2": dict(r=4, lora_alpha=16, target_modules=["q", "v", "o"]),
    "p3": dict(r=2, lora_alpha=2, target_modules=["q", "v", "emb"], rank_pattern={"v": 6}, alpha_pattern={"v": 3}),
    "p4": dict(r=4, lora_alpha=8, target_modules=["q", "v"], use_rslora=True),
}
P12 = (["p1", "p2"], [0.7, -0.4])
CASES = {  # name -> (adapters, weights, add_weighted_adapter kwargs)
    "p12_cat": (*P12, dict(combination_type="cat")),
    "p12_linear": (*P12, dict(combination_type="linear")),
    "p12_svd": (*P12, dict(combination_type="svd")),
    "p12_ties": (*P12, dict(combination_type="ties", density=0.5)),
    "p12_ties_frequency": (*P12, dict(combination_type="ties", density=0.5, majority_sign_method="frequency")),
    "p12_ties_svd": (*P12, dict(combination_type="ties_svd", density=0.5)),
    "p12_dare_linear": (*P12, dict(combination_type="dare_linear", density=0.6)),
    "p12_dare_ties": (*P12, dict(combination_type="dare_ties", density=0.6)),
    "p12_dare_linear_svd": (*P12, dict(combination_type="dare_linear_svd", density=0.6)),
    "p12_dare_ties_svd": (*P12, dict(combination_type="dare_ties_svd", density=0.6, majority_sign_method="frequency")),
    "p12_magnitude_prune": (*P12, dict(combination_type="magnitude_prune", density=0.5)),
    "p12_magnitude_prune_svd": (*P12, dict(combination_type="magnitude_prune_svd", density=0.5)),
    "p13_cat": (["p1", "p3"], [1.0, 0.5], dict(combination_type="cat")),
    "p13_svd": (["p1", "p3"], [1.0, 0.5], dict(combination_type="svd")),
    "p13_svd_r3": (["p1", "p3"], [1.0, 0.5], dict(combination_type="svd", svd_rank=3)),
    "p41_cat": (["p4", "p1"], [1.0, 1.0], dict(combination_type="cat")),
    "p41_svd": (["p4", "p1"], [1.0, 1.0], dict(combination_type="svd")),
}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 16, bias=False)
        self.v = nn.Linear(16, 8, bias=False)
        self.o = nn.Linear(8, 16, bias=False)

    def forward(self, idx):
        return self.o(self.v(self.q(self.emb(idx))))


def make_inputs():
    for k, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + k)
        model = get_peft_model(Tiny(), LoraConfig(**kwargs))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn_like(p) * 0.3)
        model.save_pretrained(OUT / "inputs" / name)
        (OUT / "inputs" / name / "README.md").unlink(missing_ok=True)  # a model card template


class MaskRecorder:
    """Catches the keep-masks of ``random_pruning`` and the module they were drawn for."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.base_model.model.named_modules()}
        self.module, self.calls = None, {}
        original = merge_utils.random_pruning

        def random_pruning(tensor, density, rescale):
            mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))  # PEFT's own draw
            self.calls.setdefault(self.module, []).append(mask.numpy().astype(np.uint8))
            out = tensor * mask
            return out / density if rescale else out

        self.original = original
        merge_utils.random_pruning = random_pruning
        for attr, pos in (("_generalized_task_arithmetic_weighted_adapter", 3),
                          ("_svd_generalized_task_arithmetic_weighted_adapter", 4)):
            setattr(LoraModel, attr, self._wrap(getattr(LoraModel, attr), pos))

    def _wrap(self, fn, pos):
        def wrapped(model_self, *args, **kwargs):
            self.module = self.names[id(args[pos])]
            return fn(model_self, *args, **kwargs)
        wrapped.original = fn
        return wrapped

    def close(self):
        merge_utils.random_pruning = self.original
        for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
            setattr(LoraModel, attr, getattr(LoraModel, attr).original)


def run_case(name, adapters, weights, kwargs, tensors):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(Tiny(), OUT / "inputs" / adapters[0], adapter_name=adapters[0])
    for a in adapters[1:]:
        model.load_adapter(OUT / "inputs" / a, adapter_name=a)
    recorder = MaskRecorder(model)
    torch.manual_seed(1234)
    try:
        model.add_weighted_adapter(adapters, weights, "new", **kwargs)
    finally:
        recorder.close()
    cfg = model.peft_config["new"]
    record = {"adapters": adapters, "weights": weights, **kwargs,
              "peft_config": {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora},
              "scaling": {}, "masks": []}
    for mname, m in model.base_model.model.named_modules():
        if hasattr(m, "scaling") and "new" in m.scaling:
            A = m.lora_A["new"].weight if "new" in m.lora_A else m.lora_embedding_A["new"]
            B = m.lora_B["new"].weight if "new" in m.lora_B else m.lora_embedding_B["new"]
            tensors[f"{name}/{mname}/A"] = A.detach().numpy().copy()
            tensors[f"{name}/{mname}/B"] = B.detach().numpy().copy()
            record["scaling"][mname] = m.scaling["new"]
    for mname, masks in recorder.calls.items():
        present = [i for i, a in enumerate(adapters) if mname in ADAPTERS[a]["target_modules"]]
        svd = kwargs["combination_type"].endswith("svd")
        parts = ["delta"] * len(present) if svd else ["A"] * len(present) + ["B"] * len(present)
        assert len(masks) == len(parts), (name, mname, len(masks))
        for k, (part, mask) in enumerate(zip(parts, masks)):
            i = present[k % len(present)]
            tensors[f"{name}/mask/{mname}/{part}/{i}"] = mask
            record["masks"].append([mname, part, i])
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if not (OUT / "inputs").exists():
        make_inputs()
    tensors, records = {}, {}
    for name in args.cases:
        records[name] = run_case(name, *CASES[name], tensors)
    tag = f"peft-{peft.__version__}"
    save_file(tensors, str(OUT / f"expected-{tag}.safetensors"), metadata={"peft": peft.__version__})
    manifest = {"generator": "tests/data/make_arithmetic_vectors.py", "peft": peft.__version__,
                "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                "adapters": ADAPTERS, "cases": records}
    (OUT / f"manifest-{tag}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(records)} cases, {len(tensors)} tensors for {tag}", file=sys.stderr)


if __name__ == "__main__":
    main()
