"""Merging fine-tunes of MoE models: per-expert statistics, fused expert tensors expert by expert, routers.

The references are independent of the job: the checkpoint names of each family's expert tensors are
written out by hand (:func:`expert_tensors`), each expert's inputs come from the MoE block's input (one
hook on the whole model's forward), the top-k of the router's logits computed by hand and the expert's
gating recomputed from its weights (the helpers of ``test_moe``), and every tensor's reference merge is
``merge_tensor`` on that tensor alone, or on each expert's slice alone for a tensor stored fused (gpt-oss).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MOE_ARCHS, MORE_MOE_ARCHS, VOCAB, finetune_of, save, tensors, tiny_model, tiny_moe_model
from test_moe import expert_weights, gated, moe_block_inputs, router_top_k
from wandamerge.errors import InputError
from wandamerge.io.safetensors import Checkpoint
from wandamerge.jobs.merge import collect_input_norms, merge
from wandamerge.merging.methods import merge_tensor
from wandamerge.models import decoder_blocks, load_model
from wandamerge.recipe import RecipeError, parse_recipe

LAYERS, EXPERTS = 2, 4


def moe_family(tmp_path: Path, arch: str, finetunes: int = 2) -> list[Path]:
    """A saved tiny MoE base (first) and its seeded fine-tunes."""
    base = tiny_moe_model(arch)
    return [save(base, tmp_path / "base")] + [save(finetune_of(base, seed=i), tmp_path / f"ft{i}")
                                              for i in range(1, finetunes + 1)]


def calibration(tmp_path: Path, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """4 windows of 16 tokens, saved, and the recipe's calibration section reading them."""
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))
    torch.save(ids, tmp_path / "calib.pt")
    return ids, {"data": str(tmp_path / "calib.pt"), "nsamples": 4, "seqlen": 16}


def run(out: Path, **recipe) -> tuple[dict, dict]:
    """(the run record, the output's tensors) of a merge recipe."""
    record = merge(parse_recipe(recipe), out, progress=False)
    return record, tensors(out)


def expert_tensors(arch: str, layer: int, expert: int) -> tuple[list[str], list[str]]:
    """By hand, each family's checkpoint names: the tensors fed by the inputs of an expert's up map (gate and
    up), and by those of its down map; a fused tensor's expert as ``name[expert]``."""
    prefix = f"model.layers.{layer}"
    if arch == "gpt_oss":
        return [f"{prefix}.mlp.experts.gate_up_proj[{expert}]"], [f"{prefix}.mlp.experts.down_proj[{expert}]"]
    if arch == "mixtral":
        own = f"{prefix}.block_sparse_moe.experts.{expert}"
        return [f"{own}.w1.weight", f"{own}.w3.weight"], [f"{own}.w2.weight"]
    own = f"{prefix}.mlp.experts.{expert}"
    return [f"{own}.gate_proj.weight", f"{own}.up_proj.weight"], [f"{own}.down_proj.weight"]


ROUTERS = {"mixtral": ["block_sparse_moe.gate.weight"], "gpt_oss": ["mlp.router.weight", "mlp.router.bias"],
           "qwen2_moe": ["mlp.gate.weight", "mlp.shared_expert_gate.weight"]}


def router_tensors(arch: str) -> list[str]:
    return [f"model.layers.{layer}.{name}" for layer in range(LAYERS)
            for name in ROUTERS.get(arch, ["mlp.gate.weight"])]


