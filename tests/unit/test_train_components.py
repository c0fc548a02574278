import torch

from tunewise.models.chat import IGNORE, ChatFormat
from tunewise.train.batches import collate, length_grouped_batches
from tunewise.train.loss import supervised_loss


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": '{"a": 1}'},
    ]
    enc = ChatFormat.build(tokenizer, model="smollm2").encode(messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(enc.input_ids) == full
    spans, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    end = tokenizer.eos_token  # <|im_end|>: the model must learn to stop; the template's "\n" after it is not trained
    assert spans == [f"Hello there{end}", f'{{"a": 1}}{end}']


def test_length_grouped_batches_cover_every_item_once():
    lengths = [5, 49, 7, 48, 6, 47, 8, 46]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # grouping by length: each batch's lengths are neighbours
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 2 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=0)
    assert batches != length_grouped_batches(lengths, 2, seed=1)


def test_supervised_loss_matches_transformers_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chat = ChatFormat.build(tokenizer, model="smollm2")
    items = [
        chat.encode([{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y" * (n + 3)}])
        for n in (1, 7, 3)
    ]
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"] != IGNORE).any()
    total, n = supervised_loss(model, **batch)
    ours = total / n
    reference = model(**batch).loss  # transformers shifts labels and ignores -100 the same way
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_cheap_dropout_keeps_the_asked_share_independently_and_reproducibly():
    from tunewise.train.fast import CheapDropout

    drop = CheapDropout(0.05).train()
    x = torch.ones(4, 250, 1000)
    torch.manual_seed(1)
    a = drop(x)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.002  # 1M draws: sd 0.0002
    assert torch.allclose(a[kept], torch.tensor(1 / (1 - 3277 / 65536)))  # exact rescaling
    assert abs(a.mean().item() - 1.0) < 0.003  # unbiased
    # neighbours are independent (the four masks of one 64-bit draw do not move together)
    flat = kept.flatten().float()
    together = (flat[0::4] * flat[1::4]).mean().item()
    assert abs(together - 0.95 ** 2) < 0.003
    assert drop(x) is a  # the same input again (q, k and v read one hidden state): the same mask
    b = drop(x.clone())
    assert not torch.equal(a, b)  # a new input: a new mask
    torch.manual_seed(1)
    assert torch.equal(drop(x.clone()), a)  # torch's generator drives it: seeds and saved RNG states reproduce it
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CheapDropout(0.0).train()(x), x)


def test_cheap_dropout_in_bf16_applies_an_exact_0_1_mask():
    from tunewise.train.fast import CheapDropout

    drop = CheapDropout(0.1).train()
    x = (torch.randn(64, 1000) + 5).to(torch.bfloat16).requires_grad_(True)  # no zeros to confuse with drops
    torch.manual_seed(3)
    y = drop(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 64k draws: sd 0.0012
    # kept values are x / keep probability, rounded once to bf16 as `x * scale` rounds them
    assert torch.equal(y[kept], (x * drop.scale)[kept])
    y.float().sum().backward()  # the gradient: the mask times the scale, nothing else
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(drop.scale, dtype=torch.bfloat16), 0))


def test_fused_rms_norm_matches_transformers_rms_norm():
    """Same forward bits, same input and weight gradients as LlamaRMSNorm under autograd, in the
    dtypes the methods use: bf16 activations with a bf16 weight (LoRA) or an fp32 weight (full)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tunewise.train.fast import FusedRMSNorm, _is_llama_rms_norm

    torch.manual_seed(0)
    for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.bfloat16, torch.float32)):
        norm = LlamaRMSNorm(96, eps=1e-5).to(w_dtype)
        assert _is_llama_rms_norm(norm)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = (torch.randn(3, 7, 96) * 4).to(x_dtype)
        grad = torch.randn(3, 7, 96).to(torch.promote_types(x_dtype, w_dtype))
        results = []
        for fused in (False, True):
            xi = x.clone().requires_grad_(True)
            norm.weight.grad = None
            out = FusedRMSNorm.apply(xi, norm.weight, norm.variance_epsilon) if fused else norm(xi)
            out.backward(grad)
            results.append((out.detach(), xi.grad, norm.weight.grad.clone()))
        (ref_out, ref_gx, ref_gw), (out, gx, gw) = results
        assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)
        tol = 1e-5 if x_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gx, ref_gx, rtol=tol, atol=tol)
        torch.testing.assert_close(gw, ref_gw, rtol=tol, atol=tol)
        assert gx.dtype == x_dtype and gw.dtype == w_dtype


def test_grouped_eager_attention_matches_transformers_eager_attention():
    """Grouped-query attention without repeated keys/values: the same output bits, and the same
    gradients up to summation order, with 3 query heads per kv head and left padding."""
    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from tunewise.train.fast import grouped_eager_attention

    class Attention(torch.nn.Module):
        num_key_value_groups = 3

    module = Attention().train()
    torch.manual_seed(0)
    b, heads, kv, t, d = 3, 6, 2, 11, 16
    padding = torch.ones(b, t, dtype=torch.bool)
    padding[0, :4] = False
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        mask = eager_mask(b, t, t, attention_mask=padding, dtype=dtype)  # (B, 1, T, T) additive
        query = torch.randn(b, t, heads, d).transpose(1, 2).to(dtype)  # as LlamaAttention lays it out
        key, value = torch.randn(b, kv, t, d).to(dtype), torch.randn(b, kv, t, d).to(dtype)
        grad = torch.randn(b, t, heads, d).to(dtype)
        grad[0, :4] = 0  # padded positions get no gradient in training (their labels are ignored)
        results = []
        for attention in (eager_attention_forward, grouped_eager_attention):
            inputs = [x.clone().requires_grad_(True) for x in (query, key, value)]
            out, probs = attention(module, *inputs, mask, scaling=d**-0.5)
            out.backward(grad)
            results.append((out.detach(), probs.detach(), *(x.grad for x in inputs)))
        (out, probs, *grads), (ref_out, ref_probs, *ref_grads) = results[1], results[0]
        assert out.shape == ref_out.shape == (b, t, heads, d) and torch.equal(out, ref_out)
        assert torch.equal(probs, ref_probs)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=tol, atol=tol)


def _lora_config(tiny_model_dir, **lora):
    from tunewise.config import Config

    return Config.model_validate({"data": {"path": "x"}, "model": {"base": str(tiny_model_dir)}, "lora": lora})


def _chat_batch(tokenizer, lengths: tuple[int, ...]) -> dict:
    """One padded batch of single-turn chats, question and answer `n` characters each."""
    chat = ChatFormat.build(tokenizer, model="smollm2")
    items = [chat.encode([{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * n}])
             for n in lengths]
    return collate(items, tokenizer.pad_token_id)


def _lora_with_random_b(config, tiny_model_dir, seed: int = 0):
    """A LoRA model whose B matrices are not zero, so every LoRA term reaches the loss (and A gets gradients)."""
    from tunewise.settings import train_settings
    from tunewise.train.methods import build
    from tunewise.train.plan import adapter_shape

    torch.manual_seed(seed)
    tr = build(config.method, adapter_shape(train_settings(config)), tiny_model_dir, torch.float32)
    with torch.no_grad():
        for name, param in tr.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return tr


def _loss_and_grads(tr, batch):
    total, n = supervised_loss(tr.causal_lm, **batch)
    (total / n).backward()
    return (total / n).detach(), [p.grad.clone() for p in tr.params]


def test_cpu_fast_path_gives_the_same_loss_and_gradients(tiny_model_dir, tokenizer):
    """Every lever changes speed, not numbers (dropout off, fp32, LoRA on every linear layer)."""
    from tunewise.train.fast import GROUPED_EAGER, SharedInputLoRA, cpu_fast_path

    config = _lora_config(tiny_model_dir, dropout=0.0, target_modules="all-linear")
    batch = _chat_batch(tokenizer, (2, 9, 5))
    results = []
    for fast in (False, True):
        tr = _lora_with_random_b(config, tiny_model_dir)
        if fast:
            used = set(cpu_fast_path(tr, torch.float32, 128))
            assert {"grouped eager attention", "fused RMSNorm", "fused LoRA forward"} <= used
            assert tr.causal_lm.config._attn_implementation == GROUPED_EAGER
            layer = tr.causal_lm.get_decoder().layers[0]
            attention, mlp = layer.self_attn, layer.mlp
            assert isinstance(attention.q_proj._tunewise_shared, SharedInputLoRA)
            assert attention.q_proj._tunewise_shared is attention.v_proj._tunewise_shared
            assert mlp.gate_proj._tunewise_shared is mlp.up_proj._tunewise_shared is not None
            assert attention.o_proj._tunewise_shared is None and mlp.down_proj._tunewise_shared is None
        results.append(_loss_and_grads(tr, batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in results[0][1])  # every LoRA weight takes part
    for plain, fast in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-6)
    # with the adapter switched off (DPO's reference pass) the fused forward gives the base model's loss
    with tr.model.disable_adapter(), torch.no_grad():
        off = supervised_loss(tr.causal_lm, **batch)
    torch.manual_seed(0)
    plain_base = _base_loss(tiny_model_dir, batch)
    torch.testing.assert_close(off[0] / off[1], plain_base, rtol=1e-5, atol=1e-5)


def _base_loss(tiny_model_dir, batch):
    from tunewise.models import load_model

    model = load_model(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        total, n = supervised_loss(model, **batch)
    return total / n


def test_fused_lora_forward_applies_dropout_as_peft_does(tiny_model_dir, tokenizer):
    """With dropout on, the fused forward (rescale folded into B, shared A product) gives PEFT's own
    forward's loss and gradients on the same masks."""
    from tunewise.train.fast import cpu_fast_path

    config = _lora_config(tiny_model_dir, dropout=0.2)
    batch = _chat_batch(tokenizer, (4, 7))
    results = []
    for fused in (False, True):
        tr = _lora_with_random_b(config, tiny_model_dir)
        cpu_fast_path(tr, torch.float32, 128)
        if not fused:  # PEFT's forward, which calls CheapDropout.forward (mask and rescale)
            for module in tr.model.modules():
                if "forward" in vars(module) and hasattr(module, "lora_A"):
                    del module.forward
        tr.model.train()
        torch.manual_seed(7)  # the same mask stream for both
        results.append(_loss_and_grads(tr, batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for plain, fused in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-6)
    tr.model.eval()  # and the masks were real: without dropout the loss moves
    with torch.no_grad():
        total, n = supervised_loss(tr.causal_lm, **batch)
    assert abs(float(total / n) - float(results[1][0])) > 1e-3


def test_fast_path_under_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dir, tokenizer):
    """Checkpointing recomputes each layer in the backward pass: the dropout masks (drawn from torch's
    generator, which checkpointing restores) and the shared A products must come out the same, so
    the gradients equal those of a run that kept its activations."""
    from tunewise.train.fast import cpu_fast_path

    config = _lora_config(tiny_model_dir, dropout=0.2, target_modules="all-linear")
    batch = _chat_batch(tokenizer, (3, 8))
    results = []
    for checkpointing in (False, True):
        tr = _lora_with_random_b(config, tiny_model_dir)
        cpu_fast_path(tr, torch.float32, 128)
        if checkpointing:
            tr.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tr.model.train()
        torch.manual_seed(11)
        results.append(_loss_and_grads(tr, batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for kept, recomputed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(kept, recomputed, rtol=1e-5, atol=1e-7)
