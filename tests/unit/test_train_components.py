import torch

from tunewise.train.batches import collate, length_grouped_batches
from tunewise.train.loss import supervised_loss
from tunewise.train.tokenize import IGNORE, encode_chat


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": '{"a": 1}'},
    ]
    enc = encode_chat(tokenizer, messages)
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
    end = tokenizer.eos_token  # <|im_end|>: the model must learn to stop
    assert spans == [f"Hello there{end}\n", f'{{"a": 1}}{end}\n']


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
    items = [
        encode_chat(tokenizer, [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y" * (n + 3)}])
        for n in (1, 7, 3)
    ]
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"] != IGNORE).any()
    total, n = supervised_loss(model, **batch)
    ours = total / n
    reference = model(**batch).loss  # transformers shifts labels and ignores -100 the same way
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