def routed_inputs(model_dir: Path, arch: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint name (:func:`expert_tensors`) -> the inputs (tokens, in), float64, of the expert map it
    stores, as ``model_dir``'s model sees ``ids``: the tokens whose top-k router logits hold the expert, and
    for the down map the expert's gated up map of them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    k, found = model.config.num_experts_per_tok, {}
    with torch.no_grad():
        for layer, (block, x) in enumerate(zip(decoder_blocks(model), moe_block_inputs(model, ids))):
            top, experts = router_top_k(block.mlp, x, k), block.mlp.experts
            for e in range(experts.num_experts):
                routed = x[(top == e).any(-1)]
                up, _ = expert_weights(experts, e)
                bias = experts.gate_up_proj_bias[e].double() if experts.has_bias else 0
                h = gated(experts, routed @ up.T + bias)
                ups, downs = expert_tensors(arch, layer, e)
                found.update({name: routed for name in ups} | {name: h for name in downs})
    return found


def stored(tensors_: dict, name: str) -> torch.Tensor:
    """Tensor ``name`` as a linear map's (out, in) weight: a fused expert's slice ``x[e]`` transposed (gpt-oss
    stores each expert (in, out))."""
    if name.endswith("]"):
        fused, expert = name[:-1].split("[")
        return tensors_[fused][int(expert)].T
    return tensors_[name]


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_collected_norms_are_each_experts_routed_tokens(arch, tmp_path):
    """Every expert tensor of the checkpoint (gate and up alike, or a fused tensor's slice) gets the input
    norms of its expert's map over the tokens routed to that expert; routers get none."""
    base_dir = save(tiny_moe_model(arch), tmp_path / "base")
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(base_dir)
    norms = collect_input_norms(model, ids, progress=False, checkpoint_names=Checkpoint(base_dir).names())
    inputs = routed_inputs(base_dir, arch, ids)
    assert len(inputs) == LAYERS * EXPERTS * (2 if arch == "gpt_oss" else 3)
    for name, x in inputs.items():
        torch.testing.assert_close(norms[name].sq_norms.double(), (x ** 2).sum(0), rtol=1e-5, atol=1e-6, msg=name)
        assert norms[name].transposed == (arch == "gpt_oss")
    assert not set(router_tensors(arch)) & set(norms)


# ----------------------------------------------------------------------------- merges


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_one_finetune_at_density_1_and_weight_1_gives_it_back(arch, tmp_path):
    base, ft1 = moe_family(tmp_path, arch, finetunes=1)
    _, calib = calibration(tmp_path)
    model = [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 1.0}}]
    for label, extra in (("task_arithmetic", {}), ("ties", {}),
                         ("ties", {"sparsify": {"score": "wanda"}, "calibration": calib})):
        params = model if label == "ties" else [{"model": str(ft1), "parameters": {"weight": 1.0}}]
        record, got = run(tmp_path / f"{label}-{len(extra)}", merge_method=label, base_model=str(base), models=params,
                          **extra)
        want = tensors(ft1)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"{label} {name}")
        if extra:  # every expert tensor really scored by Wanda, on its own expert's norms
            first = expert_tensors(arch, 0, 0)[0][0].split("[")[0]
            assert record["per_tensor"][first]["sparsifier"] == "wanda"


@pytest.mark.parametrize("arch,method", [("mixtral", "ties"), ("qwen3_moe", "ties"), ("gpt_oss", "ties"),
                                         ("olmoe", "obim"), ("gpt_oss", "obim")])
