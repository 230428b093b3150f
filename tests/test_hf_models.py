"""Hugging Face transformers through the whole library (issue 19): models built from small configs (random init,
nothing downloaded) are analysed, teleported exactly, diagnosed and null-space teleported without a wrapper module.

Every model here goes through the ``torch.export`` fallback (``torch.fx`` cannot trace the ``transformers``
forward), which must carry the lifted tensor constants (the GPT-2 failure of the issue), return the selected
output (a ``ModelOutput`` with a ``DynamicCache`` cannot be exported as is) and accept keyword inputs.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from gradcond.graph import analyze  # noqa: E402
from gradcond.teleport import NullSpaceTeleport, random_cob, teleport  # noqa: E402
from gradcond.utils import select_output  # noqa: E402

pytestmark = pytest.mark.hf

VOCAB = 97


def _quiet_config(cfg):
    # GPT-2's default bos/eos ids (50256) lie outside the tiny vocabulary; they are never used here
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, k, None) is not None and getattr(cfg, k) >= VOCAB:
            setattr(cfg, k, None)
    return cfg


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(_quiet_config(cfg))


def llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(_quiet_config(cfg))


def bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertModel(_quiet_config(cfg))


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, num_channels=3)
    return transformers.ViTModel(cfg)


def t5_encoder():
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB)
    return transformers.T5EncoderModel(_quiet_config(cfg))


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "t5": t5_encoder}


def _model(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name]().double().eval()


def _input(name, batch=2, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _main_output(out):
    """The tensor the structure preserves: the logits of a causal LM, the last hidden state of an encoder."""
    return select_output(out)


@pytest.fixture(scope="module")
def analysed():
    """name -> (model, example, structure); analysed once per module (each analysis is one export)."""
    res = {}
    for name in BUILDERS:
        m, x = _model(name), _input(name)
        res[name] = (m, x, analyze(m, x))
    return res


@pytest.mark.parametrize("name", list(BUILDERS))
def test_analyze_and_inter_landscape_teleport_is_exact(analysed, name):
    model, x, s = analysed[name]
    assert s.num_free > 0
    assert "torch.export" in s.tracer
    # every frozen op is listed with a reason that names it, and the summary shows it
    text = str(s)
    for f in s.frozen:
        assert f.reason.strip() and f.op.strip() and f.node.strip()
        assert f"{f.node} ({f.op}): {f.reason}" in text
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cob = random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(3))
    assert bool((cob.tau < 0).any())  # an inter-landscape CoB flips signs
    tp = teleport(model, cob)  # self-checked on the analysis example
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    x2 = _input(name, batch=3, seed=7)  # another batch of the same sequence length / image size
    with torch.no_grad():
        a, b = _main_output(model(x2)), _main_output(tp(x2))
    assert _rel(a, b) < 1e-12
    moved = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), tp.parameters()))
    assert moved > 0  # the weights really changed


def test_llama_rules_rmsnorm_rotary_swiglu_gqa(analysed):
    """The LLaMA-style ops get rules, not freezing: hand-written RMSNorm weights are affine scales with free taus,
    rotary q/k keep one tau per rotated pair (tau_k = 1 / tau_q), GQA's repeated k/v heads tie, the gated MLP's
    product keeps the gate's taus."""
    model, x, s = analysed["llama"]
    assert s.frozen == []
    names = {g.name for g in s.groups if g.free > 0}
    assert any("scale parameter" in n for n in names)  # RMSNorm weight: x * rsqrt(mean(x**2) + eps) * w
    assert "model.layers.0.input_layernorm.weight" in s.rules
    # rotary: the q projection's output taus are tied in pairs (i, i + head_dim / 2) within a head
    q = s.rules["model.layers.0.self_attn.q_proj.weight"]
    head_dim = 32 // 4
    qg = next(g for g in q.gidx if g.shape[0] == 32).reshape(-1)  # the output-row factor of W_q
    for h in range(4):
        for i in range(head_dim // 2):
            assert qg[h * head_dim + i] == qg[h * head_dim + i + head_dim // 2]
    # GQA: two q heads share one k head: the k rows of a kv head carry the inverse of the q taus of both q heads
    kg = next(g for g in s.rules["model.layers.0.self_attn.k_proj.weight"].gidx if g.shape[0] == 16).reshape(-1)
    n = s.num_free
    for kv in range(2):
        for rep in range(2):
            qh = kv * 2 + rep
            for i in range(head_dim):
                # gidx indexes [1, tau_1..tau_n, 1, 1/tau_1..1/tau_n]: j <-> j + n + 1 is the inverse
                g = int(qg[qh * head_dim + i])
                assert 1 <= g <= 2 * n + 1 and g != n + 1
                assert int(kg[kv * head_dim + i]) == (g + n + 1 if g <= n else g - n - 1)
    # the SwiGLU product silu(gate(x)) * up(x) scales by tau_gate * tau_up: one factor is pinned, the other free
    # (exact), and down_proj's input taus are the free factor's

    def out_rows(pname):
        r = s.rules.get(pname)
        return None if r is None else next((g.reshape(-1) for g in r.gidx if g.shape[0] == 64), None)

    gate, up = out_rows("model.layers.0.mlp.gate_proj.weight"), out_rows("model.layers.0.mlp.up_proj.weight")
    assert (gate is None) != (up is None)
    free = gate if gate is not None else up
    down_in = next(g.reshape(-1) for g in s.rules["model.layers.0.mlp.down_proj.weight"].gidx if g.shape[-1] == 64)
    assert torch.equal(torch.where(free <= n, free + n + 1, free - n - 1), down_in)  # W_down scaled by 1/tau_in


def test_gpt2_tied_embedding_and_conv1d(analysed):
    """GPT-2: Conv1D (addmm with an (in, out) weight) is a linear layer; the embedding tied to the LM head is one
    parameter with one consistent factor (pinned here: its embedding side feeds the LayerNorm-pinned residual
    stream), listed with its reason; the attention and MLP projections move, the GELU module is rewritable."""
    model, x, s = analysed["gpt2"]
    assert "transformer.h.0.attn.c_attn.weight" in s.rules and "transformer.h.0.mlp.c_fc.weight" in s.rules
    assert "transformer.wte.weight" not in s.rules
    # the transformers activation module (NewGELUActivation) is an elementwise leaf: a rewritable site
    assert any(site.module_path == "transformer.h.0.mlp.act" and site.kind == "scale" for site in s.sites)
    tied = [p for p in s.pins if p.node == "transformer.wte.weight"]
    assert tied and "tied" in tied[0].reason
    assert model.lm_head.weight is model.transformer.wte.weight


def test_keyword_inputs_and_output_selector():
    """A dict example input (input_ids=, attention_mask=) is passed as keyword inputs, with padding in the mask;
    output= selects what is preserved (a field name, an index or a callable)."""
    model = _model("bert")
    ids = _input("bert")
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    s = analyze(model, example, output="last_hidden_state")
    assert s.example_kwargs is not None and set(s.example_kwargs) == {"input_ids", "attention_mask"}
    tp = teleport(model, random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(0)),
                  check_inputs=example)
    with torch.no_grad():
        assert _rel(model(**example).last_hidden_state, tp(**example).last_hidden_state) < 1e-12
    # selecting only the last hidden state leaves the pooler free to change: the pooler output is not preserved
    s_all = analyze(model, example)  # default for an output without logits: every tensor (pooler included)
    assert s.num_free > s_all.num_free
    gpt = _model("gpt2")
    ids = _input("gpt2")
    by_index = analyze(gpt, ids, output=0)
    by_callable = analyze(gpt, ids, output=lambda o: o.logits)
    default = analyze(gpt, ids)
    assert by_index.num_free == by_callable.num_free == default.num_free


def test_bad_output_selector_is_one_sentence():
    model, ids = _model("gpt2"), _input("gpt2")
    with pytest.raises(ValueError, match=r"output='scores' is not a field of the model's "
                                         r"CausalLMOutputWithCrossAttentions; its fields are logits"):
        analyze(model, ids, output="scores")
    with pytest.raises(ValueError, match=r"output=5 is out of range"):
        select_output(model(ids), 5)


def _next_token_ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_diagnose_gpt2_next_token_loss():
    from gradcond.diagnose import diagnose

    model = _model("gpt2")
    ids = _input("gpt2", batch=4)
    before = copy.deepcopy(model.state_dict())
    r = diagnose(model, _next_token_ce, [(ids, ids)], cob_steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__  # the output selection is undone
    assert r["gsc"] is not None and r["cob"] is not None and r["cob_optimization"] is not None
    assert r["cob"]["num_free"] > 0
    text = " | ".join(r["findings"])
    # the GSC trend: Conv1D counts as a linear layer, so the fit goes through enough layers for a verdict
    assert r["gsc"]["fit_layers"] >= 3 and "transformer.h.0.attn.c_attn" in r["gsc"]["layers"]
    # the GSC item states its evidence (a verdict, or "not enough evidence" with the points and interval)
    assert re.search(r"(gradients (explode|vanish)|gradient scale is stable across depth|not enough evidence).*"
                     r"fit (goes )?through \d+ layers", text), text
    assert re.search(r"an optimised teleport (raises|lowers|keeps) the gradient norm", text)  # the teleport result
    assert r["cob_optimization"]["max_function_change"] < 1e-12


def test_diagnose_gpt2_with_an_unsuitable_loss_names_the_failed_sections_first():
    """The issue's case: cross-entropy on (batch, seq, vocab) logits against (batch, seq) ids does not fit the
    model. Every loss-dependent section fails; the findings say so first and none rests on a failed section."""
    from gradcond.diagnose import findings, diagnose

    model = _model("gpt2")
    ids = _input("gpt2", batch=4)
    r = diagnose(model, "cross_entropy", [(ids, ids)], cob_steps=2)
    assert r["gsc"] is None and r["cob_optimization"] is None and r["cob"] is not None
    assert {"gsc", "cob_optimization"} <= set(r["errors"]) and any(k.startswith("conditioning.") for k in r["errors"])
    f = r["findings"]
    assert f[0].startswith("every section that needs the loss failed (gsc, conditioning, cob_optimization)")
    n_failed = len(r["errors"])
    assert all(x.startswith("section ") and " failed: " in x for x in f[1:1 + n_failed])
    rest = " | ".join(f[1 + n_failed:])
    assert "teleport raises" not in rest and "gradients explode" not in rest and "stable across depth" not in rest
    assert "coherence" not in rest
    cov = re.search(r"teleportable: a change of basis reaches ([\d,]+) of ([\d,]+) parameter values \(([\d.]+)%\)",
                    rest)
    assert cov, rest  # the fraction of parameters covered, not "the whole model"
    tp, tot = (int(cov.group(i).replace(",", "")) for i in (1, 2))
    assert tot == sum(p.numel() for p in model.parameters()) and 0 < tp <= tot
    assert findings(r) == f  # the findings are a function of the recorded sections


def test_nullspace_teleport_gpt2_moves_the_tied_embedding():
    model = _model("gpt2")
    ids = _input("gpt2", batch=2, seq=8)  # 16 tokens < 32 features: the LM head keeps a null space
    wte0 = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        loss0 = float(_next_token_ce(model(ids).logits, ids))
    res = NullSpaceTeleport(_next_token_ce, eta=0.005, steps=3).teleport(model, (ids, ids))
    rec = res.batches[0]
    with torch.no_grad():
        loss1 = float(_next_token_ce(model(ids).logits, ids))
    assert abs(loss1 - loss0) <= 1e-10 * abs(loss0)
    assert rec.grad_norm_after > rec.grad_norm_before
    moved = (model.transformer.wte.weight.detach() - wte0).abs().amax(dim=1)
    seen = torch.unique(ids)
    assert float(moved.max()) > 1e-4  # the embedding moved ...
    assert float(moved[seen].max()) == 0.0  # ... only in the rows of tokens not in the batch
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_nullspace_refuses_half_of_a_tie():
    model, ids = _model("gpt2"), _input("gpt2")
    with pytest.raises(ValueError, match=r"layer 'lm_head' shares its weight with 'transformer.wte' \(tied "
                                         r"embeddings\); select both"):
        NullSpaceTeleport(_next_token_ce, layers=["lm_head"]).teleport(model, (ids, ids))


def test_docs_page_examples_run():
    """The ```py examples of docs/huggingface.md run as written, each on its own (they use the ``py`` fence so
    that tests/test_docs.py, which runs every ```python block, does not need transformers)."""
    import re
    from pathlib import Path

    page = Path(__file__).parents[1] / "docs" / "huggingface.md"
    blocks = re.findall(r"```py\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 2
    for code in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, str(page), "exec"), {})