def test_wanda_scored_merge_trims_each_expert_by_its_routed_tokens(arch, method, tmp_path):
    """At density 0.5 every expert tensor equals the Wanda-scored merge (TIES; OBIM, whose assignment also
    reads the norms) on the brute-force norms of its expert's routed tokens (a fused tensor: slice by slice,
    in (out, in) layout); routers fall back to magnitude."""
    base, ft1, ft2 = moe_family(tmp_path, arch)
    ids, calib = calibration(tmp_path)
    record, got = run(tmp_path / "out", merge_method=method, base_model=str(base), calibration=calib,
                      sparsify={"score": "wanda"},
                      models=[{"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
                              {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.5}}])
    b, f1, f2 = tensors(base), tensors(ft1), tensors(ft2)
    for name, x in routed_inputs(base, arch, ids).items():
        norms = (x ** 2).sum(0).float()
        want = merge_tensor(method, stored(b, name), [stored(f1, name), stored(f2, name)], [0.6, 0.4], 0.5,
                            score="wanda", input_sq_norms=[norms, norms])
        torch.testing.assert_close(stored(got, name), want, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(stored(got, name), stored(b, name))
    for router in router_tensors(arch):
        assert record["per_tensor"][router]["sparsifier"] == "magnitude"
        assert record["per_tensor"][router]["router"] == "method"


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "task_arithmetic"])
def test_fused_expert_tensor_merges_as_its_slices_alone(method, tmp_path):
    """gpt-oss stores its experts fused (E, in, out): each expert's slice is merged as that (out, in) matrix
    alone would be (its own magnitude cut, its own draws, in turn from the job's one generator); a
    tensor-wide trim of the whole stack would differ."""
    base, ft1, ft2 = moe_family(tmp_path, "gpt_oss")
    density = {} if method == "task_arithmetic" else {"density": 0.5}
    _, got = run(tmp_path / "out", merge_method=method, base_model=str(base),
                 models=[{"model": str(ft1), "parameters": {"weight": 0.6, **density}},
                         {"model": str(ft2), "parameters": {"weight": 0.4, **density}}])
    b, f1, f2 = tensors(base), tensors(ft1), tensors(ft2)
    generator, densities = torch.Generator().manual_seed(0), density.get("density")
    for name in Checkpoint(base).names():  # the job's order: its generator's draws come in this order
        if b[name].ndim == 3:
            want = torch.stack([merge_tensor(method, b[name][e].T, [f1[name][e].T, f2[name][e].T], [0.6, 0.4],
                                             densities, generator=generator).T for e in range(EXPERTS)])
        else:
            want = merge_tensor(method, b[name], [f1[name], f2[name]], [0.6, 0.4], densities, generator=generator)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    if method == "ties":
        name = "model.layers.0.mlp.experts.gate_up_proj"
        whole = merge_tensor(method, b[name], [f1[name], f2[name]], [0.6, 0.4], 0.5)
        assert not torch.equal(whole, got[name])


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_each_router_rule_does_what_it_says(arch, tmp_path):
    """router: method (the default) merges routers as the method does; base keeps the base's; average takes
    the weighted mean of the models' routers (whatever lambda); every other tensor is the method's."""
    base, ft1, ft2 = moe_family(tmp_path, arch)
    b, f1, f2 = tensors(base), tensors(ft1), tensors(ft2)
    models = [{"model": str(ft1), "parameters": {"weight": 0.7}}, {"model": str(ft2), "parameters": {"weight": 0.3}}]
    for rule in (None, "method", "base", "average"):
        extra = {} if rule is None else {"router": rule}
        record, got = run(tmp_path / f"out-{rule}", merge_method="task_arithmetic", base_model=str(base),
                          parameters={"lambda": 0.5}, models=models, **extra)
        routers = router_tensors(arch)
        for name in b:
            method = b[name] + 0.5 * (0.7 * (f1[name] - b[name]) + 0.3 * (f2[name] - b[name]))
            want = {"base": b[name], "average": (0.7 * f1[name] + 0.3 * f2[name]) / 1.0}.get(rule, method) \
                if name in routers else method
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=f"{rule} {name}")
            assert record["per_tensor"][name].get("router") == ((rule or "method") if name in routers else None)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_regmean_solves_each_expert_from_its_tasks_routed_grams(arch, tmp_path):
    """RegMean with each fine-tune's own activations: every expert map (a fused tensor: each slice) is solved
    from the Grams of the tokens each fine-tune's own router sends to that expert."""
    base, ft1, ft2 = moe_family(tmp_path, arch)
    ids, calib = calibration(tmp_path, seed=2)
    record, got = run(tmp_path / "out", merge_method="regmean", base_model=str(base), calibration=calib,
                      sparsify={"activations": "finetuned"},
                      models=[{"model": str(ft1), "parameters": {"weight": 1.0}},
                              {"model": str(ft2), "parameters": {"weight": 0.5}}])
    b, f1, f2 = tensors(base), tensors(ft1), tensors(ft2)
    inputs = [routed_inputs(ft, arch, ids) for ft in (ft1, ft2)]
    for name in inputs[0]:
        grams = [(x.T @ x / max(x.shape[0], 1)).float() for x in (own[name] for own in inputs)]
        want = merge_tensor("regmean", stored(b, name), [stored(f1, name), stored(f2, name)], [1.0, 0.5],
                            input_grams=grams)
        torch.testing.assert_close(stored(got, name), want, rtol=1e-4, atol=1e-5, msg=name)
        assert name.split("[")[0] not in record["fallbacks"]
    assert "merged by task_arithmetic" in record["fallbacks"][router_tensors(arch)[0]]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_aim_relaxes_each_expert_by_its_routed_tokens(arch, tmp_path):
    """AIM shrinks every expert's merged update by the base's mean |x_j| over that expert's routed tokens."""
    from wandamerge.merging.aim import aim_relax

    base, ft1, ft2 = moe_family(tmp_path, arch)
    ids, calib = calibration(tmp_path, seed=1)
    models = [{"model": str(ft1), "parameters": {"weight": 0.6}}, {"model": str(ft2), "parameters": {"weight": 0.4}}]
    record, got = run(tmp_path / "out", merge_method="task_arithmetic", base_model=str(base), calibration=calib,
                      aim={"omega": 0.3}, models=models)
    b, f1, f2 = tensors(base), tensors(ft1), tensors(ft2)
    for name, x in routed_inputs(base, arch, ids).items():
        base_w = stored(b, name)
        merged = base_w + 0.6 * (stored(f1, name) - base_w) + 0.4 * (stored(f2, name) - base_w)
        want = aim_relax(base_w, merged, x.abs().sum(0).float(), 0.3)
        torch.testing.assert_close(stored(got, name), want, rtol=0, atol=1e-6, msg=name)
        assert record["per_tensor"][name.split("[")[0]]["aim"]
    assert "aim" not in record["per_tensor"][router_tensors(arch)[0]]


@pytest.mark.parametrize("arch,activations", [("mixtral", "base"), ("gpt_oss", "base"), ("qwen3_moe", "finetuned"),
                                              ("gpt_oss", "finetuned")])
def test_low_memory_merge_equals_in_memory(arch, activations, tmp_path):
    """The calibration pass streamed block by block from the shards (fused experts assembled from their
    per-expert tensors) gives the in-memory merge, tensor for tensor."""
    base, ft1, ft2 = moe_family(tmp_path, arch)
    _, calib = calibration(tmp_path, seed=3)
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(base), "calibration": calib,
                           "sparsify": {"score": "wanda", "activations": activations},
                           "models": [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                                      {"model": str(ft2), "parameters": {"weight": 1.0, "density": 0.5}}]})
    streamed = merge(recipe, tmp_path / "low", progress=False, low_memory=True)
    merge(recipe, tmp_path / "mem", progress=False, low_memory=False)
    assert streamed["calibration"]["low_memory"]
    low, mem = tensors(tmp_path / "low"), tensors(tmp_path / "mem")
    assert low.keys() == mem.keys()
    for name in mem:
        assert torch.equal(low[name], mem[name]), name


# ----------------------------------------------------------------------------- adapters and refusals


def lora_adapter(model_dir: Path, out: Path, **config) -> object:
    """A PEFT LoRA adapter of ``model_dir``'s model with nonzero B matrices, saved to ``out``; the PEFT model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


def test_lora_on_the_attention_maps_of_an_moe_model_merges(tmp_path):
    base = moe_family(tmp_path, "mixtral", finetunes=0)[0]
    reference = lora_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"]).merge_and_unload()
    _, got = run(tmp_path / "out", merge_method="task_arithmetic", base_model=str(base),
                 models=[{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}}])
    want, b = reference.state_dict(), tensors(base)
    adapted = [name for name in got if "q_proj" in name or "v_proj" in name]
    assert len(adapted) == 2 * LAYERS
    for name in got:
        torch.testing.assert_close(got[name], want[name] if name in adapted else b[name], rtol=0, atol=1e-6, msg=name)


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_lora_on_fused_expert_parameters_is_refused_in_one_line(arch, tmp_path):
    base = moe_family(tmp_path, arch, finetunes=0)[0]
    lora_adapter(base, tmp_path / "lora", target_modules=["q_proj"],
                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with pytest.raises(InputError) as exc:
        run(tmp_path / "out", merge_method="task_arithmetic", base_model=str(base),
            models=[{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}}])
    message = one_line(exc)
    assert f"parameters of a {arch} model" in message and "merge_and_unload" in message
    assert not (tmp_path / "out").exists()


def test_refusals_are_one_line(tmp_path):
    base, ft1 = moe_family(tmp_path / "moe", "olmoe", finetunes=1)
    _, calib = calibration(tmp_path)
    with pytest.raises(InputError) as exc:
        run(tmp_path / "out", merge_method="regmean_plus", base_model=str(base), calibration=calib,
            models=[{"model": str(ft1), "parameters": {"weight": 1.0}}])
    assert "'regmean_plus' does not merge MoE models (olmoe)" in one_line(exc)
    dense = save(tiny_model("llama"), tmp_path / "dense")
    with pytest.raises(InputError) as exc:
        run(tmp_path / "out", merge_method="task_arithmetic", base_model=str(dense), router="base",
            models=[{"model": str(dense), "parameters": {"weight": 1.0}}])
    assert "llama models have none" in one_line(exc)
    with pytest.raises(RecipeError) as exc:
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}], "router": "avg"})
    assert "did you mean 'average'" in one_line(exc)


@pytest.mark.parametrize("arch", MORE_MOE_ARCHS)
def test_more_families_give_the_finetune_back_with_every_expert_wanda_scored(arch, tmp_path):
    """The other fused-expert families (their checkpoint names come from transformers' own conversion
    mapping: PhiMoE's block_sparse_moe.gate for mlp.router, GraniteMoE's fused input_linear ...): one
    fine-tune at density 1 and weight 1 comes back, and every expert tensor is Wanda-scored on its expert's
    statistics (none falls back for want of them)."""
    base, ft1 = moe_family(tmp_path, arch, finetunes=1)
    _, calib = calibration(tmp_path)
    record, got = run(tmp_path / "out", merge_method="ties", base_model=str(base), sparsify={"score": "wanda"},
                      calibration=calib, models=[{"model": str(ft1), "parameters": {"weight": 1.0, "density": 1.0}}])
    want = tensors(ft1)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    expert_names = [n for n in want if (".experts." in n or n.endswith("_linear.weight")) and "bias" not in n]  # granite: input_linear, output_linear
    assert expert_names
    for name in expert_names:
        assert record["per_tensor"][name]["sparsifier"] == "wanda", (name, record["per_tensor"][name])
